"""``route()``: experts in, a routed :class:`~adapterfuse.predictor.Predictor` out; and its reports.

Every option is checked first, by :class:`~adapterfuse.backends.route.config.RouteConfig` and then
against the number of experts and the validation data (:func:`~adapterfuse.backends.route.config.check_route`);
then the experts are loaded and checked together against the base; only then does anything run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from adapterfuse.backends.merge.emr import emr_experts
from adapterfuse.backends.options import given_or_built
from adapterfuse.backends.route.config import RouteConfig, check_route
from adapterfuse.backends.route.crossval import choose_prior_weight
from adapterfuse.backends.route.data import PoolScores, RoutingData, oracle_score, own_expert, routed_score, top1_score
from adapterfuse.backends.route.features import FeatureSpec, default_shape, resolve_layer
from adapterfuse.backends.route.predictor import ArrowPredictor, Choice, RoutePredictor
from adapterfuse.backends.route.routers.arrow import ArrowSpec
from adapterfuse.backends.route.routers.base import Router, check_top_k
from adapterfuse.backends.route.routers.cluster import ClusterRouter
from adapterfuse.backends.route.routers.learned import FitOptions, LearnedRouter, target_labels
from adapterfuse.backends.route.routers.mbc import mbc_pool
from adapterfuse.backends.route.routers.utility import UtilityRouter, utility_matrix
from adapterfuse.backends.route.subset import greedy_subset
from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.harness import evaluate
from adapterfuse.head import Scoring
from adapterfuse.library import ExpertLibrary, count_experts, load_library
from adapterfuse.predictor import MultiTaskData, Predictor
from adapterfuse.tasks.spec import TaskData, check_disjoint


def route(
    experts: Any,
    base: BaseModel,
    config: RouteConfig | None = None,
    validation: Sequence[TaskData] | None = None,
    *,
    data: RoutingData | None = None,
    allow_pickle: bool = False,
    **options: Any,
) -> RoutePredictor | ArrowPredictor:
    """Route each input to its top-k experts; answer with a pooled ensemble or a merge of them.

    Args:
        experts: :class:`Expert` objects, expert folders or Hub ids, or an :class:`ExpertLibrary`.
        base: the frozen base they were trained on.
        config: the options as a :class:`~adapterfuse.backends.route.config.RouteConfig` (see there for
            each option); or give them as keywords instead (``router="learned", top_k=1, ...``).
        validation: tasks whose validation split the learned/clustered routers (and ``budget``) fit on.
        data: a :class:`RoutingData` to reuse across calls (its ``on`` and feature settings must match).
        allow_pickle: accept ``adapter_model.bin`` (loaded with ``weights_only``).
        **options: the fields of :class:`~adapterfuse.backends.route.config.RouteConfig` (when no
            ``config`` is given).

    Returns:
        A :class:`RoutePredictor` (``info["validation"]`` holds routing accuracy and score) or an
        :class:`ArrowPredictor`.

    Raises:
        ConfigError: an empty expert list, an unknown or invalid option (naming it), both ``config`` and
            options, ``top_k`` larger than the experts (or MBC groups), a fitted router without
            validation data, validation examples that also appear in the test split.
        CompatibilityError / ExpertError: experts from different bases, or not from ``base``.
    """
    config = given_or_built(RouteConfig, config, options, "route", "router")
    n = count_experts(experts)
    has_data = bool(validation) or data is not None
    check_route(config, n, has_data)
    check_disjoint(validation)
    library = load_library(experts, base, allow_pickle)
    across, kind = config.across(has_data), config.kind(has_data)
    pool, info = list(library), {"router": config.router}
    if config.router == "mbc":
        pool, labels = mbc_pool(pool, base, int(config.mbc_clusters or 1), config.sketch, config.seed, config.mbc_merge)
        info["mbc"] = {
            "clusters": config.mbc_clusters,
            "groups": {e.name: e.meta["members"] for e in pool},
            "labels": labels,
            "sketch": config.sketch,
            "merge": config.mbc_merge,
            "router": across,
        }
    if config.emr:
        pool, info["emr"] = emr_experts(pool, base)
    scoring = Scoring(config.batch_size, config.autocast, config.max_length)
    arrow = ArrowSpec(config.top_k, config.temperature, config.seed, config.subtract_mean)
    if kind == "arrow" and config.budget is None:
        return ArrowPredictor(base, pool, arrow, scoring=scoring, name=config.name, info=info)
    data = _routing_data(data, base, validation, config, scoring)
    scores = data.scores(pool)
    if config.budget is not None:
        subset = greedy_subset(scores, config.budget)
        check_top_k(config.top_k, len(subset.members))
        info["subset"] = subset.report()
        pool, scores = [pool[i] for i in subset.members], scores.subset(subset.members)
    if kind == "arrow":
        return ArrowPredictor(base, pool, arrow, scoring=scoring, name=config.name, info=info)
    fitted = _fit(kind, data, scores, config, info)
    info["validation"] = validation_report(fitted, data, scores, config.top_k, config.pooling)
    below = None
    if config.abstain is not None:  # the confidence that the given share of validation inputs falls short of
        below = float(torch.quantile(fitted.probs(data.features).max(dim=1).values.double(), config.abstain))
        info["abstain"] = {"share": config.abstain, "below": below, "fallback": config.fallback}
    return RoutePredictor(
        base,
        pool,
        fitted,
        Choice(config.top_k, config.then, config.pooling, below, config.fallback),
        FeatureSpec(config.on, **data.extractor.spec),
        scoring,
        name=config.name,
        info=info,
    )


def _routing_data(
    data: RoutingData | None,
    base: BaseModel,
    validation: Sequence[TaskData] | None,
    config: RouteConfig,
    scoring: Scoring,
) -> RoutingData:
    """The given routing data if it matches the config's ``on`` and feature settings, else new routing data."""
    features = {"layer": config.layer, "readout": config.readout, "shape": default_shape(config.on, config.shape)}
    if data is None:
        return RoutingData(
            base,
            list(validation or []),
            config.on,
            scoring=scoring,
            max_examples=config.max_validation_examples,
            **features,
        )
    asked = {"on": config.on, **features, "layer": resolve_layer(base.model, features["layer"])}
    built = {"on": data.on, **data.extractor.spec}
    if built != asked or data.base is not base:
        raise ConfigError(
            f"data: routing data was built with {built} on another or the same base; this call asks "
            f"for {asked}; build a matching RoutingData"
        )
    return data


