"""Routed predictors: each input to its top-k experts, then a pooled ensemble or a merge; and Arrow.

:class:`RoutePredictor` routes whole inputs: features of the routing text -> router -> top ``k``. Inputs
that chose the same experts form a group, and each group runs once:

- ``then="ensemble"``: the chosen experts in one batched pass (:class:`~adapterfuse.backends.ensemble.BatchedEnsemble`),
  each input's answers pooled with its own routing weights;
- ``then="merge"``: the linear merge of the chosen experts' ΔW at *that input's* routing weights (a
  weighted average, as the ``uniform`` merge), computed in its exact factored form with the weights
  applied in rank space (:mod:`adapterfuse.backends.route.rowmerge`), so each input gets its own merge in one
  pass and a batch answers as its inputs one at a time.

An input routed to one expert gets exactly that expert's answer either way. Models are cached per
group, so a routing costs one model copy per distinct choice (the base weights are shared).
:class:`ArrowPredictor` (see :mod:`adapterfuse.backends.route.routers.arrow`) routes per token inside the model instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.backends.ensemble.predictor import check_members
from adapterfuse.backends.route.data import pool_rows
from adapterfuse.backends.route.features import FeatureExtractor, FeatureSpec, check_on, default_shape, routing_texts
from adapterfuse.backends.route.routers.arrow import ArrowModel, ArrowSpec, arrow_prototypes, mean_subtracted
from adapterfuse.backends.route.routers.base import Router, check_top_k, load_router
from adapterfuse.backends.route.rowmerge import RowMergeModel
from adapterfuse.backends.route.saved import EXPERTS, TENSORS, SavedPool
from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert, load_member
from adapterfuse.harness import adapter_params
from adapterfuse.head import Scoring, predict_proba
from adapterfuse.io.manifest import Manifest, member_entries, read_manifest
from adapterfuse.predictor import Cost
from adapterfuse.tasks.spec import Example, TaskSpec

THEN = ("ensemble", "merge")
FALLBACKS = ("mix", "base")
_MAX_CACHED = 64


def check_then(then: str) -> str:
    """Return ``then`` if it is ``"ensemble"`` or ``"merge"``.

    Raises:
        ConfigError: otherwise.
    """
    if then not in THEN:
        raise ConfigError(f"then {then!r}: unknown; expected one of {', '.join(THEN)}")
    return then


@dataclass(frozen=True)
class Choice:
    """Which experts answer an input, and how their answers combine.

    Attributes:
        top_k: experts kept per input.
        then: ``"ensemble"`` (the chosen experts pooled) or ``"merge"`` (their ΔW merged at the input's weights).
        pooling: ``"linear"`` or ``"log_linear"`` (``then="ensemble"`` with ``top_k > 1``).
        abstain_below: an input whose router gives no expert at least this probability is not routed
            (``None``: every input is routed); it gets ``fallback`` instead.
        fallback: ``"mix"`` (the uniform merge of every expert, one pass) or ``"base"`` (the base alone).
    """

    top_k: int = 1
    then: str = "ensemble"
    pooling: str = "linear"
    abstain_below: float | None = None
    fallback: str = "mix"


class RoutePredictor(SavedPool):
    """Sequence-level routing over a pool of experts (a :class:`~adapterfuse.predictor.Predictor`).

    Args:
        base: the frozen base (never modified).
        pool: the experts the router distributes over, in its column order.
        router: the router (its ``n_experts`` must equal ``len(pool)``).
        choice: experts kept per input (``top_k``), ``then`` ensemble or merge, and ``pooling``.
        features: what the router sees (text, layer, shape, readout): what it was fitted on.
        scoring: scoring and feature settings.
        name: shown in tables.
        info: fit reports (routing accuracy, clusters, subsets …), saved with it.

    Raises:
        ConfigError: an empty pool, a router of another size, a bad top_k, then, on or pooling.
    """

    def __init__(
        self,
        base: BaseModel,
        pool: Sequence[Expert],
        router: Router,
        choice: Choice = Choice(),
        features: FeatureSpec = FeatureSpec(),
        scoring: Scoring = Scoring(),
        name: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        if not pool:
            raise ConfigError("experts: expected at least one expert to route to, got none")
        if router.n_experts != len(pool):
            raise ConfigError(f"router: distributes over {router.n_experts} experts, but the pool has {len(pool)}")
        top_k, then, on, pooling = choice.top_k, choice.then, features.on, choice.pooling
        if pooling not in ("linear", "log_linear"):
            raise ConfigError(f"pooling {pooling!r}: unknown; expected 'linear' or 'log_linear'")
        if choice.fallback not in FALLBACKS:
            raise ConfigError(f"fallback {choice.fallback!r}: unknown; expected one of {', '.join(FALLBACKS)}")
        self.router, self.top_k = router, check_top_k(top_k, len(pool))
        self.then, self.on, self.pooling = check_then(then), check_on(on), pooling
        self.abstain_below, self.fallback = choice.abstain_below, choice.fallback
        self._setup(base, pool, name or f"route {router.kind} top{top_k} {then} ({on})", info, scoring)
        self.extractor = FeatureExtractor(
            base,
            features.layer,
            scoring.batch_size,
            scoring.autocast,
            scoring.max_length,
            default_shape(on, features.shape),
            features.readout,
        )
        self._models: dict[tuple[str, tuple[int, ...]], BatchedEnsemble | RowMergeModel] = {}

    def route(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [n, k], weights [n, k])`` for ``[n, d]`` features."""
        return self.router.choose(features, self.top_k)

    def choose(self, task: TaskSpec, batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k experts and weights of each input (see :meth:`route`)."""
        return self.route(self.extractor.encode(routing_texts(task, batch, self.on)))

    def abstains(self, features: torch.Tensor) -> torch.Tensor:
        """``[n]`` bool: the inputs whose router gives no expert ``abstain_below`` probability (all False
        when the predictor always routes)."""
        if self.abstain_below is None:
            return torch.zeros(features.shape[0], dtype=torch.bool)
        return self.router.probs(features).max(dim=1).values < self.abstain_below

    def _fallback(self, task: TaskSpec, examples: list[Example]) -> torch.Tensor:
        """What an input the router abstains on gets: every expert merged uniformly, or the base alone."""
        settings = (self.scoring.batch_size, self.scoring.autocast, self.scoring.max_length)
        if self.fallback == "base":
            return predict_proba(self.base.model, self.base.tokenizer, task, examples, *settings)
        everyone = tuple(range(len(self.experts)))
        uniform = torch.full((len(examples), len(everyone)), 1.0 / len(everyone))
        model = self._model(("merge", everyone))
        return model.log_probs(self.base.tokenizer, task, examples, uniform, *settings).exp()

    def _model(self, key: tuple[str, tuple[int, ...]]) -> BatchedEnsemble | RowMergeModel:
        """The cached model of a group: the chosen experts batched, or their per-input merge."""
        if key not in self._models:
            how, members = key
            if how == "merge":
                model: BatchedEnsemble | RowMergeModel = RowMergeModel(
                    self.base.model, [self.experts[m].deltas for m in members]
                )
            else:
                model = BatchedEnsemble(self.base.model, [self.experts[m] for m in members])
            if len(self._models) >= _MAX_CACHED:
                self._models.pop(next(iter(self._models)))
            self._models[key] = model
        return self._models[key]

    def _run(
        self,
        task: TaskSpec,
        batch: Sequence[Example],
        features: torch.Tensor,
        routed: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Answer each input with its chosen experts, one pass per group of equal choices (``routed`` is
        what :meth:`route` gave for ``features``); an input the router abstains on gets the fallback."""
        indices, weights = routed
        out = torch.empty((len(batch), task.n_labels), dtype=torch.float32)
        abstained = self.abstains(features)
        if abstained.any():
            rows = abstained.nonzero().flatten().tolist()
            out[rows] = self._fallback(task, [batch[i] for i in rows])
        order = torch.argsort(indices, dim=1, stable=True)  # a group is a *set* of experts
        members = torch.gather(indices, 1, order)
        w = torch.gather(weights, 1, order)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(members.tolist()):
            if not abstained[i]:
                groups.setdefault(tuple(row), []).append(i)
        for group, rows in groups.items():
            examples = [batch[i] for i in rows]
            settings = (self.scoring.batch_size, self.scoring.autocast, self.scoring.max_length)
            if self.then == "merge" and len(group) > 1:
                model = self._model(("merge", group))
                out[rows] = model.log_probs(self.base.tokenizer, task, examples, w[rows], *settings).exp()
            else:  # one expert is the same either way; its answer is exactly that expert's
                lp = self._model(("ensemble", group)).member_log_probs(self.base.tokenizer, task, examples, *settings)
                out[rows] = pool_rows(self.pooling, lp, w[rows])
        return out

    def predict_proba(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """``[n, n_labels]`` probabilities over the task's label words, in the input order."""
        if not batch:
            return torch.empty((0, task.n_labels))
        features = self.extractor.encode(routing_texts(task, batch, self.on))
        return self._run(task, batch, features, self.route(features))

    def predict_mixed(self, items: Sequence[tuple[TaskSpec, Example]]) -> list[torch.Tensor]:
        """Route inputs of several tasks together (one feature batch), then answer each task's inputs.

        Args:
            items: ``(task, example)`` pairs, tasks mixed in any order.

        Returns:
            One ``[n_labels]`` probability vector per item, in the input order.
        """
        features = self.extractor.encode([routing_texts(t, [e], self.on)[0] for t, e in items])
        indices, weights = self.route(features)
        out: list[torch.Tensor | None] = [None] * len(items)
        by_task: dict[str, list[int]] = {}
        for i, (task, _) in enumerate(items):
            by_task.setdefault(task.name, []).append(i)
        for rows in by_task.values():
            task = items[rows[0]][0]
            probs = self._run(task, [items[i][1] for i in rows], features[rows], (indices[rows], weights[rows]))
            for j, i in enumerate(rows):
                out[i] = probs[j]
        return out  # type: ignore[return-value]

    def cost(self) -> Cost:
        """Adapters and router stored; passes: ``k`` members (ensemble) or 1 (merge), plus the feature pass."""
        params = adapter_params(self.experts) + self.router.n_params()
        passes = (self.top_k if self.then == "ensemble" else 1) + self.extractor.fraction
        return Cost(stored_params=params, forward_passes=float(passes), memory_bytes=4 * params)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the pool's expert folders, ``router.safetensors`` and ``manifest.json`` (kind ``route``), atomically.

        Raises:
            OutputExistsError: if ``path`` exists and ``overwrite`` is false.
        """
        router = {"kind": self.router.kind, "config": self.router.config()}
        extra = {
            "top_k": self.top_k,
            "then": self.then,
            "on": self.on,
            "pooling": self.pooling,
            "features": self.extractor.spec,
            **({"abstain": {"below": self.abstain_below, "fallback": self.fallback}} if self.abstain_below else {}),
        }
        self._write(path, "route", self._settings(router, extra), self.router.tensors(), overwrite)

    @classmethod
    def load(
        cls, path: str | Path, base: BaseModel, verify: bool = True, **overrides: Any
    ) -> RoutePredictor | ArrowPredictor:
        """Load a folder written by :meth:`save` or :meth:`ArrowPredictor.save` (or as ``route.json``) onto ``base``.

        Args:
            path: the folder.
            base: the base the experts were trained on (checked by fingerprint).
            verify: check every file's sha256 against the manifest.
            overrides: scoring settings to change (``batch_size``, ``autocast``, ``max_length``).

        Returns:
            The predictor, routing exactly as when it was saved.

        Raises:
            ExpertError: a missing or invalid manifest, a changed file, or a bad expert folder.
            CompatibilityError: experts trained on another base.
        """
        folder = Path(path)
        return load_routed(folder, read_manifest(folder, verify, kinds=("route", "arrow")), base, **overrides)


class ArrowPredictor(SavedPool):
    """Arrow routing (per token, per layer; zero-shot) as a :class:`~adapterfuse.predictor.Predictor`.

    Args:
        base: the frozen base (never modified).
        pool: the experts.
        arrow: experts per token (``top_k``), the softmax ``temperature`` (one number, or per module name
            with an optional ``"default"``) and the ``seed`` of the power iteration.
        prototypes: precomputed prototypes (module -> ``[E, in]``); computed by power iteration if ``None``.
        scoring, name, info: as for :class:`RoutePredictor`.

    Raises:
        ConfigError: an empty pool, a bad top_k or temperature.
    """

    def __init__(
        self,
        base: BaseModel,
        pool: Sequence[Expert],
        arrow: ArrowSpec = ArrowSpec(),
        prototypes: Mapping[str, torch.Tensor] | None = None,
        scoring: Scoring = Scoring(),
        name: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        if not pool:
            raise ConfigError("experts: expected at least one expert to route to, got none")
        top_k, temperature, seed = arrow.top_k, arrow.temperature, arrow.seed
        self.top_k, self.temperature, self.seed = check_top_k(top_k, len(pool)), temperature, seed
        self.subtract_mean = arrow.subtract_mean
        self._setup(base, pool, name or f"route arrow top{top_k}", info, scoring)
        deltas = [e.deltas for e in pool]
        if prototypes is None and arrow.subtract_mean:
            prototypes = arrow_prototypes(mean_subtracted(deltas), seed)
        self.arrow = ArrowModel(base.model, deltas, top_k, temperature, prototypes, seed)

    def predict_proba(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """``[n, n_labels]`` probabilities over the task's label words, in the input order."""
        if not batch:
            return torch.empty((0, task.n_labels))
        s = self.scoring
        return predict_proba(self.arrow.model, self.base.tokenizer, task, batch, s.batch_size, s.autocast, s.max_length)

    def cost(self) -> Cost:
        """Every expert's adapter and the prototypes stored; one (fused) forward pass per input."""
        params = adapter_params(self.experts) + sum(p.numel() for p in self.arrow.prototypes.values())
        return Cost(stored_params=params, forward_passes=1.0, memory_bytes=4 * params)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the expert folders, the prototypes and ``manifest.json`` (kind ``arrow``; see :func:`load_routed`)."""
        temperature = dict(self.temperature) if isinstance(self.temperature, Mapping) else self.temperature
        config = {"top_k": self.top_k, "temperature": temperature, "seed": self.seed}
        router = {"kind": "arrow", "config": {**config, **({"subtract_mean": True} if self.subtract_mean else {})}}
        tensors = {f"proto.{m}": p for m, p in self.arrow.prototypes.items()}
        self._write(path, "arrow", self._settings(router, {"top_k": self.top_k}), tensors, overwrite)

    load = RoutePredictor.load


def load_routed(folder: Path, manifest: Manifest, base: BaseModel, **overrides: Any) -> RoutePredictor | ArrowPredictor:
    """Rebuild a routed predictor (kind ``route`` or ``arrow``) from its checked manifest.

    Args:
        folder: the saved folder.
        manifest: its manifest (see :func:`adapterfuse.io.manifest.read_manifest`).
        base: the base the experts were trained on (checked by fingerprint).
        overrides: scoring settings to change.

    Returns:
        The predictor, routing exactly as when it was saved.

    Raises:
        ExpertError: a bad expert entry or folder.
        CompatibilityError: experts trained on another base.
    """
    settings = manifest.settings
    entries = member_entries(folder, manifest, "experts")
    experts = [load_member(folder / EXPERTS / m["folder"], m, manifest) for m in entries]
    check_members(experts, base)
    tensors = load_file(str(folder / TENSORS))
    scoring = Scoring(**{**settings.get("scoring", {}), **overrides})
    router = settings["router"]
    if manifest.kind == "arrow":
        protos = {k[len("proto.") :]: v for k, v in tensors.items() if k.startswith("proto.")}
        cfg = router["config"]
        arrow = ArrowSpec(cfg["top_k"], cfg["temperature"], cfg.get("seed", 0), cfg.get("subtract_mean", False))
        return ArrowPredictor(base, experts, arrow, protos, scoring, name=manifest.name, info=settings.get("info"))
    # Folders saved before features had a shape or a readout were fitted on the plain mean; those saved
    # before shape versions (``"shape": true``) on the four counts of version 1.
    features = {"shape": False, "readout": "mean", **settings["features"]}
    features["shape"] = 1 if features["shape"] is True else features["shape"]
    return RoutePredictor(
        base,
        experts,
        load_router(router["kind"], router["config"], tensors),
        Choice(settings["top_k"], settings["then"], settings["pooling"], *_abstain(settings)),
        FeatureSpec(settings["on"], **features),
        scoring,
        name=manifest.name,
        info=settings.get("info"),
    )


def _abstain(settings: dict[str, Any]) -> tuple[float | None, str]:
    """``(abstain_below, fallback)`` of a saved route (none saved: it always routes)."""
    abstain = settings.get("abstain") or {}
    return abstain.get("below"), abstain.get("fallback", "mix")
