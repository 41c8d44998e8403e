"""``merge()``: experts in (objects, folders, Hub ids or a library), one :class:`MergedAdapter` out.

Everything that can be checked without reading a weight is checked first (method, parameters,
weight count, λ grid, validation data, that the paths exist); then the experts are loaded and checked
together by :class:`~adapterfuse.library.ExpertLibrary`; only then does any maths run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel as PydanticModel

from adapterfuse.backends.merge import learned, soup
from adapterfuse.backends.merge.adapter import MergedAdapter, SearchMethod
from adapterfuse.backends.merge.common import MergeResult, parse_params
from adapterfuse.backends.merge.lambda_search import (
    LAMBDA_METHODS,
    AdapterHost,
    EvalOptions,
    check_grid,
    check_validation,
    search_lambda,
)
from adapterfuse.backends.merge.registry import METHODS, merge_deltas
from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.library import ExpertLibrary, count_experts, load_library
from adapterfuse.tasks.spec import TaskData

SEARCH_METHODS: dict[str, SearchMethod] = {m.name: m for m in (soup.METHOD, learned.METHOD)}
"""Methods that fit on validation data; they need ``base`` and ``validation``."""


def all_methods() -> list[str]:
    """Every name :func:`merge` accepts: the registry's methods, then the validation-fitted ones."""
    return [*METHODS, *SEARCH_METHODS]


@dataclass(frozen=True)
class MergeRequest:
    """A validated merge request (no weight read yet).

    Attributes:
        method: the method's name.
        raw: the parameters as given (passed on to :func:`~adapterfuse.backends.merge.registry.merge_deltas`).
        parsed: the same, validated by the method's parameter model.
        search: the validation-fitted method, if it is one.
        lambda_search: whether λ is to be chosen on validation data (a λ method with no λ given).
    """

    method: str
    raw: dict[str, Any]
    parsed: PydanticModel
    search: SearchMethod | None
    lambda_search: bool


def prepare(n_experts: int, method: str, weights: Sequence[float] | None = None, density: float | None = None,
            rank: int | None = None, lam: float | None = None, seed: int = 0, **params: Any) -> MergeRequest:
    """Validate a merge request without touching any expert (the CLI calls this before loading a base).

    Args:
        n_experts: how many experts will be merged.
        method: a name from :func:`all_methods`.
        weights, density, rank, lam, seed, **params: as in :func:`merge`.

    Returns:
        The validated request.

    Raises:
        ConfigError: unknown method; unknown or invalid parameter (density outside ``(0, 1]``, NaN
            weight, negative rank …); a weight count that differs from the expert count.
    """
    if not isinstance(method, str) or method not in all_methods():
        raise ConfigError(f"unknown merge method {method!r}; known methods: {', '.join(all_methods())}")
    raw: dict[str, Any] = {"weights": None if weights is None else tuple(weights), "rank": rank, "seed": seed}
    if density is not None:
        raw["density"] = density
    if lam is not None:
        raw["lam"] = lam
    raw.update(params)
    search = SEARCH_METHODS.get(method)
    model = search.params if search is not None else METHODS[method].params
    parsed = parse_params(method, model, raw)  # type: ignore[arg-type]
    got = getattr(parsed, "weights", None)
    if got is not None and len(got) != n_experts:
        raise ConfigError(f"got {len(got)} weights for {n_experts} experts; give exactly one weight per expert "
                          "(or none)")
    lam_given = lam is not None or "lambda" in params or "lam" in params
    return MergeRequest(method, raw, parsed, search, method in LAMBDA_METHODS and not lam_given)


