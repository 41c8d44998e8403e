"""Member weights: uniform, given, or learned on the validation split from cached member outputs.

Learning minimises the pooled validation loss (:func:`~adapterfuse.backends.ensemble.cache.pooled_nll`) with
L-BFGS on the cached ``[K, n, L]`` tensors; no model runs during the fit.

- linear pooling: weights on the simplex, ``w = softmax(θ)``; the temperature stays 1.
- log-linear pooling: the effective coefficients ``c_k = w_k / T`` are unconstrained (negative allowed:
  an anti-correlated member is *subtracted*). The pooled loss is convex in ``c`` (a multinomial logistic
  regression on the members' log-probabilities), so the fit is the global optimum. ``c`` is reported as
  weights with ``Σ|w| = 1`` and the learned temperature ``T = 1 / Σ|c|``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterfuse.backends.ensemble.cache import MemberCache, pooled_nll
from adapterfuse.backends.ensemble.pooling import check_pooling, check_temperature, check_weights
from adapterfuse.errors import ConfigError

WEIGHT_MODES = ("uniform", "learned")


@dataclass(frozen=True)
class WeightFit:
    """Weights for the members, their temperature, and how they were obtained.

    Attributes:
        weights: one weight per member.
        temperature: the pooling temperature.
        how: ``"uniform"``, ``"given"`` or ``"learned"``.
        report: what the fit did (losses before and after, iterations, named weights).
    """

    weights: list[float]
    temperature: float = 1.0
    how: str = "uniform"
    report: dict[str, Any] = field(default_factory=dict)


def uniform_weights(k: int) -> list[float]:
    """``K`` equal weights summing to 1."""
    return [1.0 / k] * k


def parse_weights(spec: str | Sequence[float]) -> str | list[float]:
    """``"uniform"``, ``"learned"`` or a list of numbers (also from text ``"0.5,0.3,0.2"``).

    Raises:
        ConfigError: for an unknown word or a list item that is not a number.
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in WEIGHT_MODES:
            return text
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"weights {spec!r}: expected 'uniform', 'learned' or comma-separated numbers like 0.5,0.3,0.2"
            ) from None
    if not isinstance(spec, Sequence):
        raise ConfigError(f"weights: expected 'uniform', 'learned' or a list of numbers, got {type(spec).__name__}")
    return list(spec)


def _lbfgs(params: list[torch.Tensor], objective, max_iter: int) -> int:
    """Minimise ``objective()`` over ``params`` with L-BFGS (strong Wolfe line search); return evaluations."""
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
    )
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return calls


def _fit_linear(caches: Sequence[MemberCache], k: int, l2: float, max_iter: int) -> tuple[list[float], float, int]:
    theta = torch.zeros(k, requires_grad=True)  # zeros = uniform: the fit starts from the uniform mixture

    def objective() -> torch.Tensor:
        return pooled_nll("linear", caches, torch.softmax(theta, 0)) + l2 * theta.pow(2).sum()

    calls = _lbfgs([theta], objective, max_iter)
    return torch.softmax(theta.detach(), 0).tolist(), 1.0, calls


def _fit_log_linear(caches: Sequence[MemberCache], k: int, l2: float, max_iter: int) -> tuple[list[float], float, int]:
    coef = torch.full((k,), 1.0 / k, requires_grad=True)

    def objective() -> torch.Tensor:
        # The small L2 keeps the optimum finite when a tiny validation set is perfectly separable.
        return pooled_nll("log_linear", caches, coef) + l2 * coef.pow(2).sum()

    calls = _lbfgs([coef], objective, max_iter)
    c = coef.detach()
    total = float(c.abs().sum())
    if total == 0:
        return c.tolist(), 1.0, calls
    return (c / total).tolist(), 1.0 / total, calls


def learn_weights(
    pooling: str,
    caches: Sequence[MemberCache],
    names: Sequence[str],
    seed: int = 0,
    l2: float = 1e-4,
    max_iter: int = 200,
) -> WeightFit:
    """Learn the members' weights (and, for log-linear pooling, the temperature) on cached validation outputs.

    Args:
        pooling: ``linear`` or ``log_linear``.
        caches: the members' cached validation log-probabilities (see ``cache_members``).
        names: the members' names, for the report.
        seed: seeds torch's RNG for the fit (L-BFGS itself is deterministic from its uniform start).
        l2: weight of the ridge penalty on the parameters.
        max_iter: L-BFGS iterations at most.

    Returns:
        The :class:`WeightFit`; if the fit does not lower the validation loss of uniform weights (it
        always should), uniform weights are returned and the report says so.

    Raises:
        ConfigError: an unknown pooling, no cached tasks, or a member count that differs from ``names``.
    """
    check_pooling(pooling)
    if not caches:
        raise ConfigError("learned weights: expected cached validation outputs of at least one task, got none")
    k = len(names)
    for c in caches:
        if c.log_probs.shape[0] != k:
            raise ConfigError(
                f"learned weights: task {c.task.name} has outputs of {c.log_probs.shape[0]} members, "
                f"expected {k} ({list(names)})"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fit = _fit_linear if pooling == "linear" else _fit_log_linear
        weights, temperature, calls = fit(caches, k, l2, max_iter)
    with torch.no_grad():
        before = float(pooled_nll(pooling, caches, uniform_weights(k)))
        after = float(pooled_nll(pooling, caches, weights, temperature))
    report = {
        "method": "lbfgs",
        "pooling": pooling,
        "seed": seed,
        "l2": l2,
        "evaluations": calls,
        "validation_nll_uniform": before,
        "validation_nll_learned": after,
        "weights": dict(zip(names, weights, strict=True)),
        "temperature": temperature,
    }
    if not (after <= before) or not all(map(math.isfinite, [*weights, temperature])):
        report["fallback"] = "the fit did not improve on uniform weights; kept uniform"
        return WeightFit(uniform_weights(k), 1.0, "uniform", report)
    return WeightFit(weights, temperature, "learned", report)


def resolve_weights(
    spec: str | Sequence[float],
    pooling: str,
    names: Sequence[str],
    caches: Sequence[MemberCache] | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> WeightFit:
    """Turn a weights spec into weights for ``names``.

    Args:
        spec: ``"uniform"``, ``"learned"`` or one number per member.
        pooling: the pooling the weights are for.
        names: the members.
        caches: cached validation outputs; required for ``"learned"``.
        temperature: the temperature for uniform and given weights.
        seed: the seed of a learned fit.

    Returns:
        The :class:`WeightFit`.

    Raises:
        ConfigError: see :func:`parse_weights`, :func:`~adapterfuse.backends.ensemble.pooling.check_weights`, and
            ``"learned"`` without cached validation outputs.
    """
    mode = parse_weights(spec)
    if mode == "uniform":
        return WeightFit(uniform_weights(len(names)), check_temperature(temperature), "uniform")
    if mode == "learned":
        if not caches:
            raise ConfigError(
                "weights 'learned': expected validation data to learn them on, got none; pass "
                "validation=[TaskData, ...] or use weights='uniform'"
            )
        return learn_weights(pooling, caches, names, seed)
    return WeightFit(check_weights(mode, names, pooling), check_temperature(temperature), "given")
