"""The recipe's feature detector: fitted once per run on the tasks' training inputs and scored on their test
inputs and the held-out tasks' (``harness.detector``); combiners with ``guard`` hand the inputs it flags
to the base. A rerun with the same tasks, experts and harness reuses the detector and the result it wrote."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from adapterfuse.base import BaseModel
from adapterfuse.distributed import is_main
from adapterfuse.feature_detector import DetectorSpec, FeatureDetector, detection_result
from adapterfuse.io.atomic import atomic_dir, write_json
from adapterfuse.recipe.resume import digest
from adapterfuse.tasks.spec import TaskData, capped_subset

DETECTOR_TRAIN = 1000  # training inputs kept per task, as `adapterfuse detect` keeps by default
RESULT_FILE = "detector.json"
FOLDER = "detector"  # the fitted detector, with the key it was fitted under in KEY_FILE
KEY_FILE = "key"


class RunDetector:
    """The run's feature detector with its defaults: loaded from ``OUT/detector/`` when that was fitted
    under the same key, else fitted on first use (and saved there by the main process).

    Args:
        out: the run folder.
        setting: the run's digest (see :func:`~adapterfuse.recipe.resume.run_digest`).
        data: the recipe's tasks (their training inputs, capped at :data:`DETECTOR_TRAIN`, are kept; their
            validation inputs set the threshold).
        base: the frozen base.
        say: where the progress lines go.
        seed: the seed of the cap (the recipe's data seed).
    """

    def __init__(
        self,
        out: Path,
        setting: str,
        data: Sequence[TaskData],
        base: BaseModel,
        say: Callable[[str], None],
        seed: int = 0,
    ) -> None:
        self.folder, self.data, self.base, self.say, self.seed = out / FOLDER, list(data), base, say, seed
        self.key = digest(setting, asdict(DetectorSpec()), DETECTOR_TRAIN, seed)
        self._detector: FeatureDetector | None = None

    def fit_on(self) -> list[TaskData]:
        """The tasks with their training inputs capped as the detector keeps them."""
        return [
            TaskData(t.task, capped_subset(t.train, DETECTOR_TRAIN, self.seed), t.validation, t.test) for t in self.data
        ]

    def get(self) -> FeatureDetector:
        """The fitted detector (loaded, or fitted now)."""
        if self._detector is None:
            key_file = self.folder / KEY_FILE
            if key_file.is_file() and key_file.read_text() == self.key:
                self._detector = FeatureDetector.load(self.folder, self.base)
                self.say(f"feature detector: loaded from {self.folder}")
            else:
                fit_on = self.fit_on()
                self.say(f"feature detector: fitting on {sum(len(t.train) for t in fit_on)} training inputs ...")
                self._detector = FeatureDetector.fit(self.base, fit_on)
                if is_main():
                    with atomic_dir(self.folder, overwrite=True) as tmp:
                        self._detector.write(tmp)
                        (tmp / KEY_FILE).write_text(self.key)
        return self._detector


def run_detector(detector: RunDetector, out: Path, held_out: Sequence[TaskData]) -> dict[str, Any]:
    """Score the run's detector on the held-out tasks, or reuse the result an earlier run wrote.

    Args:
        detector: the run's detector (fitted only if no earlier result matches).
        out: the run folder (``detector.json`` is read and written there).
        held_out: the held-out tasks.

    Returns:
        :func:`~adapterfuse.feature_detector.detection_result`, plus ``"key"`` (what it was measured on).
    """
    key = digest(detector.key, [t.task.name for t in held_out])
    path = out / RESULT_FILE
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier.get("key") == key:
            detector.say(f"feature detector: reused result (AUROC {earlier['auroc']:.3f})")
            return earlier
    result = {**detection_result(detector.get(), detector.fit_on(), held_out), "key": key}
    if is_main():
        write_json(path, result)
    detector.say(f"feature detector: AUROC {result['auroc']:.3f} on the held-out tasks")
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
