"""Expected-score routing: send an input to the expert with the best expected score, not the likeliest task.

A task-target router gives, for each input, a posterior ``p(j | x)`` over which expert's task the input
came from. Keeping its most probable expert treats every mistake as equally bad, and they are not. On
the raw GLUE fields the router's main doubt is STS-B against RTE. STS-B's expert on an RTE input scores
0.56 against RTE's own 0.75, but RTE's expert on an STS-B input scores -0.06 against 0.81: for an input
that is one or the other with even odds, STS-B's expert is by far the safer answer.

The decision-theoretic choice is the expert of highest expected score under the posterior,

    EU(e | x) = sum_j p(j | x) U[e, j],

where ``U[e, j]`` is expert ``e``'s score (the task's own metric) on the validation inputs of the
task(s) whose own expert is ``j``: the same validation answers every router is fitted on, so it costs no
extra pass. Because the harness averages each task's metric over tasks, the balanced posterior a
router fitted on equal numbers per task gives is the right weight here (a small task's inputs count
more per input, and are rarer, in equal measure). :class:`UtilityRouter` wraps a fitted router: its
:meth:`~UtilityRouter.probs` are the inner posterior; :meth:`~UtilityRouter.choose` orders the experts
by expected score and weights the kept ones by their posterior, renormalised.
"""

from __future__ import annotations

from typing import Any

import torch

from adapterfuse.backends.route.data import PoolScores
from adapterfuse.backends.route.routers.base import Router, check_top_k, keep_weights, load_router, register
from adapterfuse.errors import ConfigError


def utility_matrix(scores: PoolScores) -> torch.Tensor:
    """``U[e, j]``: expert ``e``'s validation score on the task(s) whose own expert is ``j`` (their mean).

    A column whose expert serves no validation task is NaN (unknown): a task-target router never learns
    to predict it, and :func:`expected_scores` leaves its posterior out.

    Args:
        scores: the pool's cached validation answers (``caches`` in task order, ``own`` per row).

    Returns:
        ``[E, E]`` fp32, NaN in the columns of experts that serve no validation task.
    """
    n_experts = len(scores.names)
    total, count = torch.zeros(n_experts, n_experts), torch.zeros(n_experts)
    start = 0
    for cache in scores.caches:
        n = cache.log_probs.shape[1]
        own = int(scores.own[start]) if n else -1
        start += n
        if own < 0:
            continue
        for e in range(n_experts):
            total[e, own] += cache.score(cache.log_probs[e].float().exp())
        count[own] += 1
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def expected_scores(posterior: torch.Tensor, utility: torch.Tensor) -> torch.Tensor:
    """``[n, E]`` expected score of each expert: ``posterior @ U.T``, over the columns that serve a task.

    Args:
        posterior: ``[n, E]`` the router's ``p(j | x)``.
        utility: ``[E, E]`` (see :func:`utility_matrix`).
    """
    served = ~utility.isnan().any(dim=0)
    weights = posterior * served.to(posterior.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-30)
    return weights @ utility.nan_to_num(0.0).T.to(posterior.dtype)


@register
class UtilityRouter(Router):
    """A task-target router whose choice is the expert of highest expected validation score.

    Args:
        inner: the fitted router giving ``p(j | x)`` (a learned router with target ``"task"``).
        utility: ``[E, E]`` expert-by-task validation scores (see :func:`utility_matrix`).

    Raises:
        ConfigError: a utility matrix that is not ``[E, E]`` for the inner router's ``E``.
    """

    kind = "utility"

    def __init__(self, inner: Router, utility: torch.Tensor) -> None:
        n = inner.n_experts
        if tuple(utility.shape) != (n, n):
            raise ConfigError(f"utility: expected a [{n}, {n}] matrix (experts x experts), got {list(utility.shape)}")
        self.inner, self.utility, self.n_experts = inner, utility.float(), n

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner.probs(features)

    def choose(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` experts of highest expected score (ties: lower index), weighted by their posterior."""
        check_top_k(k, self.n_experts)
        posterior = self.probs(features)
        order = torch.sort(expected_scores(posterior, self.utility), dim=1, descending=True, stable=True)[1]
        return keep_weights(posterior, order, k)

    def config(self) -> dict[str, Any]:
        return {"n_experts": self.n_experts, "inner": {"kind": self.inner.kind, "config": self.inner.config()}}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"utility": self.utility, **{f"inner.{k}": v for k, v in self.inner.tensors().items()}}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> UtilityRouter:
        inner = {k[len("inner.") :]: v for k, v in tensors.items() if k.startswith("inner.")}
        return cls(load_router(config["inner"]["kind"], config["inner"]["config"], inner), tensors["utility"])
