"""The ensemble backend's entry points: :func:`ensemble` and :class:`EnsembleCombiner`.

Every argument is validated before any heavy work (no model copy, no forward pass): the pooling, the
member list, the weights (count, NaN, sign), the selection, and that validation data is there when
the weights are learned or members are selected; then the members' compatibility (one base).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.backends.ensemble.cache import cache_members, pooled_nll, pooled_score
from adapterfuse.backends.ensemble.pooling import check_pooling, check_temperature, check_weights
from adapterfuse.backends.ensemble.predictor import EnsemblePredictor, check_member_list, check_members
from adapterfuse.backends.ensemble.select import parse_select, select_members
from adapterfuse.backends.ensemble.weights import (
    WeightFit,
    learn_weights,
    parse_weights,
    resolve_weights,
    uniform_weights,
)
from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.head import DEFAULT_MAX_LENGTH
from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import MultiTaskData
from adapterfuse.tasks.spec import TaskData

METRICS = ("score", "nll")


def check_options(names: list[str], pooling: str, weights: str | Sequence[float], select: str | None,
                  validation: Any, temperature: float,
                  metric: str) -> tuple[str | list[float], tuple[str, int] | None]:
    """The checks that read no weight, in the order a user would fix them (recipes run them in --dry-run).

    Args:
        names: the members' names.
        pooling, weights, select, temperature, metric: as in :func:`ensemble`.
        validation: anything truthy when validation data will be given.

    Returns:
        The parsed weights and selection.

    Raises:
        ConfigError: naming the argument at fault.
    """
    check_pooling(pooling)
    spec = parse_weights(weights)
    selection = parse_select(select)
    check_temperature(temperature)
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r}: unknown; expected one of {', '.join(METRICS)}")
    if isinstance(spec, list):
        if selection is not None:
            raise ConfigError(f"weights: given weights {spec} cannot be combined with select={select!r}, which "
                              "chooses the members; use weights='uniform' or 'learned' with a selection")
        check_weights(spec, names, pooling)
    if (spec == "learned" or selection is not None) and not validation:
        what = "weights='learned'" if spec == "learned" else f"select={select!r}"
        raise ConfigError(f"validation: {what} needs validation data, got none; pass validation=[TaskData, ...] "
                          "(each with a validation split), or use weights='uniform' and select=None")
    return spec, selection


def ensemble(experts: Iterable[Expert] | ExpertLibrary, base: BaseModel, pooling: str = "log_linear",
             weights: str | Sequence[float] = "uniform", select: str | None = None,
             validation: Sequence[TaskData] | None = None, *, temperature: float = 1.0, metric: str = "score",
             seed: int = 0, batch_size: int = 32, autocast: bool = True, max_length: int = DEFAULT_MAX_LENGTH,
             max_validation_examples: int | None = None, name: str | None = None) -> EnsemblePredictor:
    """Build an ensemble of experts: pool, weigh, optionally select members on validation.

    Args:
        experts: the candidate members (a list or an :class:`ExpertLibrary`).
        base: the frozen base they were trained on.
        pooling: ``"linear"`` (mixture of probabilities) or ``"log_linear"`` (product, renormalised).
        weights: ``"uniform"``, ``"learned"`` (on ``validation``), or one number per member.
        select: ``None`` (every member), ``"greedy"`` (Caruana forward selection with replacement; with
            ``weights="uniform"`` each member weighs its share of the picks), or ``"topK"`` (e.g. ``"top3"``).
        validation: tasks whose validation split fits weights and selection; required for ``"learned"``
            or a selection.
        temperature: the pooling temperature for uniform or given weights (learned log-linear weights
            learn their own).
        metric: what selection maximises: ``"score"`` (task metrics) or ``"nll"``.
        seed: the seed of the weight fit.
        batch_size, autocast, max_length: scoring settings of the predictor and of the validation pass.
        max_validation_examples: fit on at most this many validation examples per task.
        name: the predictor's name in tables.

    Returns:
        An :class:`EnsemblePredictor`; ``predictor.info`` holds the selection and fit reports.

    Raises:
        ConfigError: empty members, unknown pooling/weights/select/metric, weights of the wrong count or
            NaN, negative linear weights, or learned weights/selection without validation data.
        CompatibilityError / ExpertError: members from different bases, or not over ``base``.
    """
    members = check_member_list(list(experts))
    names = [e.name for e in members]
    spec, selecting = check_options(names, pooling, weights, select, validation, temperature, metric)
    check_members(members, base)
    settings = dict(batch_size=batch_size, autocast=autocast, max_length=max_length)
    if spec != "learned" and selecting is None:
        fit = resolve_weights(spec, pooling, names, temperature=temperature)
        return EnsemblePredictor(base, members, pooling, fit.weights, fit.temperature,
                                 name=name or _name(pooling, len(members), fit.how), info={"weights": fit.how},
                                 **settings)

    # One batched pass over the validation split; everything below only re-pools the cached outputs.
    batched = BatchedEnsemble(base.model, members)
    caches = cache_members(batched, base.tokenizer, validation or [], max_examples=max_validation_examples,
                           **settings)
    del batched
    info: dict[str, Any] = {}
    chosen, fit = list(range(len(members))), WeightFit(uniform_weights(len(members)), temperature, "uniform")
    selection = select_members(select, caches, names, pooling, metric)
    if selection is not None:
        info["selection"] = selection.report()
        chosen = selection.members
        caches = [c.subset(chosen) for c in caches]
        fit = WeightFit(selection.weights, temperature, selection.method)
    if spec == "learned":
        fit = learn_weights(pooling, caches, [names[i] for i in chosen], seed)
        info["learned"] = fit.report
    info["weights"] = fit.how
    info["validation"] = {"score": pooled_score(pooling, caches, fit.weights, fit.temperature),
                          "nll": float(pooled_nll(pooling, caches, fit.weights, fit.temperature)),
                          "tasks": [c.task.name for c in caches], "examples": sum(len(c.labels) for c in caches)}
    how = f"{selection.method}+{fit.how}" if selection is not None and fit.how != selection.method else fit.how
    return EnsemblePredictor(base, [members[i] for i in chosen], pooling, fit.weights, fit.temperature,
                             name=name or _name(pooling, len(chosen), how), info=info, **settings)


def _name(pooling: str, k: int, how: str) -> str:
    return f"ensemble {pooling} K={k} {how}"


class EnsembleCombiner:
    """The ensemble backend as a :class:`~adapterfuse.predictor.Combiner`: a recipe fitted on a library.

    Args:
        base: the frozen base.
        members: names of the library's experts to use (default: all).
        **options: passed to :func:`ensemble` (pooling, weights, select, temperature, metric, seed, …).
    """

    name = "ensemble"

    def __init__(self, base: BaseModel, members: Sequence[str] | None = None, **options: Any) -> None:
        self.base, self.members, self.options = base, list(members) if members else None, options

    def fit(self, library: ExpertLibrary, validation: MultiTaskData | None) -> EnsemblePredictor:
        """Fit on the validation split only (see :func:`ensemble`).

        Raises:
            KeyError: a member name the library lacks.
        """
        experts = [library[n] for n in self.members] if self.members else list(library)
        data = list(validation.values()) if validation else None
        return ensemble(experts, self.base, validation=data, **self.options)
