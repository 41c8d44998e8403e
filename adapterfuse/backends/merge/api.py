"""``merge()``: experts in (objects, folders, Hub ids or a library), one :class:`MergedAdapter` out.

Everything that can be checked without reading a weight is checked first (method and parameters by
:class:`~adapterfuse.backends.merge.config.MergeConfig`, weight count, λ grid, validation data, that
the paths exist); then the experts are loaded and checked together by
:class:`~adapterfuse.library.ExpertLibrary`; only then does any maths run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adapterfuse.backends.merge.adapter import MergedAdapter
from adapterfuse.backends.merge.common import MergeResult
from adapterfuse.backends.merge.config import MergeConfig, check_merge
from adapterfuse.backends.merge.lambda_search import (
    AdapterHost,
    EvalOptions,
    check_grid,
    check_validation,
    search_lambda,
)
from adapterfuse.backends.merge.registry import merge_deltas
from adapterfuse.backends.options import given_or_built
from adapterfuse.base import BaseModel
from adapterfuse.library import ExpertLibrary, count_experts, load_library
from adapterfuse.tasks.spec import TaskData


def merge(
    experts: Any,
    config: MergeConfig | None = None,
    *,
    base: BaseModel | None = None,
    validation: Sequence[TaskData] | dict[str, TaskData] | None = None,
    allow_pickle: bool = False,
    verify: bool = True,
    **options: Any,
) -> MergedAdapter:
    """Merge experts into one adapter.

    Args:
        experts: a list of :class:`~adapterfuse.expert.Expert`, expert folders (ours or plain PEFT) and
            Hub ids (``owner/name``, downloaded into the HF cache), or an :class:`ExpertLibrary`.
        config: the options as a :class:`~adapterfuse.backends.merge.config.MergeConfig`; or give them as
            keywords instead: ``method`` (default ``ties``), the method's parameters (``weights``,
            ``density``, ``rank``, ``lam``/``lambda``, ``seed``, ``exact_svd``; ``combine`` for
            ``greedy_soup``; ``mode``, ``per_layer``, ``epochs`` … for ``learned``), ``lambda_grid``,
            ``autocast``, ``batch_size``. A λ method given no λ chooses it on ``validation`` from
            ``lambda_grid`` when validation data and ``base`` are given, else uses 1.
        base: the frozen base; checked against the experts' fingerprints; needed with validation data.
        validation: tasks whose ``validation`` split fits λ, the soup or the learned weights.
        allow_pickle: accept ``adapter_model.bin`` (loaded with ``weights_only``).
        verify: check each expert folder's files against its ``manifest.json`` before reading them.
        **options: the options, when no ``config`` is given.

    Returns:
        The :class:`MergedAdapter`. Experts are merged in the order of :func:`canonical_order` (its
        ``sources`` follow it), so the same experts given in any order give the same bytes.

    Raises:
        ConfigError: a bad method, parameter, weight count, grid or validation data (before any weight
            is read; validation overlapping the test split included); a validation-fitted method without
            ``base``/``validation``; both ``config`` and options; a merged module that overflows float32.
        ExpertError: a missing or corrupt expert, NaN/inf weights.
        CompatibilityError: experts from different bases, or not from ``base``.
    """
    config = given_or_built(MergeConfig, config, options, "merge", "method")
    check_merge(config, count_experts(experts))
    tasks = check_validation(validation, base, config.method, required=config.search is not None)
    grid = check_grid(config.lambda_grid) if config.lambda_search and tasks else None
    eval_options = EvalOptions(autocast=config.autocast, batch_size=config.batch_size)
    library, config = canonical_order(load_library(experts, base, allow_pickle, verify), config, base)
    if config.search is not None:
        return config.search.run(library, config.params, base, tasks, eval_options)
    return _registry_merge(library, config, base, tasks, grid, eval_options)


def canonical_order(
    library: ExpertLibrary, config: MergeConfig, base: BaseModel | None = None
) -> tuple[ExpertLibrary, MergeConfig]:
    """The experts sorted by their weights' sha256 (then name), with their weights permuted alike.

    Float sums depend on the order of their terms, so merging the same experts given in another order
    would change the output in its last bits; in this order the same inputs give the same bytes.

    Args:
        library: the checked experts, in the order given.
        config: the merge options (``weights``, if given, in the same order).
        base: the loaded base, if any (the sorted library is checked against it again).

    Returns:
        ``(library, config)`` in the canonical order; the inputs themselves when already in it.
    """
    experts = list(library)
    order = sorted(range(len(experts)), key=lambda i: (experts[i].weights_sha256(), experts[i].name))
    if order == list(range(len(experts))):
        return library, config
    weights = getattr(config.params, "weights", None)
    if weights is not None:
        params = config.params.model_copy(update={"weights": tuple(weights[i] for i in order)})
        config = config.model_copy(update={"params": params})
    sorted_library = ExpertLibrary([experts[i] for i in order], base.fingerprint if base is not None else None)
    return sorted_library, config


def _registry_merge(
    library: ExpertLibrary,
    config: MergeConfig,
    base: BaseModel | None,
    tasks: list[TaskData] | None,
    grid: tuple[float, ...] | None,
    options: EvalOptions,
) -> MergedAdapter:
    """Run a registry method, choosing λ on validation data when asked."""
    deltas = [e.deltas for e in library]

    def merge_at(lam: float | None) -> MergeResult:
        raw = config.raw_params() if lam is None else {**config.raw_params(), "lam": lam}
        return merge_deltas(deltas, config.method, **raw)

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
    """The merge backend as a :class:`~adapterfuse.backends.base.Combiner`: library + validation -> one adapter.

    Args:
        base: the frozen base the experts were trained on.
        config: the validated options (see :class:`~adapterfuse.backends.merge.config.MergeConfig`).
        members: names of the library's experts to use (default: all).
    """

    def __init__(self, base: BaseModel, config: MergeConfig, members: Sequence[str] | None = None) -> None:
        self.base, self.config, self.members = base, config, list(members or [])
        self.name = f"merge:{config.method}"

    def fit(self, library: ExpertLibrary, validation: Sequence[TaskData] | dict[str, TaskData] | None = None):
        """Merge the library (fitting λ, soup or weights on ``validation`` where the method does).

        Returns:
            The merged adapter's predictor (its ``.adapter`` is the :class:`MergedAdapter`).
        """
        experts = ExpertLibrary([library[n] for n in self.members]) if self.members else library
        merged = merge(experts, self.config, base=self.base, validation=validation)
        return merged.predictor(self.base, name=self.name)
