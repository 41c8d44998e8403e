"""Pooling K members' distributions over the label words: pure functions on ``[K, n, L]`` tensors.

- ``linear``: the weighted mean of the members' probabilities (a mixture; weights >= 0).
- ``log_linear``: the weighted sum of the members' log-probabilities, divided by a temperature and
  renormalised with a softmax (a product of experts; weights may be negative, which *subtracts* a
  member's opinion).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from adapterfuse.errors import ConfigError

POOLINGS = ("linear", "log_linear")


def check_pooling(pooling: str) -> str:
    """Return ``pooling`` if it is known.

    Raises:
        ConfigError: naming the pooling and the known ones.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling {pooling!r}: unknown; expected one of {', '.join(POOLINGS)}")
    return pooling


def check_weights(weights: Sequence[float], names: Sequence[str], pooling: str) -> list[float]:
    """Validate one weight per member for a pooling.

    Args:
        weights: the weights.
        names: the members' names (their count is what ``weights`` must match).
        pooling: ``linear`` (weights >= 0, positive sum) or ``log_linear`` (any finite weights).

    Returns:
        The weights as floats.

    Raises:
        ConfigError: a count mismatch, a non-number, NaN/inf, or a negative/all-zero linear weight.
    """
    check_pooling(pooling)
    values = list(weights)
    if len(values) != len(names):
        raise ConfigError(
            f"weights: got {len(values)} weights for {len(names)} members {list(names)}; expected one weight per member"
        )
    out = []
    for name, w in zip(names, values, strict=True):
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ConfigError(f"weights: weight of member {name!r} is {w!r}; expected a number") from None
        if not math.isfinite(w):
            raise ConfigError(f"weights: weight of member {name!r} is {w}; expected a finite number (no NaN/inf)")
        if pooling == "linear" and w < 0:
            raise ConfigError(
                f"weights: weight of member {name!r} is {w}; linear pooling mixes probabilities, "
                "so expected weights >= 0 (use log_linear pooling for negative weights)"
            )
        out.append(w)
    if pooling == "linear" and sum(out) <= 0:
        raise ConfigError(f"weights: linear pooling needs a positive total weight, got {out}")
    return out


def check_temperature(temperature: float) -> float:
    """Return the temperature if it is a finite number > 0.

    Raises:
        ConfigError: otherwise.
    """
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ConfigError(f"temperature: expected a finite number > 0, got {temperature}")
    return t


def _column(weights: torch.Tensor | Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Weights as a ``[K, 1, 1]`` tensor matching ``like``'s dtype and device."""
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.dim() != 1 or w.shape[0] != like.shape[0]:
        raise ConfigError(f"weights: got shape {tuple(w.shape)} for {like.shape[0]} members; expected one per member")
    return w.view(-1, 1, 1)


def linear(probs: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """The weighted mean of the members' probabilities.

    Args:
        probs: ``[K, n, L]`` member probabilities.
        weights: ``K`` weights >= 0 (normalised by their sum here).

    Returns:
        ``[n, L]`` probabilities.
    """
    w = _column(weights, probs)
    return (w * probs).sum(dim=0) / w.sum()


def log_linear(
    log_probs: torch.Tensor, weights: torch.Tensor | Sequence[float], temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``softmax(Σ_k w_k log p_k / T)``: the renormalised weighted product of the members.

    Args:
        log_probs: ``[K, n, L]`` member log-probabilities.
        weights: ``K`` finite weights (negative allowed).
        temperature: ``T > 0``; below 1 sharpens, above 1 flattens.

    Returns:
        ``[n, L]`` probabilities.
    """
    return log_linear_log_probs(log_probs, weights, temperature).exp()


def log_linear_log_probs(
    log_probs: torch.Tensor, weights: torch.Tensor | Sequence[float], temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Log of :func:`log_linear` (differentiable in weights and temperature)."""
    w = _column(weights, log_probs)
    # 0 · (-inf) would be NaN: a member with weight 0 must contribute nothing, however sure it is.
    terms = torch.where(w == 0, torch.zeros_like(log_probs), w * log_probs)
    return torch.log_softmax(terms.sum(dim=0) / temperature, dim=-1)


def linear_log_probs(
    log_probs: torch.Tensor, weights: torch.Tensor | Sequence[float], temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Log of :func:`linear`, computed stably in log space, then tempered (``T = 1``: unchanged).

    Args:
        log_probs: ``[K, n, L]`` member log-probabilities.
        weights: ``K`` weights >= 0.
        temperature: applied to the mixture as ``softmax(log p / T)``.

    Returns:
        ``[n, L]`` log-probabilities.
    """
    w = _column(weights, log_probs)
    mixed = torch.logsumexp(torch.log(w) + log_probs, dim=0) - torch.log(w.sum())
    if isinstance(temperature, (int, float)) and temperature == 1:
        return mixed
    return torch.log_softmax(mixed / temperature, dim=-1)


def pooled_log_probs(
    pooling: str,
    log_probs: torch.Tensor,
    weights: torch.Tensor | Sequence[float],
    temperature: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """The pooled log-probabilities ``[n, L]`` of ``[K, n, L]`` member log-probabilities.

    Raises:
        ConfigError: for an unknown pooling.
    """
    if check_pooling(pooling) == "linear":
        return linear_log_probs(log_probs, weights, temperature)
    return log_linear_log_probs(log_probs, weights, temperature)


def pool(
    pooling: str,
    log_probs: torch.Tensor,
    weights: torch.Tensor | Sequence[float],
    temperature: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """The pooled probabilities ``[n, L]`` (see :func:`pooled_log_probs`)."""
    return pooled_log_probs(pooling, log_probs, weights, temperature).exp()
