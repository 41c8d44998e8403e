"""EnsemblePredictor: K experts pooled over one batched pass, saved as a folder that loads again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.backends.ensemble.pooling import check_pooling, check_temperature, check_weights, pool
from adapterfuse.backends.ensemble.weights import uniform_weights
from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert, load_member
from adapterfuse.harness import adapter_params
from adapterfuse.head import Scoring
from adapterfuse.io.atomic import atomic_dir
from adapterfuse.io.manifest import Manifest, member_entries, member_folders, read_manifest, write_manifest
from adapterfuse.library import ExpertLibrary, check_against_base
from adapterfuse.predictor import Cost
from adapterfuse.tasks.spec import Example, TaskSpec


def check_member_list(experts: Sequence[Expert]) -> list[Expert]:
    """The members must be a non-empty list of :class:`Expert` objects (cheap; reads no weights).

    Raises:
        ConfigError: no members, or something that is not an :class:`Expert`.
    """
    members = list(experts)
    if not members:
        raise ConfigError("experts: expected at least one expert to ensemble, got an empty list")
    for i, e in enumerate(members):
        if not isinstance(e, Expert):
            raise ConfigError(f"experts: item {i} is a {type(e).__name__}; expected an Expert (Expert.load(path))")
    return members


def check_members(experts: Sequence[Expert], base: BaseModel | None = None) -> ExpertLibrary:
    """The members must be experts over one base (and that base, if given): the library's one check.

    Raises:
        ConfigError: see :func:`check_member_list`.
        CompatibilityError / ExpertError: see :meth:`ExpertLibrary.check`.
    """
    library = ExpertLibrary(check_member_list(experts), base.fingerprint if base is not None else None)
    if base is not None:
        check_against_base(library, base)
    return library


class EnsemblePredictor:
    """K experts over one frozen base, pooled over their label-word distributions.

    Implements the :class:`~adapterfuse.predictor.Predictor` protocol. Every batch of inputs runs once,
    replicated for the K members inside one forward pass (see :class:`BatchedEnsemble`).

    Args:
        base: the frozen base (never modified; a private copy carries the adapters).
        experts: the members.
        pooling: ``"linear"`` or ``"log_linear"``.
        weights: one weight per member, or ``None``/``"uniform"`` for equal weights.
        temperature: the pooling temperature (see :mod:`adapterfuse.backends.ensemble.pooling`).
        scoring: batch size (each batch runs as ``K * batch_size`` rows), bf16 autocast (the low-rank parts
            too, as in PEFT; label logits stay fp32) and prompt length cap.
        name: shown in tables (default: describes the pooling and K).
        info: how the ensemble was fitted (selection, learned weights), kept in its manifest.

    Raises:
        ConfigError: empty members, unknown pooling, bad weights or temperature, a batch size below 1.
        CompatibilityError / ExpertError: members not over ``base`` or not combinable.
    """

    def __init__(
        self,
        base: BaseModel,
        experts: Sequence[Expert],
        pooling: str = "log_linear",
        weights: Sequence[float] | str | None = None,
        temperature: float = 1.0,
        scoring: Scoring = Scoring(),
        name: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.pooling = check_pooling(pooling)
        self.experts = check_member_list(experts)
        names = [e.name for e in self.experts]
        if weights is None or weights == "uniform":
            weights = uniform_weights(len(self.experts))
        elif isinstance(weights, str):
            raise ConfigError(
                f"weights {weights!r}: expected numbers or 'uniform' here; learn weights with "
                "adapterfuse.backends.ensemble.ensemble(..., weights='learned', validation=...)"
            )
        self.weights = check_weights(weights, names, self.pooling)
        self.temperature = check_temperature(temperature)
        if scoring.batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {scoring.batch_size}")
        check_members(self.experts, base)  # before the (cheap, but not free) model copy
        self.base = base
        self.scoring = scoring
        self.name = name or f"ensemble {self.pooling} K={len(self.experts)}"
        self.info = dict(info or {})
        self.batched = BatchedEnsemble(base.model, self.experts)

    @property
    def names(self) -> list[str]:
        """The members' names."""
        return [e.name for e in self.experts]

    def member_log_probs(self, task: TaskSpec, batch: Sequence[Example]) -> torch.Tensor:
        """Every member's log-probabilities ``[K, n, n_labels]`` (one batched pass per length bucket)."""
        s = self.scoring
        return self.batched.member_log_probs(self.base.tokenizer, task, batch, s.batch_size, s.autocast, s.max_length)

    def predict_proba(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """``[n, n_labels]`` pooled probabilities over the task's label words, in the input order."""
        if not batch:
            return torch.empty((0, task.n_labels))
        return self.pool_members(self.member_log_probs(task, batch))

    def pool_members(self, member_log_probs: torch.Tensor) -> torch.Tensor:
        """``[n, n_labels]``: the members' ``[K, n, n_labels]`` log-probabilities pooled as this ensemble pools."""
        return pool(self.pooling, member_log_probs, self.weights, self.temperature)

    def cost(self) -> Cost:
        """K distinct members: K base forward passes of work per input, and their adapters stored (fp32)."""
        params = adapter_params(self.experts)
        return Cost(stored_params=params, forward_passes=float(len(self.experts)), memory_bytes=4 * params)

    def settings(self) -> dict[str, Any]:
        """The settings its manifest records (members and their folders, pooling, weights, temperature …)."""
        folders = member_folders(self.names, "member")
        return {
            "members": [
                {"name": e.name, "folder": f, "task": e.task, "sha256": e.weights_sha256()}
                for e, f in zip(self.experts, folders, strict=True)
            ],
            "pooling": self.pooling,
            "weights": self.weights,
            "temperature": self.temperature,
            "scoring": asdict(self.scoring),
            "info": self.info,
        }

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write a folder with each member's expert folder and ``manifest.json`` (kind ``ensemble``), atomically.

        Raises:
            OutputExistsError: if ``path`` exists and ``overwrite`` is false.
        """
        settings = self.settings()
        with atomic_dir(path, overwrite) as tmp:
            for expert, entry in zip(self.experts, settings["members"], strict=True):
                (tmp / entry["folder"]).mkdir()
                expert.write_into(tmp / entry["folder"])
            write_manifest(tmp, "ensemble", self.name, settings, self.base.record())

    @classmethod
    def load(cls, path: str | Path, base: BaseModel, verify: bool = True, **overrides: Any) -> EnsemblePredictor:
        """Load a folder written by :meth:`save` (or in the older ``ensemble.json`` format) onto ``base``.

        Args:
            path: the folder.
            base: the base the members were trained on (checked by fingerprint).
            verify: check every file's sha256 against the manifest.
            overrides: scoring settings to change (``batch_size``, ``autocast``, ``max_length``).

        Returns:
            The predictor, with the saved members, pooling, weights and temperature.

        Raises:
            ExpertError: a missing or invalid manifest, a changed file, or a bad member folder.
            CompatibilityError: members trained on another base.
        """
        folder = Path(path)
        return cls.from_manifest(folder, read_manifest(folder, verify, kinds=("ensemble",)), base, **overrides)

    @classmethod
    def from_manifest(cls, folder: Path, manifest: Manifest, base: BaseModel, **overrides: Any) -> EnsemblePredictor:
        """Rebuild the predictor from its checked manifest (see :meth:`load`)."""
        settings = manifest.settings
        entries = member_entries(folder, manifest, "members")
        experts = [load_member(folder / m["folder"], m, manifest) for m in entries]
        scoring = Scoring(**{**settings.get("scoring", {}), **overrides})
        return cls(
            base,
            experts,
            settings["pooling"],
            settings["weights"],
            settings["temperature"],
            scoring,
            name=manifest.name,
            info=settings.get("info"),
        )
