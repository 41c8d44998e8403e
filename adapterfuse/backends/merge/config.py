"""Every option of the merge backend in one model: :class:`MergeConfig`.

A merge is a method name plus that method's own frozen parameter model (each method declares its
parameters once, in its module; see :data:`~adapterfuse.backends.merge.registry.METHODS` and
:data:`SEARCH_METHODS`), and the settings of scoring on validation data. Flat options, as
``merge(experts, method="ties", density=0.2)`` gives them, are split into the two.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from adapterfuse.backends.merge import fisher, learned, regmean, soup
from adapterfuse.backends.merge.adapter import SearchMethod
from adapterfuse.backends.merge.common import MergeParams, parse_params
from adapterfuse.backends.merge.lambda_search import LAMBDA_METHODS
from adapterfuse.backends.merge.registry import METHODS
from adapterfuse.errors import ConfigError

SEARCH_METHODS: dict[str, SearchMethod] = {
    m.name: m for m in (soup.METHOD, learned.METHOD, regmean.METHOD, fisher.METHOD)
}
"""Methods that fit on validation data; they need ``base`` and ``validation``."""

DEFAULT_METHOD = "ties"


def all_methods() -> list[str]:
    """Every method name a merge accepts: the registry's methods, then the validation-fitted ones."""
    return [*METHODS, *SEARCH_METHODS]


def params_model(method: str) -> type[MergeParams]:
    """The parameter model of a method.

    Raises:
        ConfigError: an unknown method, listing the known ones.
    """
    if not isinstance(method, str) or method not in all_methods():
        raise ConfigError(f"unknown merge method {method!r}; known methods: {', '.join(all_methods())}")
    search = SEARCH_METHODS.get(method)
    return search.params if search is not None else METHODS[method].params  # type: ignore[return-value]


class MergeConfig(BaseModel):
    """Everything :func:`~adapterfuse.backends.merge.api.merge` is told besides the experts, base and data.

    Attributes:
        method: ``uniform``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``iso_c``, ``tsv``,
            ``greedy_soup``, ``learned``, ``regmean`` or ``fisher`` (see :func:`all_methods`).
        params: the method's parameters, validated by its own model (``weights``, ``rank``, ``seed``;
            ``lambda``, ``density``, ``exact_svd`` …). Given flat, every key that is not a field of this
            model is one of them.
        lambda_grid: the λ values a λ method tries on validation data when no λ is given (``None``:
            :data:`~adapterfuse.backends.merge.lambda_search.DEFAULT_GRID`).
        autocast: score candidates under bf16 autocast.
        batch_size: rows per forward pass when scoring.
    """

    # Frozen and extra="forbid" like each method's parameters; no NaN/inf in the grid.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    method: str = DEFAULT_METHOD
    params: SerializeAsAny[MergeParams] = Field(default_factory=lambda: params_model(DEFAULT_METHOD)())
    lambda_grid: tuple[float, ...] | None = Field(None, min_length=1)
    autocast: bool = True
    batch_size: int = Field(32, ge=1, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _method_params(cls, data: Any) -> Any:
        """Split flat options into the method and its parameters, and validate those by its model."""
        if not isinstance(data, dict):
            return data
        own = {k: v for k, v in data.items() if k in cls.model_fields}
        rest = {k: v for k, v in data.items() if k not in cls.model_fields}
        method = own.get("method", DEFAULT_METHOD)
        model = params_model(method)
        given = own.get("params", {})
        if isinstance(given, MergeParams):
            if rest or type(given) is not model:
                raise ValueError(
                    f"params: expected {model.__name__} for method {method!r} and no other "
                    f"parameters, got {type(given).__name__} and {sorted(rest)}"
                )
            return own
        if not isinstance(given, dict):
            raise ValueError(f"params: expected a mapping of parameters, got {type(given).__name__}")
        return {**own, "params": parse_params(method, model, {**given, **rest})}

    @property
    def search(self) -> SearchMethod | None:
        """The validation-fitted method, if it is one."""
        return SEARCH_METHODS.get(self.method)

    @property
    def lambda_search(self) -> bool:
        """Whether λ is to be chosen on validation data: a λ method with no λ given."""
        return self.method in LAMBDA_METHODS and "lam" not in self.params.model_fields_set

    def raw_params(self) -> dict[str, Any]:
        """The parameters as keyword arguments of :func:`~adapterfuse.backends.merge.registry.merge_deltas`."""
        return self.params.model_dump()


def check_merge(config: MergeConfig, n_experts: int) -> None:
    """The check that needs the number of experts: one weight each, when weights are given.

    Raises:
        ConfigError: a weight count that differs from the expert count.
    """
    got = getattr(config.params, "weights", None)
    if got is not None and len(got) != n_experts:
        raise ConfigError(
            f"got {len(got)} weights for {n_experts} experts; give exactly one weight per expert (or none)"
        )
