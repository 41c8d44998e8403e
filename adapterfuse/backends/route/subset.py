"""Greedy expert subset: which experts to keep loaded under a budget, by validation gain per expert.

Start with no expert; repeatedly add the expert whose addition raises the validation score most, until
the budget is reached. A subset is scored by routing every validation input to an expert of the subset
(by default the subset's best expert for that input, the ceiling any router over the subset can reach;
or by a router's probabilities restricted to the subset) and averaging the tasks' official metrics over
the cached answers, so no forward pass runs per candidate. Ties go to the earlier expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from adapterfuse.backends.route.data import PoolScores, top1_score
from adapterfuse.errors import ConfigError


@dataclass(frozen=True)
class Subset:
    """The kept experts and the quality-against-budget curve.

    Attributes:
        members: indices of the kept experts, in the order they were added.
        names: their names.
        curve: one entry per budget ``1 .. budget``: ``{"budget", "added", "members", "score"}``.
    """

    members: list[int]
    names: list[str]
    curve: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"members": self.names, "curve": self.curve}


def subset_score(scores: PoolScores, keep: list[int], probs: torch.Tensor | None = None) -> float:
    """The validation score when every input goes to one expert of ``keep``.

    Args:
        scores: cached answers of the whole pool.
        keep: expert indices allowed.
        probs: ``[N, E]`` router probabilities; ``None`` routes each input to its best kept expert.

    Returns:
        The mean over tasks of each task's score.
    """
    ranking = (probs if probs is not None else scores.quality)[:, keep]
    return top1_score(scores, torch.tensor(keep)[ranking.argmax(dim=1)])


def greedy_subset(scores: PoolScores, budget: int, probs: torch.Tensor | None = None) -> Subset:
    """Forward selection of at most ``budget`` experts by validation gain.

    Args:
        scores: cached answers of the pool on the validation split.
        budget: the most experts to keep (``1 .. E``).
        probs: optional router probabilities (see :func:`subset_score`).

    Returns:
        The :class:`Subset` with its curve (score at each budget).

    Raises:
        ConfigError: a budget outside ``1 .. E``.
    """
    e = len(scores.names)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= e:
        raise ConfigError(f"budget: expected an integer in 1 .. {e} (the number of experts), got {budget!r}")
    kept: list[int] = []
    curve: list[dict[str, Any]] = []
    for step in range(budget):
        best, best_score = -1, float("-inf")
        for cand in range(e):
            if cand in kept:
                continue
            value = subset_score(scores, [*kept, cand], probs)
            if value > best_score:
                best, best_score = cand, value
        kept.append(best)
        curve.append(
            {
                "budget": step + 1,
                "added": scores.names[best],
                "members": [scores.names[i] for i in kept],
                "score": best_score,
            }
        )
    return Subset(kept, [scores.names[i] for i in kept], curve)
