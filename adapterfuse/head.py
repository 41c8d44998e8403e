"""Texts + task -> class probabilities, read off the label words at the last position; and the loss on them.

This is the one place that knows how a prediction is read and scored. Every predictor (an expert, a
merge, an ensemble, a router's choice) answers with the LM's next-token distribution restricted to the
task's label words: the final hidden state at the last real token times those words' output embeddings
(:func:`read_labels`). The full-vocabulary head (49k words here) is never computed, for scoring or for
training. The same label words define the loss (:func:`task_loss`: cross-entropy, and for regression a
soft target between the two nearest score levels) and each example's log-likelihood of its gold label
(:func:`label_log_likelihood`), with the same soft target.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from adapterfuse.device import autocast_dtype, model_device
from adapterfuse.errors import ConfigError
from adapterfuse.tasks.spec import Example, TaskSpec

DEFAULT_MAX_LENGTH = 256


@dataclass(frozen=True)
class Scoring:
    """How a predictor runs its inputs through the base: the settings that travel together from a config
    to every pass (a saved predictor keeps them in its manifest as ``"scoring"``).

    Attributes:
        batch_size: inputs per forward pass (batched by similar length).
        autocast: run the frozen base under bf16 autocast where the device supports it (label logits stay fp32).
        max_length: prompt length cap in tokens (see :func:`encode`).
    """

    batch_size: int = 32
    autocast: bool = True
    max_length: int = DEFAULT_MAX_LENGTH


def label_token_ids(task: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token id of each of the task's label words.

    Raises:
        ConfigError: if a label word is not exactly one token of this tokenizer.
    """
    ids = []
    for word in task.label_words:
        toks = tokenizer.encode(word, add_special_tokens=False)
        if len(toks) != 1:
            raise ConfigError(
                f"task {task.name}: label word {word!r} is {len(toks)} tokens {toks} in this "
                "tokenizer; expected exactly 1; choose label words that are single tokens"
            )
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"task {task.name}: label words {task.label_words} map to repeated token ids {ids}")
    return ids


def encode(
    task: TaskSpec,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> list[list[int]]:
    """Tokenize the prompts of ``examples``.

    A prompt longer than ``max_length`` keeps its first and last ``max_length // 2`` tokens: the
    instruction and the answer cue at the end both survive, only the middle of a long passage goes.
    """
    ids = tokenizer([task.prompt(e.fields) for e in examples], add_special_tokens=True)["input_ids"]
    half = max_length // 2
    return [x if len(x) <= max_length else x[:half] + x[-(max_length - half) :] for x in ids]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted), so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask)``.

    Right padding keeps every real token at its true position, so no position ids are needed and a
    row's result does not depend on what else is in the batch.
    """
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, x in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    return ids, mask


def causal_lm(model: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` of a plain or PEFT-wrapped model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def autocast_context(enabled: bool, device: torch.device | str = "cpu"):
    """bf16 autocast for the frozen base where ``device`` supports it (see :func:`adapterfuse.device.autocast_dtype`);
    fp32 when disabled or unsupported."""
    dtype = autocast_dtype(device) if enabled else None
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's hidden state at its last real token: ``[n, T, d]`` -> ``[n, d]`` (right-padded rows)."""
    last = attention_mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden state at each row's last real token, ``[n, d]``."""
    decoder = causal_lm(model).get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return last_token(hidden, attention_mask)


def read_labels(model: nn.Module, hidden: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """Label-word logits of final hidden states: ``hidden`` times the label words' output embeddings, in fp32.

    Args:
        model: a causal LM, plain or with PEFT adapters (its output embeddings are read).
        hidden: ``[..., d]`` fp32 final hidden states (the answer positions only).
        label_ids: the label words' token ids.

    Returns:
        ``[..., n_labels]``: the same numbers the full LM head would give for those words.
    """
    head = causal_lm(model).get_output_embeddings()
    idx = torch.as_tensor(label_ids, device=hidden.device)
    logits = hidden @ head.weight[idx].float().T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[idx].float()
    return logits


def label_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_ids: Sequence[int]
) -> torch.Tensor:
    """Next-token logits over the label words only, in fp32, ``[n, n_labels]``.

    Args:
        model: a causal LM, plain or with PEFT adapters.
        input_ids: ``[n, T]`` right-padded tokens.
        attention_mask: ``[n, T]``.
        label_ids: the label words' token ids.

    Returns:
        The same numbers the full LM head would give at those positions and words.
    """
    return read_labels(model, last_hidden(model, input_ids, attention_mask).float(), label_ids)


def member_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    label_ids: Sequence[int],
    k: int,
    replicate: bool = True,
) -> torch.Tensor:
    """Label-word logits of a model whose batch rows are ``k`` member-contiguous blocks, fp32 ``[k, n, n_labels]``.

    The token embeddings are looked up once for the given rows; with ``replicate`` they (and the mask)
    are repeated once per member, so every member answers every input in one forward pass (rows
    ``j*n .. (j+1)*n - 1`` belong to member ``j``). Gradients flow when the caller allows them.

    Args:
        model: a plain causal LM whose adapted layers split the rows by member.
        input_ids: ``[n, T]`` right-padded tokens, or ``[k*n, T]`` member blocks when not ``replicate``.
        attention_mask: the same shape as ``input_ids``.
        label_ids: the label words' token ids.
        k: the number of members.
        replicate: repeat the rows once per member; with ``False`` the rows already are ``k`` member blocks.

    Returns:
        Member ``j``'s logits in ``[j]``.
    """
    embeds = model.get_input_embeddings()(input_ids)  # looked up once, then shared by the members
    if replicate and k > 1:
        embeds, attention_mask = embeds.repeat(k, 1, 1), attention_mask.repeat(k, 1)
    hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
    logits = read_labels(model, last_token(hidden, attention_mask).float(), label_ids)
    return logits.view(k, -1, logits.shape[-1])


