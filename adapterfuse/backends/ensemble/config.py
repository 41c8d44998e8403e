"""Every option of the ensemble backend, declared once: :class:`EnsembleConfig`.

Its validators check everything that needs no member; :func:`check_ensemble` adds what needs the
members' names (one weight each) and whether validation data is given.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapterfuse.backends.ensemble.pooling import check_temperature, check_weights
from adapterfuse.backends.ensemble.select import parse_select
from adapterfuse.backends.ensemble.weights import parse_weights
from adapterfuse.backends.options import MAX_SEED
from adapterfuse.errors import ConfigError
from adapterfuse.head import DEFAULT_MAX_LENGTH


class EnsembleConfig(BaseModel):
    """Everything :func:`~adapterfuse.backends.ensemble.fit.ensemble` is told besides members, base and data.

    Attributes:
        pooling: ``"linear"`` (mixture of probabilities) or ``"log_linear"`` (product, renormalised).
        weights: ``"uniform"``, ``"learned"`` (on the validation split), or one number per member (also as
            text, ``"0.5,0.3,0.2"``).
        select: ``None`` (every member), ``"greedy"`` (Caruana forward selection with replacement; with
            uniform weights each member weighs its share of the picks), or ``"topK"`` (e.g. ``"top3"``).
        temperature: the pooling temperature for uniform or given weights (learned log-linear weights learn
            their own).
        metric: what selection maximises: ``"score"`` (task metrics) or ``"nll"``.
        seed: the seed of the weight fit.
        batch_size, autocast, max_length: scoring settings of the predictor and of the validation pass.
        max_validation_examples: fit on at most this many validation examples per task.
        name: the predictor's name in tables.
    """

    # Frozen so a fitted predictor's settings cannot drift; extra="forbid" so a misspelt option is an error.
    # NaN weights pass here on purpose: check_ensemble names the member whose weight it is.
    model_config = ConfigDict(frozen=True, extra="forbid")

    pooling: Literal["linear", "log_linear"] = "log_linear"
    weights: Literal["uniform", "learned"] | list[float] = "uniform"
    select: str | None = None
    temperature: float = 1.0
    metric: Literal["score", "nll"] = "score"
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True)
    batch_size: int = Field(32, ge=1, strict=True)
    autocast: bool = True
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=1, strict=True)
    max_validation_examples: int | None = Field(None, ge=1, strict=True)
    name: str | None = None

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> str | list[float]:
        return parse_weights(value)

    @field_validator("select")
    @classmethod
    def _select(cls, value: str | None) -> str | None:
        parse_select(value)
        return value or None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        check_temperature(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleConfig:
        if isinstance(self.weights, list) and self.select is not None:
            raise ValueError(
                f"weights: given weights {self.weights} cannot be combined with select={self.select!r}, "
                "which chooses the members; use weights='uniform' or 'learned' with a selection"
            )
        return self

    @property
    def fits(self) -> bool:
        """Whether it fits anything on validation data (learned weights or a selection)."""
        return self.weights == "learned" or self.select is not None


def check_ensemble(config: EnsembleConfig, names: list[str], has_validation: bool) -> None:
    """The checks that need the members' names and whether validation data is given (no weight is read).

    Raises:
        ConfigError: given weights of the wrong count, NaN/inf, or negative with linear pooling; learned
            weights or a selection without validation data.
    """
    if isinstance(config.weights, list):
        check_weights(config.weights, names, config.pooling)
    if config.fits and not has_validation:
        what = "weights='learned'" if config.weights == "learned" else f"select={config.select!r}"
        raise ConfigError(
            f"validation: {what} needs validation data, got none; pass validation=[TaskData, ...] "
            "(each with a validation split), or use weights='uniform' and select=None"
        )
