"""What a router sees: the input text, and the frozen base's mean-pooled hidden state of one layer.

A router never sees the task id. It sees the prompt (``on="prompt"``) or only the raw input fields
joined by newlines (``on="fields"``: no template, so telling tasks apart by their instruction is not
possible). The representation is the masked mean over real tokens of the hidden state after layer
``layer`` of the base (0: the token embeddings; the last index: the final normed state, as in
``output_hidden_states``). The forward pass stops right after that layer, so an early layer costs only
that fraction of a base pass.

``readout="mean_last"`` appends the last real token's hidden state to the mean. Every prompt ends with
its task's question ("Score:", "Answer:"), which a mean over a long input dilutes and the last
position holds.

Routing on the raw fields adds the text's shape (:func:`text_shape`: how many fields, how long each
is, and how unequal the first two are in length), which a masked mean forgets. Symmetric pairs (two
sentences of about the same length, as in STS-B) and asymmetric ones (a long premise, a short hypothesis,
as in RTE) differ in the length asymmetry ``|log1p(w1) - log1p(w2)|``: one number a linear router can
use, where the two counts alone need a nonlinear one. docs/route.md gives what each of these changes
measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterfuse.base import BaseModel
from adapterfuse.device import model_device
from adapterfuse.distributed import map_rows
from adapterfuse.errors import ConfigError
from adapterfuse.head import DEFAULT_MAX_LENGTH, autocast_context, length_batches, pad
from adapterfuse.progress import bar
from adapterfuse.tasks.spec import Example, TaskSpec

ON = ("prompt", "fields")
READOUTS = ("mean", "mean_last")
DEFAULT_LAYER = 1  # after block 1: 1/30 of a SmolLM2 pass, inside the 5% routing budget (bench_route)
# Shape versions: 0 none; 1 the four counts (routers saved before version 2 use it); 2 adds the asymmetry.
SHAPE_DIMS = (0, 4, 5)
SHAPE_VERSION = 2
SHAPE_DIM = SHAPE_DIMS[SHAPE_VERSION]


def text_shape(text: str, version: int = SHAPE_VERSION) -> list[float]:
    """The shape of a routing text (fields are lines): ``log1p`` of its line count, of the word counts of
    its first and second lines and of the words of all later lines; version 2 adds the length asymmetry
    of the first two lines, ``|log1p(w1) - log1p(w2)|`` (0 for one line).

    Args:
        text: a routing text (see :func:`routing_text`).
        version: 1 or 2 (``SHAPE_DIMS[version]`` numbers).

    Returns:
        The numbers.
    """
    words = [len(line.split()) for line in text.split("\n")]
    counts = [math.log1p(len(words)), math.log1p(words[0]), math.log1p(sum(words[1:2])), math.log1p(sum(words[2:]))]
    if version == 1:
        return counts
    return [*counts, abs(counts[1] - counts[2]) if len(words) > 1 else 0.0]


def shape_version(shape: bool | int) -> int:
    """The shape version a ``shape`` argument means: ``True`` the current one, ``False`` none, an int itself.

    Raises:
        ConfigError: an int that is not a version.
    """
    if isinstance(shape, bool):
        return SHAPE_VERSION if shape else 0
    if shape not in range(len(SHAPE_DIMS)):
        raise ConfigError(
            f"shape: {shape!r} is not a shape version; expected True, False or one of "
            f"0 .. {len(SHAPE_DIMS) - 1} (0: none, 1: the four counts, 2: counts and asymmetry)"
        )
    return int(shape)


def _choice(name: str, value: str, choices: tuple[str, ...], meaning: str) -> str:
    if value not in choices:
        raise ConfigError(f"{name} {value!r}: unknown; expected one of {', '.join(choices)} ({meaning})")
    return value


def check_readout(readout: str) -> str:
    """Return ``readout`` if it is ``"mean"`` or ``"mean_last"``.

    Raises:
        ConfigError: otherwise.
    """
    return _choice("readout", readout, READOUTS, "the mean over tokens, or the mean followed by the last token's state")


def default_shape(on: str, shape: bool | int | None) -> int:
    """The :func:`text_shape` version features carry: as asked, else the current one only on the raw fields."""
    return shape_version(check_on(on) == "fields" if shape is None else shape)


def check_on(on: str) -> str:
    """Return ``on`` if it is ``"prompt"`` or ``"fields"``.

    Raises:
        ConfigError: otherwise.
    """
    return _choice("on", on, ON, "route on the prompt, or on the raw input fields without the task's template")


def routing_text(task: TaskSpec, example: Example, on: str) -> str:
    """The text a router sees for one input: its prompt, or its raw fields joined by newlines."""
    if on == "prompt":
        return task.prompt(example.fields)
    return "\n".join(" ".join(f.split()) for f in example.fields)


def routing_texts(task: TaskSpec, examples: Sequence[Example], on: str) -> list[str]:
    """:func:`routing_text` for every example."""
    check_on(on)
    return [routing_text(task, e, on) for e in examples]


@dataclass(frozen=True)
class FeatureSpec:
    """What a router sees: which text, which hidden state of the base, and whether the text's shape follows.

    Attributes:
        on: route on the ``"prompt"`` or the raw ``"fields"`` (see :func:`routing_text`).
        layer: the hidden state (see :func:`resolve_layer`).
        shape: whether (``True``/``False``) or which version of (an int) :func:`text_shape` the features
            carry; ``None``: the current version only ``on="fields"`` (see :func:`default_shape`).
        readout: ``"mean"`` or ``"mean_last"`` (see :class:`FeatureExtractor`).
    """

    on: str = "prompt"
    layer: int = DEFAULT_LAYER
    shape: bool | int | None = None
    readout: str = "mean"


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass once the wanted layer has run."""


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The decoder's stack of transformer blocks (``layers`` for Llama-likes, else its first ModuleList).

    Raises:
        ConfigError: if the decoder has no ModuleList of blocks.
    """
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    for child in decoder.children():
        if isinstance(child, nn.ModuleList):
            return child
    raise ConfigError(f"features: decoder {type(decoder).__name__} has no list of transformer blocks")


def n_layers(model: nn.Module) -> int:
    """The number of transformer blocks of a causal LM."""
    return len(decoder_layers(model.get_decoder()))


def resolve_layer(model: nn.Module, layer: int) -> int:
    """A layer index in ``0 .. n_layers`` (negative counts from the end, ``-1`` is the final normed state).

    Raises:
        ConfigError: for an index out of range.
    """
    return layer_index(layer, n_layers(model))


def layer_index(layer: int, total: int) -> int:
    """:func:`resolve_layer` for a base of ``total`` blocks (known, e.g., from its config alone).

    Raises:
        ConfigError: for an index out of range.
    """
    index = layer if layer >= 0 else total + 1 + layer
    if not 0 <= index <= total:
        raise ConfigError(
            f"layer {layer}: out of range for a base with {total} blocks; expected "
            f"{-total - 1} .. {total} (0 = token embeddings, {total} = final hidden state)"
        )
    return index


def _capture_module(model: nn.Module, index: int) -> nn.Module:
    """The module whose output is hidden state ``index`` (``output_hidden_states`` numbering)."""
    decoder = model.get_decoder()
    layers = decoder_layers(decoder)
    if index == 0:
        return model.get_input_embeddings()
    if index == len(layers):  # HF's last hidden state is after the final norm, where there is one
        for name in ("norm", "ln_f", "final_layernorm"):
            if isinstance(getattr(decoder, name, None), nn.Module):
                return getattr(decoder, name)
        return layers[-1]
    return layers[index - 1]


class FeatureExtractor:
    """Mean-pooled hidden states of one layer of the frozen base, cached per text.

    Args:
        base: the frozen base (never modified; a hook is added during a pass and removed after).
        layer: which hidden state (see :func:`resolve_layer`).
        batch_size: texts per forward pass (batched by similar length).
        autocast: run the base under bf16 autocast (features are returned in fp32).
        max_length: token cap; a longer text keeps its first and last halves (as in scoring).
        shape: append :func:`text_shape` to every feature row (``True``: the current version; an int: that
            version, see :func:`shape_version`).
        readout: ``"mean"`` over real tokens, or ``"mean_last"``: the mean, then the last real token's state.
        label: what the progress bar says is being read.

    Raises:
        ConfigError: a layer out of range, a batch size below 1 or an unknown readout.
    """

    def __init__(
        self,
        base: BaseModel,
        layer: int = DEFAULT_LAYER,
        batch_size: int = 32,
        autocast: bool = True,
        max_length: int = DEFAULT_MAX_LENGTH,
        shape: bool | int = False,
        readout: str = "mean",
        label: str = "routing features",
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
        self.base, self.layer, self.shape = base, resolve_layer(base.model, layer), shape_version(shape)
        self.readout = check_readout(readout)
        self.batch_size, self.autocast, self.max_length = batch_size, autocast, max_length
        self.cache: dict[str, torch.Tensor] = {}
        self.label = label

    @property
    def dim(self) -> int:
        """The feature size: the base's hidden size (twice with ``mean_last``), plus :attr:`shape_dim`."""
        hidden = int(self.base.model.get_input_embeddings().weight.shape[1])
        return hidden * (2 if self.readout == "mean_last" else 1) + self.shape_dim

    @property
    def shape_dim(self) -> int:
        """How many trailing feature columns are the text's shape (0 without)."""
        return SHAPE_DIMS[self.shape]

    @property
    def spec(self) -> dict[str, Any]:
        """What a router fitted on these features needs again at test time (saved with a predictor): the
        keyword arguments ``layer``, ``readout`` and ``shape`` (its version) of this class, ``RoutingData`` and
        ``RoutePredictor``."""
        return {"layer": self.layer, "readout": self.readout, "shape": self.shape}

    @property
    def fraction(self) -> float:
        """The share of a base forward pass that one feature pass runs (blocks run / blocks)."""
        return self.layer / n_layers(self.base.model)

    def _tokens(self, texts: Sequence[str]) -> list[list[int]]:
        ids = self.base.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        half = self.max_length // 2
        return [x if len(x) <= self.max_length else x[:half] + x[-(self.max_length - half) :] for x in ids]

    @torch.no_grad()
    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The masked mean of hidden state ``layer`` over real tokens (then, with ``mean_last``, the last
        real token's state), fp32 ``[n, d]`` (``[n, 2d]``); rows are right-padded."""
        model = self.base.model
        captured: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple, output: object) -> None:
            captured["h"] = output[0] if isinstance(output, tuple) else output  # type: ignore[index]
            raise _Stop

        handle = _capture_module(model, self.layer).register_forward_hook(hook)
        try:
            with autocast_context(self.autocast, input_ids.device):
                model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        hidden = captured["h"].float()
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        if self.readout == "mean":
            return mean
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
        return torch.cat([mean, hidden[torch.arange(hidden.shape[0], device=hidden.device), last]], dim=1)

    def _pooled_texts(self, texts: list[str]) -> torch.Tensor:
        """:meth:`pooled` of ``texts``, in their order, fp32 on the CPU (length-sorted batches on the base's device)."""
        out = torch.empty((len(texts), self.dim - self.shape_dim))
        device = model_device(self.base.model)
        tokens = self._tokens(texts)
        batches = length_batches([len(x) for x in tokens], self.batch_size)
        for idx in bar(batches, f"{self.label} ({len(texts)} inputs)", unit="batch"):
            ids, mask = pad([tokens[i] for i in idx], self.base.tokenizer.pad_token_id)
            out[idx] = self.pooled(ids.to(device), mask.to(device)).cpu()
        return out

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Features of ``texts`` in their order, ``[n, d]`` fp32 on the CPU; known texts come from the cache.

        Args:
            texts: the routing texts (see :func:`routing_texts`).

        Returns:
            One row per text.
        """
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:  # split over the processes of a multi-process launch
            for text, row in zip(todo, map_rows(self._pooled_texts, todo), strict=True):
                self.cache[text] = row
        if not texts:
            return torch.empty((0, self.dim))
        pooled = torch.stack([self.cache[t] for t in texts])
        if not self.shape:
            return pooled
        shapes = torch.tensor([text_shape(t, self.shape) for t in texts], dtype=pooled.dtype)
        return torch.cat([pooled, shapes], dim=1)

    def features(self, task: TaskSpec, examples: Sequence[Example], on: str) -> torch.Tensor:
        """Features of ``examples`` of ``task`` routed on ``on`` (see :func:`routing_texts`)."""
        return self.encode(routing_texts(task, examples, on))
