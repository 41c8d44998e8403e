"""The options of a ``task_ensemble`` recipe combiner: which family of one task's members, and how pooled.

What each family trains and where is in :mod:`adapterfuse.recipe.taskwise`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapterfuse.errors import ConfigError
from adapterfuse.train.config import TrainConfig
from adapterfuse.train.grid import grid_configs

Family = Literal["seeds", "bagging", "grid", "snapshots", "mc_dropout", "temperature"]
TRAINED_FAMILIES: tuple[Family, ...] = ("seeds", "bagging", "grid", "snapshots")
"""The families whose members a run trains (the others reuse the task's expert)."""


class FamilyOptions(BaseModel):
    """The options of a ``task_ensemble`` combiner: an ensemble per task, of that task's own members.

    Attributes:
        family: how the members differ (see :mod:`adapterfuse.recipe.taskwise`).
        members: K: seeds, bootstrap resamples, snapshot cycles or dropout masks.
        grid: ``{TrainConfig field: [values]}`` for ``family="grid"`` (e.g. ``{"lr": [5e-4, 2e-3]}``).
        p: the dropout rate of ``mc_dropout`` (``None``: the ``lora_dropout`` the expert was trained with).
        pooling: how members are pooled: ``"linear"`` (mixture of probabilities) or ``"log_linear"``.
        weights: the members' weights: ``"uniform"``, or ``"learned"`` on the task's validation split (for
            ``log_linear`` pooling with a temperature; a family of trained members only).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    family: Family
    members: int = Field(3, ge=1, le=64, strict=True)
    grid: dict[str, list[Any]] | None = None
    p: float | None = Field(None, ge=0.0, lt=1.0)
    pooling: Literal["linear", "log_linear"] = "linear"
    weights: Literal["uniform", "learned"] = "uniform"

    @model_validator(mode="after")
    def _grid_iff_grid(self) -> FamilyOptions:
        if (self.family == "grid") != (self.grid is not None):
            raise ValueError("grid: give a grid (e.g. {lr: [5e-4, 2e-3]}) with family 'grid', and only with it")
        if self.family == "grid":
            try:
                grid_configs(TrainConfig(), self.grid or {})
            except ConfigError as e:
                raise ValueError(str(e)) from None
        if self.p is not None and self.family != "mc_dropout":
            raise ValueError(f"p: the dropout rate is an option of family 'mc_dropout', not {self.family!r}")
        if self.weights == "learned" and self.family not in TRAINED_FAMILIES:
            raise ValueError(
                f"weights: learned weights pool trained members; family {self.family!r} has none "
                f"(use one of {', '.join(TRAINED_FAMILIES)})"
            )
        return self