def _fit(kind: str, data: RoutingData, scores: PoolScores, config: RouteConfig, info: dict[str, Any]) -> Router:
    """Fit the learned router or the clustered one on the cached features; record its settings in ``info``."""
    n_experts = len(scores.names)
    if kind != "learned":
        fitted: Router = ClusterRouter.fit(
            data.features, scores.quality, config.clusters or n_experts, config.seed, config.cluster_temperature
        )
        info.update(fitted.config())
        return fitted
    fit = {**config.fit_options(), "pca_keep": data.extractor.shape_dim}
    prior_weight = config.prior_weight
    if config.target == "task_prior" and prior_weight is None:
        prior_weight, info["prior_cv"] = choose_prior_weight(
            data.features, scores, [t.name for t in data.row_tasks], config.cv_folds, **fit
        )
    labels = target_labels(config.target, scores.quality, scores.own)
    options = FitOptions(target=config.target, prior_weight=prior_weight or 0.0, **fit)
    fitted = LearnedRouter.fit(data.features, labels, n_experts, options, scores.own)
    info.update(fitted.config())
    if config.target == "task_prior":
        info["prior_weight"] = prior_weight
    if config.decision == "utility":
        fitted = UtilityRouter(fitted, utility_matrix(scores))
        info.update(
            decision=config.decision,
            utility=[[None if math.isnan(v) else round(v, 4) for v in row] for row in fitted.utility.tolist()],
        )  # JSON has no NaN
    return fitted


def accuracy_report(
    top1: torch.Tensor, own: torch.Tensor, best: torch.Tensor | None, tasks: Sequence[str]
) -> dict[str, Any]:
    """Routing accuracy against the oracle assignment (and the best-expert assignment), overall and per task.

    Args:
        top1: ``[N]`` the routed expert of each input.
        own: ``[N]`` its oracle expert (``-1``: none, left out of the oracle accuracy).
        best: ``[N]`` its best expert, if known.
        tasks: the task name of each input.
    """

    def acc(mask: torch.Tensor, want: torch.Tensor) -> float | None:
        return float((top1[mask] == want[mask]).float().mean()) if bool(mask.any()) else None

    names = list(dict.fromkeys(tasks))
    per_task: dict[str, dict[str, float | None]] = {}
    for name in names:
        rows = torch.tensor([t == name for t in tasks])
        per_task[name] = {"oracle": acc(rows & (own >= 0), own)}
        if best is not None:
            per_task[name]["best"] = acc(rows, best)
    out: dict[str, Any] = {"oracle": acc(own >= 0, own), "tasks": per_task}
    if best is not None:
        out["best"] = acc(torch.ones_like(top1, dtype=torch.bool), best)
    return out