def iter_batches(
    task: TaskSpec,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, input_ids, attention_mask)`` over length-sorted batches of ``examples``."""
    encoded = encode(task, examples, tokenizer, max_length)
    for idx in length_batches([len(x) for x in encoded], batch_size):
        ids, mask = pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        yield idx, ids, mask


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    examples: Sequence[Example],
    batch_size: int = 32,
    autocast: bool = True,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> torch.Tensor:
    """Class probabilities of ``examples`` under ``model``, in the input order.

    Args:
        model: a causal LM, plain or with PEFT adapters.
        tokenizer: its tokenizer.
        task: the task whose prompt and label words to use.
        examples: the inputs.
        batch_size: rows per forward pass (batches are formed by similar length).
        autocast: run the base under bf16 autocast (label logits are always fp32).
        max_length: prompt length cap (see :func:`encode`).

    Returns:
        ``[n, n_labels]`` fp32 probabilities, softmax over the label words.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
    labels = label_token_ids(task, tokenizer)
    out = torch.empty((len(examples), len(labels)), dtype=torch.float32)
    device = model_device(model)
    for idx, ids, mask in iter_batches(task, examples, tokenizer, batch_size, max_length):
        with autocast_context(autocast, device):
            logits = label_logits(model, ids.to(device), mask.to(device), labels)
        out[idx] = torch.softmax(logits.float(), dim=-1).cpu()
    return out


def predictions(task: TaskSpec, probs: torch.Tensor) -> list[float]:
    """Read predictions off probabilities: the argmax class, or the expected score for regression."""
    if task.regression:
        values = torch.arange(probs.shape[1], dtype=probs.dtype)
        return (probs @ values).tolist()
    return probs.argmax(dim=1).tolist()


def _soft_levels(
    task: TaskSpec, labels: Sequence[float], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A regression label as weights on its two nearest score levels: ``(lo, hi, frac)``.

    The target puts ``1 - frac`` on level ``lo`` and ``frac`` on ``hi = lo + 1`` (labels clamped to the
    levels' range; at the top level ``hi == lo`` and ``frac == 0``), on ``device`` (the CPU by default).
    """
    y = torch.tensor(labels, dtype=torch.float32, device=device).clamp(0, task.n_labels - 1)
    lo = y.floor().long()
    hi = (lo + 1).clamp(max=task.n_labels - 1)
    return lo, hi, y - lo


def task_loss(
    task: TaskSpec, logits: torch.Tensor, labels: Sequence[float], class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The label-word loss: mean cross-entropy, for regression against the soft target of two levels.

    Args:
        task: the task (its ``regression`` flag and number of labels).
        logits: ``[n, n_labels]`` label-word logits (or log-probabilities: only their softmax matters).
        labels: the ``n`` gold labels (class indices, or scores for regression).
        class_weights: per-class weights of the classification loss (see :func:`class_weights`).

    Returns:
        A scalar fp32 loss, differentiable in ``logits``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    if not task.regression:  # targets and weights go to the logits' device, so the loss is computed there
        weight = class_weights.to(logp.device) if class_weights is not None else None
        return F.nll_loss(logp, torch.tensor(labels, dtype=torch.long, device=logp.device), weight=weight)
    return -(soft_targets(task, labels, logp.device) * logp).sum(dim=1).mean()


def soft_targets(task: TaskSpec, labels: Sequence[float], device: torch.device | None = None) -> torch.Tensor:
    """The target distribution over the label words, ``[n, n_labels]`` fp32 on ``device`` (the CPU by default):
    one-hot for classification, for regression ``1 - frac`` and ``frac`` on the label's two nearest levels."""
    target = torch.zeros(len(labels), task.n_labels, dtype=torch.float32, device=device)
    if not task.regression:
        ids = torch.tensor([int(v) for v in labels], dtype=torch.long, device=device)
        return target.scatter_(1, ids[:, None], 1.0)
    lo, hi, frac = _soft_levels(task, labels, device)
    target.scatter_add_(1, lo[:, None], (1 - frac)[:, None])
    target.scatter_add_(1, hi[:, None], frac[:, None])
    return target


def label_log_likelihood(task: TaskSpec, log_probs: torch.Tensor, labels: Sequence[float]) -> torch.Tensor:
    """Each example's log-likelihood of its gold label, with the soft target of :func:`task_loss` for regression.

    Args:
        task: the task.
        log_probs: ``[..., n, n_labels]`` log-probabilities over the label words (e.g. ``[K, n, L]`` members).
        labels: the ``n`` gold labels.

    Returns:
        ``[..., n]``; higher is better.
    """
    lp = log_probs.float()
    rows = torch.arange(len(labels), device=lp.device)
    if not task.regression:
        return lp[..., rows, torch.tensor([int(v) for v in labels], dtype=torch.long, device=lp.device)]
    lo, hi, frac = _soft_levels(task, labels, lp.device)
    return (1 - frac) * lp[..., rows, lo] + frac * lp[..., rows, hi]


def class_weights(task: TaskSpec, examples: Sequence[Example], balance: bool) -> torch.Tensor | None:
    """Inverse class frequencies for the loss when ``balance`` (classification only), else ``None``.

    Args:
        task: the task.
        examples: the training examples whose labels are counted.
        balance: whether to weight classes at all.

    Returns:
        ``[n_labels]`` weights ``n / (n_labels * count)`` (a class never seen counts as 1), or ``None``.
    """
    if not balance or task.regression:
        return None
    counts = torch.bincount(torch.tensor([int(e.label) for e in examples]), minlength=task.n_labels).float()
    return counts.sum() / (task.n_labels * counts.clamp(min=1))
