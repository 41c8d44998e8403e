"""Scoring candidate adapters on the validation split, and the λ grid search of the linear merges.

``task_arithmetic``, ``ties`` and the DARE methods scale their merged update by λ. When no λ is given
and validation data is, λ is chosen from a small grid by the average validation ``score`` of the
merged adapter; every grid point's score is recorded so the choice can be checked.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adapterfuse.backends.merge.common import MergeResult
from adapterfuse.base import BaseModel
from adapterfuse.errors import AdapterFuseWarning, ConfigError
from adapterfuse.expert import Expert
from adapterfuse.harness import ModelPredictor, evaluate
from adapterfuse.progress import bar
from adapterfuse.tasks.spec import TaskData, check_disjoint

DEFAULT_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
LAMBDA_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "iso_c", "tsv", "knots")
"""The registered methods that take ``lambda`` and so get a λ search when it is not given."""


@dataclass(frozen=True)
class EvalOptions:
    """How candidates are scored on validation data.

    Attributes:
        autocast: run the base under bf16 autocast (as the harness does by default).
        batch_size: rows per forward pass.
    """

    autocast: bool = True
    batch_size: int = 32


class AdapterHost:
    """One copy of the base carrying the adapter being scored.

    Searches score many candidates of the same structure (same modules and ranks): the host reloads
    the weights in place when the PEFT config is unchanged instead of copying the base again.

    Args:
        base: the frozen base (never modified: the host works on a deep copy).
        options: scoring settings.
    """

    def __init__(self, base: BaseModel, options: EvalOptions | None = None) -> None:
        self.base = base
        self.options = options or EvalOptions()
        self._model: Any = None
        self._config: dict[str, Any] | None = None

    def load(self, state: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.nn.Module:
        """Put an adapter (plain PEFT tensors and config) on the hosted copy of the base.

        Returns:
            The PEFT model carrying it, in eval mode.
        """
        from peft import set_peft_model_state_dict

        if self._model is not None and config == self._config:
            set_peft_model_state_dict(self._model, state)
        else:
            self._model = None  # free the previous copy before making the next one
            self._model = Expert(name="candidate", config=config, state_dict=state).attach(self.base.model)
            self._config = config
        return self._model

    def score(
        self,
        state: dict[str, torch.Tensor],
        config: dict[str, Any],
        validation: Sequence[TaskData],
        name: str = "candidate",
    ) -> float:
        """The average validation ``score`` of an adapter over the tasks.

        Args:
            state: the adapter's PEFT tensors.
            config: its PEFT config.
            validation: tasks whose ``validation`` split is scored.
            name: the predictor's name.

        Returns:
            The mean over tasks of each task's ``score`` (the mean of its official metrics).
        """
        model = self.load(state, config)
        predictor = ModelPredictor(
            name, model, self.base.tokenizer, batch_size=self.options.batch_size, autocast=self.options.autocast
        )
        return float(evaluate(predictor, validation, split="validation")["average"])


def check_validation(validation: Any, base: BaseModel | None, method: str, required: bool) -> list[TaskData] | None:
    """Normalise and check validation data (a list of :class:`TaskData`, or a task -> TaskData dict).

    Args:
        validation: what the caller gave.
        base: the base; validation data is only usable with one.
        method: the merge method, for messages.
        required: whether the method cannot run without validation data.

    Returns:
        The tasks, or ``None`` when none were given.

    Raises:
        ConfigError: missing data when required, data without a base, a task without validation examples,
            validation examples that also appear in the task's test split.
    """
    if validation is None:
        if required:
            raise ConfigError(
                f"merge method {method!r} fits on validation data: pass validation=[TaskData, ...] "
                "and base= (CLI: --tasks and --base)"
            )
        return None
    tasks = list(validation.values()) if isinstance(validation, dict) else list(validation)
    if not tasks or not all(isinstance(t, TaskData) for t in tasks):
        raise ConfigError(
            f"validation: expected a non-empty list of TaskData, got {type(validation).__name__} "
            f"of {sorted({type(t).__name__ for t in tasks})}"
        )
    check_disjoint(tasks)
    empty = [t.task.name for t in tasks if not t.validation]
    if empty:
        raise ConfigError(f"validation: tasks {empty} have no validation examples; load them with validation_size > 0")
    if base is None:
        raise ConfigError(
            f"merge method {method!r}: validation data is scored on the base model, so base= is "
            "needed too (CLI: --base)"
        )
    return tasks


def check_grid(grid: Sequence[float] | None) -> tuple[float, ...]:
    """A λ grid: non-empty, finite numbers.

    Raises:
        ConfigError: for an empty grid or a non-finite value.
    """
    values = tuple(DEFAULT_GRID if grid is None else grid)
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ConfigError(f"lambda_grid: expected a non-empty list of finite numbers, got {list(values)}")
    return tuple(float(v) for v in values)


def choose_lambda(grid: Sequence[float], scores: Sequence[float]) -> int:
    """The index of the best grid point: highest score, ties to the λ closest to 1, then to the smaller λ.

    A NaN score is no score (a candidate whose outputs went non-finite): it never wins.

    Args:
        grid: the λ values tried.
        scores: their validation scores, in the same order.

    Returns:
        The chosen index.

    Raises:
        ConfigError: when no score is finite.
    """
    valid = [i for i in range(len(grid)) if math.isfinite(scores[i])]
    if not valid:
        raise ConfigError(
            f"lambda search: every grid point {list(grid)} scored NaN on validation, expected at least one "
            "finite score; check the validation data and the experts, or give lambda"
        )
    return max(valid, key=lambda i: (scores[i], -abs(grid[i] - 1.0), -grid[i]))


def edge_note(grid: Sequence[float], scores: Sequence[float], best: int) -> str | None:
    """A one-line note when the chosen λ is the grid's largest or smallest and beats its neighbour.

    The validation score then still improves towards the grid's end, so a λ beyond it may score higher.

    Args:
        grid: the λ values tried.
        scores: their validation scores, in the same order.
        best: the chosen index (:func:`choose_lambda`).

    Returns:
        The note, or None when the choice lies inside the grid (or the grid has one point).
    """
    order = sorted(range(len(grid)), key=lambda i: grid[i])
    if len(order) < 2 or best not in (order[0], order[-1]):
        return None
    largest = best == order[-1]
    neighbour = order[-2] if largest else order[1]
    if not scores[best] > scores[neighbour]:  # a tie or a NaN neighbour: no sign of a better λ beyond
        return None
    side, beyond = ("largest", f"above {grid[best]:g}") if largest else ("smallest", f"below {grid[best]:g}")
    return (
        f"lambda search: chose λ = {grid[best]:g}, the {side} of lambda_grid {[float(g) for g in grid]}, and the "
        f"validation score still improves towards it ({scores[neighbour]:.4f} -> {scores[best]:.4f}); "
        f"a lambda_grid reaching {beyond} may score higher"
    )


def search_lambda(
    merge_at: Callable[[float], MergeResult],
    to_files: Callable[[MergeResult], tuple[Any, Any]],
    host: AdapterHost,
    validation: Sequence[TaskData],
    grid: Sequence[float] = DEFAULT_GRID,
) -> tuple[MergeResult, dict[str, Any]]:
    """Choose λ on the grid by the merged adapter's average validation score.

    Args:
        merge_at: ``λ -> MergeResult`` (the merge with everything else fixed).
        to_files: ``MergeResult -> (PEFT state, config)``.
        host: where candidates are scored.
        validation: the tasks.
        grid: the λ values to try.

    Returns:
        ``(best result, record)``; the record holds the grid, each point's score and the chosen λ.
        The choice is :func:`choose_lambda`'s.

    Raises:
        ConfigError: every grid point scored NaN, or a λ at which the merge overflows float32.
    """
    scores: list[float] = []
    results: list[MergeResult] = []
    unit = merge_at(1.0)  # one merge; λ only scales it (see MergeResult.scaled)
    for lam in bar(grid, "merge: λ search", unit="λ"):
        result = unit.scaled(lam)
        state, config = to_files(result)
        scores.append(host.score(state, config, validation, name=f"lambda={lam:g}"))
        results.append(result)
    best = choose_lambda(grid, scores)
    if note := edge_note(grid, scores, best):
        warnings.warn(note, AdapterFuseWarning, stacklevel=2)
    record = {
        "grid": list(grid),
        "scores": scores,
        "chosen": grid[best],
        "criterion": "average validation score",
        "tasks": [t.task.name for t in validation],
    }
    return results[best], record