def validation_report(
    router: Router, data: RoutingData, scores: PoolScores, top_k: int, pooling: str
) -> dict[str, Any]:
    """The router on its own validation split (in-sample): routing accuracy and the pooled score."""
    indices, weights = router.choose(data.features, top_k)
    report = accuracy_report(indices[:, 0], scores.own, scores.best, [t.name for t in data.row_tasks])
    oracle = oracle_score(scores)
    if oracle is not None:
        report["oracle_score"] = oracle
    report["best_score"] = top1_score(scores, scores.best)
    report["score"] = routed_score(scores, indices, weights, pooling)
    return report


def routing_accuracy(
    predictor: RoutePredictor,
    data: Sequence[TaskData],
    split: str = "test",
    max_examples: int | None = None,
    against_best: bool = False,
) -> dict[str, Any]:
    """How often the predictor's top-1 expert is the oracle's (each task's own expert) on a split.

    Args:
        predictor: a sequence-level routed predictor (Arrow routes per token and has no such number).
        data: the tasks.
        split: ``"test"`` or ``"validation"``.
        max_examples: the first this many examples per task.
        against_best: also compare with each input's best expert (one batched pass over the pool).

    Returns:
        ``{"oracle", "tasks": {task: {"oracle"[, "best"]}}[, "best"]}``.
    """
    if not isinstance(predictor, RoutePredictor):
        raise ConfigError(f"routing_accuracy: expected a RoutePredictor, got {type(predictor).__name__}")
    top1, own, tasks = [], [], []
    for td in data:
        examples = list(getattr(td, split)[:max_examples])
        top1.append(predictor.choose(td.task, examples)[0][:, 0])
        own += [own_expert(td.task, predictor.experts)] * len(examples)
        tasks += [td.task.name] * len(examples)
    best = None
    if against_best:
        view = [TaskData(td.task, [], list(getattr(td, split)[:max_examples]), []) for td in data]
        scoring = Scoring(predictor.scoring.batch_size, predictor.scoring.autocast)
        rd = RoutingData(predictor.base, view, predictor.on, scoring=scoring, **predictor.extractor.spec)
        best = rd.scores(predictor.experts).best
    return accuracy_report(torch.cat(top1), torch.tensor(own, dtype=torch.long), best, tasks)


def quality_curve(
    values: Sequence[Any],
    build: Callable[[Any], Predictor],
    data: Sequence[TaskData],
    split: str = "test",
    max_examples: int | None = None,
) -> list[dict[str, Any]]:
    """Quality against a size (clusters, MBC groups, budget): build and evaluate one predictor per value.

    Args:
        values: the sizes, e.g. ``range(2, N + 1)``.
        build: size -> predictor, e.g. ``lambda c: route(experts, base, router="clustered", clusters=c, ...)``.
        data: the tasks to evaluate on.
        split, max_examples: as in :func:`~adapterfuse.harness.evaluate`.

    Returns:
        One ``{"value", "average", "tasks", "cost", "predictor"}`` per value.
    """
    out = []
    for value in values:
        result = evaluate(build(value), data, split, max_examples)
        out.append(
            {
                "value": value,
                "average": result["average"],
                "tasks": result["tasks"],
                "cost": result["cost"],
                "predictor": result["predictor"],
            }
        )
    return out


class RouteCombiner:
    """The routing backend as a :class:`~adapterfuse.backends.base.Combiner`.

    Args:
        base: the frozen base.
        config: the validated options (see :class:`~adapterfuse.backends.route.config.RouteConfig`).
        members: names of the library's experts to use (default: all).
    """

    name = "route"

    def __init__(self, base: BaseModel, config: RouteConfig, members: Sequence[str] | None = None) -> None:
        self.base, self.config, self.members = base, config, list(members or [])

    def fit(self, library: ExpertLibrary, validation: MultiTaskData | None) -> RoutePredictor | ArrowPredictor:
        """Fit on the validation split only (see :func:`route`)."""
        experts: list[Expert] = [library[n] for n in self.members] if self.members else list(library)
        data = list(validation.values()) if validation else None
        return route(experts, self.base, self.config, validation=data)
