"""Out-of-task detection: can a predictor's uncertainty tell inputs of a task no expert knows from its own?

Each input is scored with its own task's prompt and label words, so the uncertainties are divided by
``log(n_labels)`` (the entropy of a uniform answer) to put tasks with 2 and 6 label words on one scale.
Predictors that expose their members (ensembles, MC-dropout, parameter-efficient ensembles) are also
scored by the members' disagreement (mutual information, uniform over members).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch

from adapterfuse.distributed import map_rows
from adapterfuse.errors import ConfigError
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec
from adapterfuse.uncertainty import auroc, mutual_information, normalised_entropy

Score = Literal["entropy", "mutual_information"]


def member_pooler(predictor: Any, task: TaskSpec) -> Any | None:
    """The predictor that pools members to answer ``task`` (the predictor itself, or the task's own one for a
    predictor told the task), or ``None`` when there are no members to disagree.

    A pooler has ``member_log_probs(task, batch) -> [K, n, n_labels]`` and ``pool_members(log_probs) -> [n,
    n_labels]``, and its ``predict_proba`` is the one composed with the other.
    """
    own = predictor.for_task(task) if hasattr(predictor, "for_task") else predictor
    return own if hasattr(own, "pool_members") else None


def probs_and_uncertainty(
    predictor: Any, task: TaskSpec, examples: Sequence[Example]
) -> tuple[torch.Tensor, dict[Score, torch.Tensor]]:
    """A predictor's probabilities and each input's uncertainty scores, the members run once.

    Args:
        predictor: any predictor; a member pooler (see :func:`member_pooler`) also gets
            ``"mutual_information"``.
        task: the inputs' task.
        examples: the inputs.

    Returns:
        ``([n, n_labels] probabilities, {"entropy": [n]} (plus ``"mutual_information": [n]``))``, the scores
        divided by ``log(n_labels)`` so that they lie in ``[0, 1]``.
    """
    pooler = member_pooler(predictor, task)
    if pooler is None:
        probs = map_rows(partial(predictor.predict_proba, task), examples)
        return probs, {"entropy": normalised_entropy(task, probs)}
    members = map_rows(partial(pooler.member_log_probs, task), examples, dim=1)
    probs = pooler.pool_members(members)
    scores: dict[Score, torch.Tensor] = {
        "entropy": normalised_entropy(task, probs),
        "mutual_information": mutual_information(members.exp()) / math.log(task.n_labels),
    }
    return probs, scores


def uncertainty_scores(predictor: Any, task: TaskSpec, examples: list[Example]) -> dict[Score, torch.Tensor]:
    """Each input's normalised predictive entropy, and its members' mutual information when it has members.

    Args:
        predictor: any predictor; a member pooler (see :func:`member_pooler`) also gets ``"mutual_information"``.
        task: the inputs' task.
        examples: the inputs.

    Returns:
        ``{"entropy": [n]}`` (plus ``"mutual_information": [n]``), each in ``[0, 1]``.
    """
    return probs_and_uncertainty(predictor, task, examples)[1]


def out_of_task_auroc(
    predictor: Any,
    in_task: Sequence[TaskData],
    out_of_task: Sequence[TaskData],
    split: Literal["test", "validation"] = "test",
    max_examples: int | None = None,
) -> dict[str, float]:
    """The AUROC of each uncertainty score at telling out-of-task inputs (positive) from in-task ones.

    Args:
        predictor: the predictor.
        in_task: tasks the experts were trained for.
        out_of_task: tasks none was (e.g. :func:`~adapterfuse.tasks.glue.load_held_out` of QNLI).
        split: which split of each task to score.
        max_examples: at most this many inputs per task (the first ones).

    Returns:
        ``{score name: AUROC}``: 0.5 is chance, 1.0 a perfect separation.

    Raises:
        ConfigError: either side has no inputs.
    """
    if not in_task or not out_of_task:
        raise ConfigError(
            f"out-of-task detection: expected in-task and out-of-task tasks, got {len(in_task)} and {len(out_of_task)}"
        )

    def collect(tasks: Sequence[TaskData]) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for td in tasks:
            for name, values in uncertainty_scores(predictor, td.task, list(getattr(td, split)[:max_examples])).items():
                found.setdefault(name, []).extend(values.tolist())
        return found

    inside, outside = collect(in_task), collect(out_of_task)
    return {name: auroc(inside[name], outside[name]) for name in inside}
