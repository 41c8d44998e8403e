"""The recipe's feature detector: fitted once per run on the tasks' training inputs and scored on their test
inputs and the held-out tasks' (``harness.detector``); a rerun with the same tasks, experts and harness
reuses the result it wrote."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from adapterfuse.base import BaseModel
from adapterfuse.distributed import is_main
from adapterfuse.feature_detector import DetectorSpec, FeatureDetector, detection_result
from adapterfuse.io.atomic import write_json
from adapterfuse.recipe.resume import digest
from adapterfuse.tasks.spec import TaskData, capped_subset

DETECTOR_TRAIN = 1000  # training inputs kept per task, as `adapterfuse detect` keeps by default
RESULT_FILE = "detector.json"


def run_detector(
    out: Path,
    setting: str,
    data: Sequence[TaskData],
    held_out: Sequence[TaskData],
    base: BaseModel,
    say: Callable[[str], None],
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the feature detector with its defaults and score it, or reuse the result an earlier run wrote.

    Args:
        out: the run folder (``detector.json`` is read and written there).
        setting: the run's digest (see :func:`~adapterfuse.recipe.resume.run_digest`).
        data: the recipe's tasks (their training inputs, capped at :data:`DETECTOR_TRAIN`, are kept).
        held_out: the held-out tasks.
        base: the frozen base.
        say: where the progress lines go.
        seed: the seed of the cap (the recipe's data seed).

    Returns:
        :func:`~adapterfuse.feature_detector.detection_result`, plus ``"key"`` (what it was measured on).
    """
    key = digest(setting, [t.task.name for t in held_out], asdict(DetectorSpec()), DETECTOR_TRAIN, seed)
    path = out / RESULT_FILE
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier.get("key") == key:
            say(f"feature detector: reused result (AUROC {earlier['auroc']:.3f})")
            return earlier
    fit_on = [TaskData(t.task, capped_subset(t.train, DETECTOR_TRAIN, seed), t.validation, t.test) for t in data]
    say(f"feature detector: fitting on {sum(len(t.train) for t in fit_on)} training inputs ...")
    result = {**detection_result(FeatureDetector.fit(base, fit_on), fit_on, held_out), "key": key}
    if is_main():
        write_json(path, result)
    say(f"feature detector: AUROC {result['auroc']:.3f} on the held-out tasks")
    return result


def detector_paragraph(result: dict[str, Any]) -> str:
    """The report's lines on the detector: its AUROC and what its threshold flags on each side."""
    away = ", ".join(f"{name} {r['flagged']:.1%}" for name, r in result["held_out"].items())
    inside = ", ".join(f"{name} {r['flagged']:.1%}" for name, r in result["in_task"].items())
    accept = result["settings"]["accept"]
    return (
        "\n## Telling the held-out tasks from the input\n\nThe feature detector (`adapterfuse detect`'s defaults: "
        "the base's final state pooled over each raw field, cosine distance to the nearest in-task training "
        f"input) reads the input, not a predictor's answer: AUROC {result['auroc']:.3f} at telling the held-out "
        f"inputs from the recipe's own. Its threshold keeps {accept:.0%} of the validation inputs and flags "
        f"held-out: {away}; in-task: {inside}.\n"
    )
