"""CAMERO (Liang et al. 2022): members share the bottom layers' adapter, keep their own in the top
layers, see differently perturbed hidden states, and are pulled towards their mean by a consistency loss.

On the frozen LM, "the bottom layers" are the adapters of decoder layers ``0 .. shared_layers - 1``
(one shared LoRA per module), and the top layers' modules get one independent LoRA per member. The
perturbation is applied to the hidden states leaving the last shared layer (the input of the first
per-member layer); rows are member-contiguous, so every member gets its own dropout mask or noise draw.
The batch runs replicated K times from the embeddings on, so the shared bottom is computed K times;
that costs compute but keeps the forward the same batched pass as BatchEnsemble's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from adapterfuse.errors import ConfigError
from adapterfuse.train.pe.layers import layer_index


def n_layers(model: nn.Module) -> int:
    """The number of decoder layers of a causal LM."""
    return len(model.get_decoder().layers)


def shared_layer_count(model: nn.Module, requested: int | None) -> int:
    """The number of bottom layers whose adapter is shared (default: half, rounded down).

    Raises:
        ConfigError: more shared layers than the model has.
    """
    total = n_layers(model)
    count = total // 2 if requested is None else requested
    if count > total:
        raise ConfigError(
            f"camero_shared_layers {count}: the base has only {total} decoder layers; expected 0 .. {total}"
        )
    return count


def layout(modules: Sequence[str], shared_layers: int) -> dict[str, str]:
    """``shared`` for modules below ``shared_layers`` (and outside any layer), ``independent`` above."""
    out = {}
    for m in modules:
        idx = layer_index(m)
        out[m] = "shared" if idx is None or idx < shared_layers else "independent"
    return out


def _perturb(h: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    if kind == "dropout":
        return F.dropout(h, scale, training=True)
    rms = h.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt()
    return h + (scale * rms * torch.randn_like(h, dtype=torch.float32)).to(h.dtype)


@contextmanager
def perturbation(model: nn.Module, shared_layers: int, kind: str, scale: float) -> Iterator[None]:
    """Perturb the hidden states entering the first per-member layer while the block runs.

    Args:
        model: the adapted causal LM.
        shared_layers: the hook sits on the output of layer ``shared_layers - 1`` (the embeddings if 0).
        kind: ``dropout``, ``noise`` or ``none`` (no hook).
        scale: the dropout probability or the relative noise level (0: no hook).
    """
    if kind == "none" or scale == 0:
        yield
        return
    decoder = model.get_decoder()
    target = decoder.layers[shared_layers - 1] if shared_layers > 0 else model.get_input_embeddings()

    def hook(module: nn.Module, args: object, output: object) -> object:
        if isinstance(output, tuple):  # decoder layers may return (hidden, ...) depending on the version
            return (_perturb(output[0], kind, scale), *output[1:])
        return _perturb(output, kind, scale)

    handle = target.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def consistency_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean_k KL(p̄ ‖ p_k)``: each member's distribution against the members' mean.

    Args:
        logits: ``[K, n, L]`` member logits.

    Returns:
        A scalar (0 for identical members, and always for K = 1).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    mean_logp = torch.logsumexp(logp, dim=0) - torch.log(torch.tensor(float(logits.shape[0])))
    kl = (mean_logp.exp()[None] * (mean_logp[None] - logp)).sum(dim=-1)  # [K, n]
    return kl.mean()
