"""Temperature scaling: the calibration baseline every ensemble has to beat (Guo et al. 2017).

One temperature per task, fitted on the validation split by minimising the NLL of ``softmax(log p / T)``;
the predictor's ranking of the label words (hence its accuracy) is unchanged, only how sure it is.
Paper: https://arxiv.org/abs/1706.04599
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from scipy.optimize import minimize_scalar

from adapterfuse.errors import ConfigError
from adapterfuse.io.atomic import atomic_dir
from adapterfuse.io.manifest import write_manifest
from adapterfuse.predictor import Cost, Predictor
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec
from adapterfuse.uncertainty import nll

TEMPERATURE_RANGE = (0.05, 20.0)
"""The temperatures searched (a bounded search on ``log T``)."""


def scale(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)``: ``T > 1`` softens, ``T < 1`` sharpens; ``T = 1`` gives ``probs`` back."""
    return torch.softmax(probs.double().clamp_min(1e-12).log() / temperature, dim=-1).to(probs.dtype)


def fit_temperature(task: TaskSpec, probs: torch.Tensor, labels: Sequence[float]) -> float:
    """The temperature in :data:`TEMPERATURE_RANGE` that minimises the NLL of the scaled probabilities.

    Args:
        task: the task (regression uses the soft target of :func:`adapterfuse.head.task_loss`).
        probs: ``[n, n_labels]`` validation probabilities.
        labels: the ``n`` gold labels.

    Returns:
        The fitted temperature.

    Raises:
        ConfigError: no validation examples.
    """
    if not len(labels):
        raise ConfigError(f"temperature scaling {task.name}: no validation examples; expected at least one")
    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(
        lambda log_t: nll(task, scale(probs, math.exp(log_t)), labels),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(found.x))


class TemperatureScaled:
    """A predictor whose probabilities are rescaled per task by a fitted temperature.

    Args:
        inner: the predictor to calibrate.
        temperatures: ``{task name: T}``.
        name: shown in tables (default: ``"<inner> + temperature"``).
        unseen: a task with no fitted temperature is an ``"error"``, or gets the geometric ``"mean"`` of the
            fitted ones (for inputs of tasks no validation data exists for, as in out-of-task detection).
    """

    def __init__(
        self,
        inner: Predictor,
        temperatures: dict[str, float],
        name: str | None = None,
        unseen: Literal["error", "mean"] = "error",
    ) -> None:
        if unseen not in ("error", "mean"):
            raise ConfigError(f"unseen: expected 'error' or 'mean', got {unseen!r}")
        self.inner, self.unseen = inner, unseen
        self.temperatures = dict(temperatures)
        self.name = name or f"{inner.name} + temperature"

    def predict_proba(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """The inner predictor's probabilities at the task's temperature.

        Raises:
            ConfigError: no temperature was fitted for ``task``.
        """
        temperature = self.temperatures.get(task.name)
        if temperature is None and self.unseen == "mean":
            temperature = math.exp(sum(map(math.log, self.temperatures.values())) / len(self.temperatures))
        if temperature is None:
            raise ConfigError(
                f"{self.name}: no temperature for task {task.name!r}; fitted for {sorted(self.temperatures)}; "
                "fit it with validation data of that task, or pass unseen='mean'"
            )
        return scale(self.inner.predict_proba(task, batch), temperature)

    def cost(self) -> Cost:
        """The inner predictor's cost (one scalar per task on top)."""
        return self.inner.cost()

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the inner predictor under ``inner/`` and ``manifest.json`` with the temperatures.

        Raises:
            OutputExistsError: if ``path`` exists and ``overwrite`` is false.
        """
        with atomic_dir(path, overwrite) as tmp:
            self.inner.save(tmp / "inner")
            settings = {"temperatures": self.temperatures, "inner": "inner", "unseen": self.unseen}
            write_manifest(tmp, "temperature_scaled", self.name, settings)


def temperature_scale(
    predictor: Predictor,
    validation: Sequence[TaskData],
    name: str | None = None,
    unseen: Literal["error", "mean"] = "error",
) -> Any:
    """Fit one temperature per task on the validation split.

    Args:
        predictor: the predictor to calibrate.
        validation: the tasks, each with a non-empty ``validation`` split.
        name: the calibrated predictor's name.
        unseen: what a task without a fitted temperature gets (see :class:`TemperatureScaled`).

    Returns:
        A :class:`TemperatureScaled` predictor.

    Raises:
        ConfigError: no tasks, or a task without validation examples.
    """
    if not validation:
        raise ConfigError("temperature scaling: expected validation data of at least one task, got none")
    temperatures = {}
    for td in validation:
        probs = predictor.predict_proba(td.task, list(td.validation))
        temperatures[td.task.name] = fit_temperature(td.task, probs, [e.label for e in td.validation])
    return TemperatureScaled(predictor, temperatures, name, unseen)
