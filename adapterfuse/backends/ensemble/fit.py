"""The ensemble backend's entry points: :func:`ensemble` and :class:`EnsembleCombiner`.

Every option is validated before any heavy work (no model copy, no forward pass), by
:class:`~adapterfuse.backends.ensemble.config.EnsembleConfig` and then against the members (weight
count, NaN, sign) and the validation data (needed when weights are learned or members selected); then
the members' compatibility (one base).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.backends.ensemble.cache import cache_members, pooled_nll, pooled_score
from adapterfuse.backends.ensemble.config import EnsembleConfig, check_ensemble
from adapterfuse.backends.ensemble.predictor import EnsemblePredictor, check_member_list, check_members
from adapterfuse.backends.ensemble.select import select_members
from adapterfuse.backends.ensemble.weights import WeightFit, learn_weights, resolve_weights, uniform_weights
from adapterfuse.backends.options import given_or_built
from adapterfuse.base import BaseModel
from adapterfuse.expert import Expert
from adapterfuse.head import Scoring
from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import MultiTaskData
from adapterfuse.tasks.spec import TaskData, check_disjoint


def ensemble(
    experts: Iterable[Expert] | ExpertLibrary,
    base: BaseModel,
    config: EnsembleConfig | None = None,
    validation: Sequence[TaskData] | None = None,
    **options: Any,
) -> EnsemblePredictor:
    """Build an ensemble of experts: pool, weigh, optionally select members on validation.

    Args:
        experts: the candidate members (a list or an :class:`ExpertLibrary`).
        base: the frozen base they were trained on.
        config: the options as an :class:`~adapterfuse.backends.ensemble.config.EnsembleConfig` (see there
            for each option); or give them as keywords instead (``pooling="linear", weights="learned"``).
        validation: tasks whose validation split fits weights and selection; required for learned weights
            or a selection.
        **options: the fields of :class:`~adapterfuse.backends.ensemble.config.EnsembleConfig` (when no
            ``config`` is given).

    Returns:
        An :class:`EnsemblePredictor`; ``predictor.info`` holds the selection and fit reports.

    Raises:
        ConfigError: empty members, an unknown or invalid option (naming it), both ``config`` and options,
            weights of the wrong count or NaN, negative linear weights, or learned weights/selection
            without validation data, or validation examples that also appear in the test split.
        CompatibilityError / ExpertError: members from different bases, or not over ``base``.
    """
    config = given_or_built(EnsembleConfig, config, options, "ensemble", "pooling")
    members = check_member_list(list(experts))
    names = [e.name for e in members]
    check_ensemble(config, names, bool(validation))
    check_disjoint(validation)
    pooling, weights, temperature, name = config.pooling, config.weights, config.temperature, config.name
    check_members(members, base)
    settings = dict(batch_size=config.batch_size, autocast=config.autocast, max_length=config.max_length)
    if not config.fits:
        fit = resolve_weights(weights, pooling, names, temperature=temperature)
        return EnsemblePredictor(
            base,
            members,
            pooling,
            fit.weights,
            fit.temperature,
            Scoring(**settings),
            name=name or _name(pooling, len(members), fit.how),
            info={"weights": fit.how},
        )

    # One batched pass over the validation split; everything below only re-pools the cached outputs.
    batched = BatchedEnsemble(base.model, members)
    caches = cache_members(
        batched, base.tokenizer, validation or [], max_examples=config.max_validation_examples, **settings
    )
    del batched
    info: dict[str, Any] = {}
    chosen, fit = list(range(len(members))), WeightFit(uniform_weights(len(members)), temperature, "uniform")
    selection = select_members(config.select, caches, names, pooling, config.metric)
    if selection is not None:
        info["selection"] = selection.report()
        chosen = selection.members
        caches = [c.subset(chosen) for c in caches]
        fit = WeightFit(selection.weights, temperature, selection.method)
    if weights == "learned":
        fit = learn_weights(pooling, caches, [names[i] for i in chosen], config.seed)
        info["learned"] = fit.report
    info["weights"] = fit.how
    info["validation"] = {
        "score": pooled_score(pooling, caches, fit.weights, fit.temperature),
        "nll": float(pooled_nll(pooling, caches, fit.weights, fit.temperature)),
        "tasks": [c.task.name for c in caches],
        "examples": sum(len(c.labels) for c in caches),
    }
    how = f"{selection.method}+{fit.how}" if selection is not None and fit.how != selection.method else fit.how
    return EnsemblePredictor(
        base,
        [members[i] for i in chosen],
        pooling,
        fit.weights,
        fit.temperature,
        Scoring(**settings),
        name=name or _name(pooling, len(chosen), how),
        info=info,
    )


def _name(pooling: str, k: int, how: str) -> str:
    return f"ensemble {pooling} K={k} {how}"


class EnsembleCombiner:
    """The ensemble backend as a :class:`~adapterfuse.backends.base.Combiner`: a recipe fitted on a library.

    Args:
        base: the frozen base.
        config: the validated options (see :class:`~adapterfuse.backends.ensemble.config.EnsembleConfig`).
        members: names of the library's experts to use (default: all).
    """

    name = "ensemble"

    def __init__(self, base: BaseModel, config: EnsembleConfig, members: Sequence[str] | None = None) -> None:
        self.base, self.config, self.members = base, config, list(members) if members else None

    def fit(self, library: ExpertLibrary, validation: MultiTaskData | None) -> EnsemblePredictor:
        """Fit on the validation split only (see :func:`ensemble`).

        Raises:
            KeyError: a member name the library lacks.
        """
        experts = [library[n] for n in self.members] if self.members else list(library)
        data = list(validation.values()) if validation else None
        return ensemble(experts, self.base, self.config, validation=data)
