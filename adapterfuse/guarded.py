"""A predictor guarded by the feature detector: inputs unlike every known task's get a fallback's answer.

:class:`~adapterfuse.feature_detector.FeatureDetector` reads each input, not a predictor's answer, so it
guards any backend alike: a merge, an ensemble or a router answers the inputs the detector accepts, and
the fallback (the base alone by default, or any other predictor, e.g. a merge that transfers better to
unseen tasks) answers the ones it flags. Each input runs one of the two, never both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.feature_detector import FeatureDetector
from adapterfuse.harness import ZeroShotPredictor
from adapterfuse.io.atomic import atomic_dir
from adapterfuse.io.manifest import Manifest, write_manifest
from adapterfuse.predictor import Cost, Predictor
from adapterfuse.tasks.spec import Example, TaskSpec

INNER, FALLBACK, DETECTOR = "inner", "fallback", "detector"  # the saved folder's three sub-folders


class Guarded:
    """``inner`` on the inputs the detector accepts, ``fallback`` on the ones it flags.

    Args:
        inner: the predictor of the in-task inputs.
        detector: a fitted detector with a threshold (see :meth:`FeatureDetector.fit`).
        fallback: the predictor of flagged inputs (default: the base zero-shot, on the detector's base).
        name: shown in tables (default: ``"<inner> + detector -> <fallback>"``).

    Raises:
        ConfigError: the detector has no threshold.
    """

    def __init__(
        self,
        inner: Predictor,
        detector: FeatureDetector,
        fallback: Predictor | None = None,
        name: str | None = None,
    ) -> None:
        if detector.threshold is None:
            raise ConfigError("guard: the feature detector has no threshold; fit it on tasks with validation inputs")
        self.inner, self.detector = inner, detector
        self.fallback = fallback if fallback is not None else ZeroShotPredictor(detector.base)
        self.name = name or f"{inner.name} + detector -> {self.fallback.name}"
        self.flagged = 0  # inputs handed to the fallback so far, and all inputs answered
        self.answered = 0

    def predict_proba(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """The inner predictor's probabilities on accepted inputs, the fallback's on flagged ones."""
        flags = self.detector.flags(task, batch)
        out = torch.empty((len(batch), task.n_labels), dtype=torch.float32)
        for rows, predictor in ((~flags, self.inner), (flags, self.fallback)):
            index = rows.nonzero().flatten().tolist()
            if index:
                out[index] = predictor.predict_proba(task, [batch[i] for i in index]).float()
        self.flagged += int(flags.sum())
        self.answered += len(batch)
        return out

    def handed_over(self) -> float | None:
        """The share of the inputs answered since the last call that went to the fallback (``None``: no
        input was answered); the counts start again from zero."""
        share = self.flagged / self.answered if self.answered else None
        self.flagged = self.answered = 0
        return share

    def cost(self) -> Cost:
        """Stored: both predictors and the detector's features; passes: the detector's one pass over the
        input, then the costlier of the two predictors (each input runs one of them)."""
        inner, fallback = self.inner.cost(), self.fallback.cost()
        bank = self.detector.bank
        return Cost(
            stored_params=inner.stored_params + fallback.stored_params + bank.numel(),
            forward_passes=1 + max(inner.forward_passes, fallback.forward_passes),
            memory_bytes=inner.memory_bytes + fallback.memory_bytes + bank.numel() * bank.element_size(),
        )

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write ``inner/``, ``fallback/`` and ``detector/``, then ``manifest.json`` (kind ``guarded``).

        Raises:
            OutputExistsError: if ``path`` exists and ``overwrite`` is false.
        """
        with atomic_dir(path, overwrite) as tmp:
            self.inner.save(tmp / INNER)
            self.fallback.save(tmp / FALLBACK)
            self.detector.save(tmp / DETECTOR)
            settings = {"inner": INNER, "fallback": FALLBACK, "detector": DETECTOR}
            write_manifest(tmp, "guarded", self.name, settings, self.detector.base.record())


def guard(
    predictor: Predictor,
    detector: FeatureDetector,
    fallback: Predictor | None = None,
    name: str | None = None,
) -> Guarded:
    """Hand the inputs ``detector`` flags to ``fallback`` (the base zero-shot by default).

    Args:
        predictor: any predictor (merged, ensemble, routed ...).
        detector: a fitted :class:`~adapterfuse.feature_detector.FeatureDetector` with a threshold.
        fallback: what answers flagged inputs.
        name: the guarded predictor's name.

    Returns:
        A :class:`Guarded` predictor; its ``flagged`` / ``answered`` count the inputs it has handed over.

    Raises:
        ConfigError: the detector has no threshold.
    """
    return Guarded(predictor, detector, fallback, name)


def load_guarded(
    folder: Path, manifest: Manifest, base: BaseModel, load: Callable[[Path, BaseModel], Predictor]
) -> Guarded:
    """Rebuild a :class:`Guarded` predictor from a folder written by :meth:`Guarded.save`.

    Args:
        folder: the folder.
        manifest: its checked manifest.
        base: the base to run on.
        load: ``load_predictor`` (it loads the two inner predictors).

    Returns:
        The predictor, answering as the saved one.
    """
    settings = manifest.settings
    detector = FeatureDetector.load(folder / settings["detector"], base)
    inner = load(folder / settings["inner"], base)
    fallback = load(folder / settings["fallback"], base)
    return Guarded(inner, detector, fallback, manifest.name)
