"""Choosing members on the validation split, from cached member outputs (no model forward per candidate).

- ``greedy``: forward selection with replacement (Caruana et al., 2004, "Ensemble selection from
  libraries of models"): start empty; repeatedly add the member whose addition gives the best pooled
  validation score; stop when no addition improves it. A member added ``c`` times gets weight
  ``c / total``. The first pick is the best single member, and later picks only ever improve the score,
  so the result is never worse on validation than the best single member.
- ``top_k``: the ``k`` members with the best single-member validation scores, weighted uniformly.

Ties are broken by member name (the alphabetically first wins), so both are deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterfuse.backends.ensemble.cache import MemberCache, pooled_score
from adapterfuse.backends.ensemble.pooling import check_pooling
from adapterfuse.errors import ConfigError


@dataclass(frozen=True)
class Selection:
    """The chosen members and their weights.

    Attributes:
        members: indices of the distinct chosen members, in order of first pick.
        names: their names.
        weights: one weight per chosen member (summing to 1).
        score: the pooled validation score of the choice.
        method: ``"greedy"`` or ``"topK"``.
        history: one entry per step (greedy) or per member (top-k) with the scores seen.
    """

    members: list[int]
    names: list[str]
    weights: list[float]
    score: float
    method: str
    history: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "method": self.method,
            "members": self.names,
            "weights": dict(zip(self.names, self.weights, strict=True)),
            "validation_score": self.score,
            "history": self.history,
        }


def parse_select(spec: str | None) -> tuple[str, int] | None:
    """``None``, ``"greedy"`` or ``"topK"`` (e.g. ``"top3"``) -> ``None``, ``("greedy", 0)``, ``("top", K)``.

    Raises:
        ConfigError: for anything else.
    """
    if spec is None or spec == "":
        return None
    text = spec.strip().lower()
    if text == "greedy":
        return ("greedy", 0)
    match = re.fullmatch(r"top[-_]?(\d+)", text)
    if match and int(match.group(1)) >= 1:
        return ("top", int(match.group(1)))
    raise ConfigError(f"select {spec!r}: unknown; expected 'greedy' or 'topK' with K >= 1 (e.g. 'top3')")


def _check(caches: Sequence[MemberCache], names: Sequence[str], pooling: str) -> None:
    check_pooling(pooling)
    if not caches:
        raise ConfigError("selection: expected cached validation outputs of at least one task, got none")
    if not names:
        raise ConfigError("selection: expected at least one member, got none")
    for c in caches:
        if c.log_probs.shape[0] != len(names):
            raise ConfigError(
                f"selection: task {c.task.name} has outputs of {c.log_probs.shape[0]} members, "
                f"expected {len(names)} ({list(names)})"
            )


def single_scores(caches: Sequence[MemberCache], names: Sequence[str], metric: str = "score") -> list[float]:
    """Each member's own validation score (pooling one member is that member, whatever the pooling)."""
    out = []
    for i in range(len(names)):
        one = torch.zeros(len(names))
        one[i] = 1.0
        out.append(pooled_score("linear", caches, one, metric=metric))
    return out


def greedy(
    caches: Sequence[MemberCache],
    names: Sequence[str],
    pooling: str = "log_linear",
    metric: str = "score",
    max_steps: int = 50,
) -> Selection:
    """Greedy forward selection with replacement (see the module docstring).

    Args:
        caches: cached member validation outputs.
        names: the members' names (tie-break order).
        pooling: how the chosen members are pooled while selecting.
        metric: ``"score"`` (task metrics) or ``"nll"``.
        max_steps: at most this many additions.

    Returns:
        The :class:`Selection`.

    Raises:
        ConfigError: no caches or members, an unknown pooling or metric, or mismatched member counts.
    """
    _check(caches, names, pooling)
    order = sorted(range(len(names)), key=lambda i: names[i])  # tie-break: the first name wins
    counts = torch.zeros(len(names))
    best_score, history, picks = float("-inf"), [], []
    for step in range(max_steps):
        pick, pick_score = None, float("-inf")
        for i in order:
            trial = counts.clone()
            trial[i] += 1
            score = pooled_score(pooling, caches, trial / trial.sum(), metric=metric)
            if score > pick_score:  # strict: an equal score later in name order never displaces a pick
                pick, pick_score = i, score
        if pick is None or pick_score <= best_score:
            break
        counts[pick] += 1
        best_score = pick_score
        picks.append(pick)
        history.append({"step": step + 1, "added": names[pick], "score": pick_score})
    chosen = list(dict.fromkeys(picks))
    total = float(counts.sum())
    return Selection(
        chosen, [names[i] for i in chosen], [float(counts[i]) / total for i in chosen], best_score, "greedy", history
    )


def top_k(
    caches: Sequence[MemberCache], names: Sequence[str], k: int, pooling: str = "log_linear", metric: str = "score"
) -> Selection:
    """The ``k`` best single members on validation, weighted uniformly.

    Args:
        caches: cached member validation outputs.
        names: the members' names (tie-break order).
        k: how many to keep (all if ``k`` exceeds the members).
        pooling: how the chosen members are pooled (for the reported score).
        metric: ``"score"`` or ``"nll"``.

    Returns:
        The :class:`Selection`.

    Raises:
        ConfigError: ``k < 1``, and see :func:`greedy`.
    """
    _check(caches, names, pooling)
    if k < 1:
        raise ConfigError(f"top_k: expected k >= 1, got {k}")
    singles = single_scores(caches, names, metric)
    ranked = sorted(range(len(names)), key=lambda i: (-singles[i], names[i]))[:k]
    weights = torch.zeros(len(names))
    weights[ranked] = 1.0 / len(ranked)
    score = pooled_score(pooling, caches, weights, metric=metric)
    history = [{"member": names[i], "single_score": singles[i]} for i in ranked]
    return Selection(ranked, [names[i] for i in ranked], [1.0 / len(ranked)] * len(ranked), score, f"top{k}", history)


def select_members(
    spec: str | None, caches: Sequence[MemberCache], names: Sequence[str], pooling: str, metric: str = "score"
) -> Selection | None:
    """Run the selection named by ``spec`` (see :func:`parse_select`); ``None`` keeps every member."""
    parsed = parse_select(spec)
    if parsed is None:
        return None
    kind, k = parsed
    return greedy(caches, names, pooling, metric) if kind == "greedy" else top_k(caches, names, k, pooling, metric)
