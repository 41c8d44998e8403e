"""Out-of-task detection: can a predictor's uncertainty tell inputs of a task no expert knows from its own?

Each input is scored with its own task's prompt and label words, so the uncertainties are divided by
``log(n_labels)`` (the entropy of a uniform answer) to put tasks with 2 and 6 label words on one scale.
Predictors that expose their members (ensembles, MC-dropout, parameter-efficient ensembles) are also
scored by the members' disagreement (mutual information, uniform over members).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from adapterfuse.errors import ConfigError
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec
from adapterfuse.uncertainty import auroc, mutual_information, normalised_entropy

Score = Literal["entropy", "mutual_information"]


def uncertainty_scores(predictor: Any, task: TaskSpec, examples: list[Example]) -> dict[Score, torch.Tensor]:
    """Each input's normalised predictive entropy, and its members' mutual information when it has members.

    Args:
        predictor: any predictor; one with ``member_log_probs`` also gets ``"mutual_information"``.
        task: the inputs' task.
        examples: the inputs.

    Returns:
        ``{"entropy": [n]}`` (plus ``"mutual_information": [n]``), each in ``[0, 1]``.
    """
    scale = math.log(task.n_labels)
    scores: dict[Score, torch.Tensor] = {"entropy": normalised_entropy(task, predictor.predict_proba(task, examples))}
    if hasattr(predictor, "member_log_probs"):
        members = predictor.member_log_probs(task, examples).exp()
        scores["mutual_information"] = mutual_information(members) / scale
    return scores


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
