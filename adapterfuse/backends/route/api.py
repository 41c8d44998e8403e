"""``route()``: experts in, a routed :class:`~adapterfuse.predictor.Predictor` out; and its reports.

Every argument that can be checked without a weight is checked first (router, then, on, target,
pooling, top_k against the number of experts or clusters, validation data where a router fits on it);
then the experts are loaded and checked together against the base; only then does anything run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from adapterfuse.backends.route.crossval import choose_prior_weight
from adapterfuse.backends.route.data import PoolScores, RoutingData, oracle_score, own_expert, routed_score, top1_score
from adapterfuse.backends.route.features import DEFAULT_LAYER, check_on, check_readout, default_shape, resolve_layer
from adapterfuse.backends.route.predictor import ArrowPredictor, RoutePredictor, check_then
from adapterfuse.backends.route.routers.base import Router, check_top_k
from adapterfuse.backends.route.routers.cluster import ClusterRouter
from adapterfuse.backends.route.routers.learned import LearnedRouter, check_fit_options, check_target, target_labels
from adapterfuse.backends.route.routers.mbc import mbc_pool
from adapterfuse.backends.route.routers.utility import UtilityRouter, check_decision, utility_matrix
from adapterfuse.backends.route.subset import greedy_subset
from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.harness import evaluate
from adapterfuse.head import DEFAULT_MAX_LENGTH
from adapterfuse.library import ExpertLibrary, count_experts, load_library
from adapterfuse.predictor import MultiTaskData, Predictor
from adapterfuse.tasks.spec import TaskData

ROUTERS = ("learned", "clustered", "mbc", "arrow")
ACROSS = ("learned", "clustered", "arrow")


def check_arguments(router: str, top_k: int, then: str, on: str, target: str, pooling: str, n_experts: int,
                    mbc_clusters: int | None, across: str, needs_validation: bool, validation: Any,
                    data: Any, decision: str = "probability") -> None:
    """The checks that read no weight, in the order a user would fix them (the CLI runs them first too).

    Raises:
        ConfigError: naming the argument at fault.
    """
    if router not in ROUTERS:
        raise ConfigError(f"router {router!r}: unknown; expected one of {', '.join(ROUTERS)}")
    check_then(then)
    check_on(on)
    check_target(target)
    check_decision(decision, router, target)
    if pooling not in ("linear", "log_linear"):
        raise ConfigError(f"pooling {pooling!r}: unknown; expected 'linear' or 'log_linear'")
    if across not in ACROSS:
        raise ConfigError(f"mbc_router {across!r}: unknown; expected one of {', '.join(ACROSS)}")
    routed_to = n_experts
    if router == "mbc":
        if mbc_clusters is None or isinstance(mbc_clusters, bool) or not 1 <= mbc_clusters <= n_experts:
            raise ConfigError(f"mbc_clusters: expected an integer in 1 .. {n_experts} (the number of experts), "
                              f"got {mbc_clusters!r}")
        routed_to = mbc_clusters
    check_top_k(top_k, routed_to)
    if needs_validation and not validation and data is None:
        raise ConfigError(f"validation: router {router!r} fits on the validation split, got none; pass "
                          "validation=[TaskData, ...] (or router='arrow', which needs no data)")


def route(experts: Any, base: BaseModel, router: str = "learned", top_k: int = 1, then: str = "ensemble",
          validation: Sequence[TaskData] | None = None, on: str = "prompt", *, layer: int = DEFAULT_LAYER,
          shape: bool | int | None = None, readout: str = "mean", target: str = "best_expert", hidden: int = 0,
          epochs: int = 300, lr: float = 1e-2, prior_weight: float | None = None, cv_folds: int = 5,
          pca: int | None = None, decision: str = "probability",
          clusters: int | None = None, cluster_temperature: float = 1.0, mbc_clusters: int | None = None,
          mbc_router: str | None = None, sketch: int | None = None, mbc_merge: str = "uniform",
          temperature: float | Mapping[str, float] = 1.0, budget: int | None = None, pooling: str = "linear",
          seed: int = 0, batch_size: int = 32, autocast: bool = True, max_length: int = DEFAULT_MAX_LENGTH,
          max_validation_examples: int | None = None, data: RoutingData | None = None, name: str | None = None,
          allow_pickle: bool = False) -> RoutePredictor | ArrowPredictor:
    """Route each input to its top-k experts; answer with a pooled ensemble or a merge of them.

    Args:
        experts: :class:`Expert` objects, expert folders or Hub ids, or an :class:`ExpertLibrary`.
        base: the frozen base they were trained on.
        router: ``"learned"`` (classifier on base features), ``"clustered"`` (k-means on them), ``"mbc"``
            (experts clustered by ΔW similarity and merged, then routed by ``mbc_router``) or ``"arrow"``
            (per token, zero-shot).
        top_k: experts kept per input (per token for Arrow).
        then: ``"ensemble"`` (one batched pass over the chosen experts) or ``"merge"`` (linear merge).
        validation: tasks whose validation split the learned/clustered routers (and ``budget``) fit on.
        on: route on the ``"prompt"`` or the raw input ``"fields"`` (no template).
        layer: base layer whose mean-pooled hidden state is the feature (0: embeddings; -1: last).
        shape: append the routing text's shape (field count and lengths) to the features; default:
            only when routing on the raw fields (see :func:`~adapterfuse.backends.route.features.text_shape`).
        readout: ``"mean"`` over the tokens, or ``"mean_last"``: the mean and the last token's state.
        target: what the learned router learns: ``"best_expert"``, the input's ``"task"``,
            ``"likelihood"`` (maximise the routed mixture's validation likelihood; see
            :mod:`~adapterfuse.backends.route.routers.learned`), or ``"task_prior"`` (that likelihood plus a
            prior towards the input's own task's expert).
        hidden: hidden size of the learned router (0: linear).
        epochs, lr: its full-batch training.
        prior_weight: the weight of ``"task_prior"``'s prior; ``None`` chooses it from
            :data:`~adapterfuse.backends.route.crossval.PRIOR_GRID` by ``cv_folds``-fold cross-validation on the
            validation split (``info["prior_cv"]`` holds each weight's out-of-fold score).
        cv_folds: the folds of that cross-validation.
        pca: the learned router first projects the features onto this many principal components of the
            validation features (the text's shape, when appended, passes through); ``None``: no projection.
            On raw GLUE fields, 8 components took task identification from 0.85 to 0.95.
        decision: ``"probability"`` keeps each input's most probable experts; ``"utility"`` (learned router,
            target ``"task"``) keeps those of highest expected validation score under the router's task
            posterior (see :mod:`adapterfuse.backends.route.routers.utility`), weighted by their posterior.
        clusters: k-means clusters (default: the number of experts).
        cluster_temperature: softmax temperature of each cluster's expert distribution.
        mbc_clusters: the number of expert groups for ``"mbc"``.
        mbc_router: how MBC routes across groups: ``"learned"``/``"clustered"`` (default with validation
            data) or ``"arrow"`` (default without).
        sketch: MBC similarity from a random-projection sketch of this side (``None``: exact).
        mbc_merge: ``"uniform"`` (average) or ``"task_arithmetic"`` (sum) within a group.
        temperature: Arrow's softmax temperature (one number or per module name).
        budget: keep at most this many experts, chosen greedily by validation gain (needs validation).
        pooling: pooling of ``then="ensemble"`` with ``top_k > 1``.
        seed: seed of k-means, the router's initialisation, sketches and power iteration.
        batch_size, autocast, max_length: scoring and feature settings.
        max_validation_examples: fit on at most this many validation examples per task.
        data: a :class:`RoutingData` to reuse across calls (its ``on`` and feature settings must match).
        name: the predictor's name in tables.
        allow_pickle: accept ``adapter_model.bin`` (loaded with ``weights_only``).

    Returns:
        A :class:`RoutePredictor` (``info["validation"]`` holds routing accuracy and score) or an
        :class:`ArrowPredictor`.

    Raises:
        ConfigError: an empty expert list, unknown router/then/on/target/pooling/decision (or ``"utility"``
            with another router or target), ``top_k`` larger than
            the experts (or MBC groups), a fitted router without validation data.
        CompatibilityError / ExpertError: experts from different bases, or not from ``base``.
    """
    n = count_experts(experts)
    check_readout(readout)
    across = mbc_router or ("arrow" if not validation and data is None else "learned")
    kind = across if router == "mbc" else router
    check_arguments(router, top_k, then, on, target, pooling, n, mbc_clusters, across,
                    kind != "arrow" or budget is not None, validation, data, decision)
    check_fit_options(prior_weight, cv_folds, pca)
    library = load_library(experts, base, allow_pickle)
    pool, info = list(library), {"router": router}
    if router == "mbc":
        pool, labels = mbc_pool(pool, base, int(mbc_clusters or 1), sketch, seed, mbc_merge)
        info["mbc"] = {"clusters": mbc_clusters, "groups": {e.name: e.meta["members"] for e in pool},
                       "labels": labels, "sketch": sketch, "merge": mbc_merge, "router": across}
    settings = dict(batch_size=batch_size, autocast=autocast, max_length=max_length)
    if kind == "arrow" and budget is None:
        return ArrowPredictor(base, pool, top_k, temperature, seed=seed, name=name, info=info, **settings)
    features = {"layer": layer, "readout": readout, "shape": default_shape(on, shape)}
    data = _routing_data(data, base, validation, on, features, max_validation_examples, settings)
    scores = data.scores(pool)
    if budget is not None:
        subset = greedy_subset(scores, budget)
        check_top_k(top_k, len(subset.members))
        info["subset"] = subset.report()
        pool, scores = [pool[i] for i in subset.members], scores.subset(subset.members)
    if kind == "arrow":
        return ArrowPredictor(base, pool, top_k, temperature, seed=seed, name=name, info=info, **settings)
    fit = {"hidden": hidden, "epochs": epochs, "lr": lr, "seed": seed, "pca": pca or 0,
           "pca_keep": data.extractor.shape_dim}
    if kind == "learned" and target == "task_prior" and prior_weight is None:
        prior_weight, info["prior_cv"] = choose_prior_weight(data.features, scores, [t.name for t in data.row_tasks],
                                                             cv_folds, **fit)
    fitted = _fit(kind, data, scores, target, fit, prior_weight or 0.0, clusters, cluster_temperature)
    info.update(fitted.config())
    if kind == "learned" and target == "task_prior":
        info["prior_weight"] = prior_weight
    if decision == "utility":
        fitted = UtilityRouter(fitted, utility_matrix(scores))
        info.update(decision=decision, utility=[[None if math.isnan(v) else round(v, 4) for v in row]
                                                for row in fitted.utility.tolist()])  # JSON has no NaN
    info["validation"] = validation_report(fitted, data, scores, top_k, pooling)
    return RoutePredictor(base, pool, fitted, top_k, then, on, pooling=pooling, name=name, info=info,
                          **data.extractor.spec, **settings)


def _routing_data(data: RoutingData | None, base: BaseModel, validation: Sequence[TaskData] | None, on: str,
                  features: dict[str, Any], max_examples: int | None, settings: dict[str, Any]) -> RoutingData:
    """The given routing data if it matches ``on`` and the ``features`` settings, else new routing data."""
    if data is None:
        return RoutingData(base, list(validation or []), on, max_examples=max_examples, **features, **settings)
    asked = {"on": on, **features, "layer": resolve_layer(base.model, features["layer"])}
    built = {"on": data.on, **data.extractor.spec}
    if built != asked or data.base is not base:
        raise ConfigError(f"data: routing data was built with {built} on another or the same base; this call asks "
                          f"for {asked}; build a matching RoutingData")
    return data


def _fit(kind: str, data: RoutingData, scores: PoolScores, target: str, fit: dict[str, Any], prior_weight: float,
         clusters: int | None, temperature: float) -> Router:
    """Fit the learned router (``fit``: hidden, epochs, lr, seed) or the clustered one on the cached features."""
    n_experts = len(scores.names)
    if kind == "learned":
        labels = target_labels(target, scores.quality, scores.own)
        return LearnedRouter.fit(data.features, labels, n_experts, target=target, own=scores.own,
                                 prior_weight=prior_weight, **fit)
    return ClusterRouter.fit(data.features, scores.quality, clusters or n_experts, fit["seed"], temperature)


def accuracy_report(top1: torch.Tensor, own: torch.Tensor, best: torch.Tensor | None,
                    tasks: Sequence[str]) -> dict[str, Any]:
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


def validation_report(router: Router, data: RoutingData, scores: PoolScores, top_k: int,
                      pooling: str) -> dict[str, Any]:
    """The router on its own validation split (in-sample): routing accuracy and the pooled score."""
    indices, weights = router.choose(data.features, top_k)
    report = accuracy_report(indices[:, 0], scores.own, scores.best, [t.name for t in data.row_tasks])
    oracle = oracle_score(scores)
    if oracle is not None:
        report["oracle_score"] = oracle
    report["best_score"] = top1_score(scores, scores.best)
    report["score"] = routed_score(scores, indices, weights, pooling)
    return report


def routing_accuracy(predictor: RoutePredictor, data: Sequence[TaskData], split: str = "test",
                     max_examples: int | None = None, against_best: bool = False) -> dict[str, Any]:
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
        rd = RoutingData(predictor.base, view, predictor.on, batch_size=predictor.batch_size,
                         autocast=predictor.autocast, **predictor.extractor.spec)
        best = rd.scores(predictor.experts).best
    return accuracy_report(torch.cat(top1), torch.tensor(own, dtype=torch.long), best, tasks)


def quality_curve(values: Sequence[Any], build: Callable[[Any], Predictor], data: Sequence[TaskData],
                  split: str = "test", max_examples: int | None = None) -> list[dict[str, Any]]:
    """Quality against a size (clusters, MBC groups, budget): build and evaluate one predictor per value.

    Args:
        values: the sizes, e.g. ``range(2, N + 1)``.
        build: size -> predictor, e.g. ``lambda c: route(experts, base, "clustered", clusters=c, ...)``.
        data: the tasks to evaluate on.
        split, max_examples: as in :func:`~adapterfuse.harness.evaluate`.

    Returns:
        One ``{"value", "average", "tasks", "cost", "predictor"}`` per value.
    """
    out = []
    for value in values:
        result = evaluate(build(value), data, split, max_examples)
        out.append({"value": value, "average": result["average"], "tasks": result["tasks"],
                    "cost": result["cost"], "predictor": result["predictor"]})
    return out


class RouteCombiner:
    """The routing backend as a :class:`~adapterfuse.predictor.Combiner`.

    Args:
        base: the frozen base.
        router: see :func:`route`.
        members: names of the library's experts to use (default: all).
        **options: passed to :func:`route`.
    """

    name = "route"

    def __init__(self, base: BaseModel, router: str = "learned", members: Sequence[str] | None = None,
                 **options: Any) -> None:
        self.base, self.router, self.members, self.options = base, router, list(members or []), options

    def fit(self, library: ExpertLibrary, validation: MultiTaskData | None) -> RoutePredictor | ArrowPredictor:
        """Fit on the validation split only (see :func:`route`)."""
        experts: list[Expert] = [library[n] for n in self.members] if self.members else list(library)
        data = list(validation.values()) if validation else None
        return route(experts, self.base, self.router, validation=data, **self.options)