def merge(experts: Any, method: str = "ties", weights: Sequence[float] | None = None, density: float | None = None,
          rank: int | None = None, lam: float | None = None, seed: int = 0, base: BaseModel | None = None,
          validation: Sequence[TaskData] | dict[str, TaskData] | None = None, allow_pickle: bool = False, *,
          lambda_grid: Sequence[float] | None = None, autocast: bool = True, batch_size: int = 32,
          **params: Any) -> MergedAdapter:
    """Merge experts into one adapter.

    Args:
        experts: a list of :class:`~adapterfuse.expert.Expert`, expert folders (ours or plain PEFT) and
            Hub ids (``owner/name``, downloaded into the HF cache), or an :class:`ExpertLibrary`.
        method: ``uniform``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
            ``greedy_soup`` or ``learned`` (see :func:`all_methods`).
        weights: one finite weight per expert (registry methods only).
        density: kept fraction for TIES/DARE, in ``(0, 1]``.
        rank: output rank per module (default: exact for linear merges, the largest expert rank else).
        lam: λ of the λ methods. ``None``: chosen on ``validation`` from ``lambda_grid`` when
            validation data and ``base`` are given, else 1.
        seed: seed of every random choice (DARE masks, randomized SVD, learned weights).
        base: the frozen base; checked against the experts' fingerprints; needed with validation data.
        validation: tasks whose ``validation`` split fits λ, the soup or the learned weights.
        allow_pickle: accept ``adapter_model.bin`` (loaded with ``weights_only``).
        lambda_grid: the λ values to try (default 0.25 … 1.5).
        autocast: score candidates under bf16 autocast.
        batch_size: rows per forward pass when scoring.
        **params: other method parameters (``exact_svd``; ``combine`` for ``greedy_soup``; ``mode``,
            ``per_layer``, ``epochs``, ``steps``, ``lr`` … for ``learned``).

    Returns:
        The :class:`MergedAdapter`.

    Raises:
        ConfigError: a bad method, parameter, weight count, grid or validation data (before any weight
            is read); a validation-fitted method without ``base``/``validation``.
        ExpertError: a missing or corrupt expert, NaN/inf weights.
        CompatibilityError: experts from different bases, or not from ``base``.
    """
    request = prepare(count_experts(experts), method, weights, density, rank, lam, seed, **params)
    tasks = check_validation(validation, base, method, required=request.search is not None)
    grid = check_grid(lambda_grid) if request.lambda_search and tasks else None
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
    options = EvalOptions(autocast=autocast, batch_size=batch_size)
    library = load_library(experts, base, allow_pickle)
    if request.search is not None:
        return request.search.run(library, request.parsed, base, tasks, options)
    return _registry_merge(library, request, base, tasks, grid, options)


def _registry_merge(library: ExpertLibrary, request: MergeRequest, base: BaseModel | None,
                    tasks: list[TaskData] | None, grid: tuple[float, ...] | None,
                    options: EvalOptions) -> MergedAdapter:
    """Run a registry method, choosing λ on validation data when asked."""
    deltas = [e.deltas for e in library]

    def merge_at(lam: float | None) -> MergeResult:
        raw = dict(request.raw) if lam is None else {**request.raw, "lam": lam}
        return merge_deltas(deltas, request.method, **raw)

    if grid is None or tasks is None or base is None:
        return MergedAdapter.build(merge_at(None), library, base, search={"lambda_search": None})
    host = AdapterHost(base, options)
    result, record = search_lambda(merge_at, lambda r: _files(r, base), host, tasks, grid)
    return MergedAdapter.build(result, library, base, search={"lambda_search": record})


def _files(result: MergeResult, base: BaseModel):
    """A result as PEFT files (for scoring), named after the base."""
    from adapterfuse.delta import peft_from_deltas

    return peft_from_deltas(result.deltas, base.spec)


class MergeCombiner:
    """The merge backend as a :class:`~adapterfuse.predictor.Combiner`: library + validation -> one adapter.

    Args:
        base: the frozen base the experts were trained on.
        method: any name of :func:`all_methods`.
        **options: the other arguments of :func:`merge` (``weights``, ``density``, ``rank``, ``lam`` …).
    """

    def __init__(self, base: BaseModel, method: str = "ties", **options: Any) -> None:
        self.base, self.method, self.options = base, method, options
        self.name = f"merge:{method}"

    def fit(self, library: ExpertLibrary, validation: Sequence[TaskData] | dict[str, TaskData] | None = None):
        """Merge the library (fitting λ, soup or weights on ``validation`` where the method does).

        Returns:
            The merged adapter's predictor (its ``.adapter`` is the :class:`MergedAdapter`).
        """
        merged = merge(library, self.method, base=self.base, validation=validation, **self.options)
        return merged.predictor(self.base, name=self.name)
