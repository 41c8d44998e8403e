"""Choosing the weight of the ``task_prior`` target by cross-validation on the validation split.

The likelihood target lets a router send an input to whichever expert answers it best, which may beat
the oracle (each input to its own task's expert) but over-fits a few hundred inputs; the task target
ties the oracle at best. ``task_prior`` adds a weighted cross-entropy towards the own task's expert to
the likelihood. Which weight generalises is an empirical question, so each candidate weight is judged
by its out-of-fold routing: the validation rows are cut into folds (stratified by task, seeded), each
fold is routed by a router fitted on the other folds, and the out-of-fold top-1 choices are scored with
each task's official metric (:func:`~adapterfuse.backends.route.data.routed_score`). The best weight wins; ties
go to the larger weight, the one closer to the oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adapterfuse.backends.route.data import PoolScores, oracle_score, top1_score
from adapterfuse.backends.route.routers.learned import FitOptions, LearnedRouter
from adapterfuse.errors import ConfigError

PRIOR_GRID = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def stratified_folds(tasks: Sequence[str], k: int, seed: int) -> torch.Tensor:
    """Assign each row to one of ``k`` folds, each task's rows spread evenly (a seeded shuffle per task).

    Args:
        tasks: the task name of each row.
        k: the number of folds (at least 2).
        seed: seed of the shuffle.

    Returns:
        ``[N]`` fold index per row.

    Raises:
        ConfigError: ``k < 2`` or a task with fewer than ``k`` rows.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(f"cv_folds: expected an integer >= 2, got {k!r}")
    fold = torch.empty(len(tasks), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    for name in dict.fromkeys(tasks):
        rows = torch.tensor([i for i, t in enumerate(tasks) if t == name])
        if len(rows) < k:
            raise ConfigError(
                f"cv_folds: task {name} has {len(rows)} validation inputs, fewer than the {k} folds; "
                "lower cv_folds or give more validation inputs"
            )
        fold[rows[torch.randperm(len(rows), generator=generator)]] = torch.arange(len(rows)) % k
    return fold


def out_of_fold_top1(
    features: torch.Tensor, scores: PoolScores, fold: torch.Tensor, prior_weight: float, **fit: Any
) -> torch.Tensor:
    """Each row's top-1 expert from a ``task_prior`` router fitted on the other folds.

    Args:
        features: ``[N, d]`` validation features.
        scores: the pool's cached answers on the same rows.
        fold: ``[N]`` fold index per row.
        prior_weight: the prior's weight.
        **fit: fields of the :class:`FitOptions` of each fit (hidden, epochs, lr, seed, pca, pca_keep).

    Returns:
        ``[N]`` expert indices.
    """
    chosen = torch.empty(len(fold), dtype=torch.long)
    for f in fold.unique().tolist():
        train, held = fold != f, fold == f
        options = FitOptions(target="task_prior", prior_weight=prior_weight, **fit)
        router = LearnedRouter.fit(
            features[train], scores.quality[train], len(scores.names), options, scores.own[train]
        )
        chosen[held] = router.probs(features[held]).argmax(dim=1)
    return chosen


def choose_prior_weight(
    features: torch.Tensor,
    scores: PoolScores,
    tasks: Sequence[str],
    k: int = 5,
    grid: Sequence[float] = PRIOR_GRID,
    seed: int = 0,
    **fit: Any,
) -> tuple[float, dict[str, Any]]:
    """The prior weight whose out-of-fold top-1 routing scores best on validation.

    Args:
        features: ``[N, d]`` validation features.
        scores: the pool's cached answers (rows in the same order).
        tasks: the task name of each row.
        k: the number of folds.
        grid: candidate weights.
        seed: seed of the folds and of each fit.
        **fit: fields of the :class:`FitOptions` of each fit (hidden, epochs, lr, pca, pca_keep).

    Returns:
        ``(weight, report)``; the report lists each weight's out-of-fold score and routing accuracy, and
        the oracle's score on the same rows.

    Raises:
        ConfigError: an empty grid, a negative weight, or too few rows per task for ``k`` folds.
    """
    if not grid or any(not w >= 0 for w in grid):
        raise ConfigError(f"prior grid: expected non-negative weights, got {list(grid)}")
    fold = stratified_folds(tasks, k, seed)
    rows = []
    for weight in grid:
        chosen = out_of_fold_top1(features, scores, fold, float(weight), seed=seed, **fit)
        rows.append(
            {
                "prior_weight": float(weight),
                "score": top1_score(scores, chosen),
                "oracle_accuracy": float((chosen == scores.own).float().mean()),
            }
        )
    best = max(rows, key=lambda r: (round(r["score"], 12), r["prior_weight"]))
    report = {"folds": k, "grid": rows, "chosen": best["prior_weight"]}
    oracle = oracle_score(scores)
    if oracle is not None:
        report["oracle_score"] = oracle
    return best["prior_weight"], report
