"""A trained parameter-efficient ensemble as a folder, its members as LoRA experts, and its predictor.

The folder keeps only what was trained (``weights.safetensors``: the shared factors, the rank-1
vectors, the per-member top-layer factors, or SWAG's moments) plus ``manifest.json`` (kind
``pe_ensemble``, the ensemble's own record under ``settings.pe``); the K members
are rebuilt from it on load. BatchEnsemble, CAMERO and SWAG members are ordinary LoRA updates, so
they run and are pooled by the ensemble backend (:class:`~adapterfuse.backends.ensemble.EnsemblePredictor`: one
batched pass, linear or log-linear pooling) and can be merged back into one adapter with
:func:`adapterfuse.backends.merge.merge_deltas`. MIMO is one adapter read at K slots (see :mod:`.mimo`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapterfuse.backends.ensemble.pooling import pool
from adapterfuse.backends.ensemble.predictor import EnsemblePredictor
from adapterfuse.base import BaseModel, fingerprints_conflict
from adapterfuse.delta import Deltas, peft_from_deltas
from adapterfuse.errors import CompatibilityError, ConfigError, ExpertError
from adapterfuse.expert import Expert
from adapterfuse.head import DEFAULT_MAX_LENGTH, Scoring, autocast_context, encode, label_token_ids, length_batches
from adapterfuse.io.atomic import atomic_dir
from adapterfuse.io.manifest import MANIFEST as MANIFEST  # the file whose presence marks a finished folder
from adapterfuse.io.manifest import Manifest, read_manifest, write_manifest
from adapterfuse.predictor import Cost
from adapterfuse.surgery import shared_copy
from adapterfuse.tasks.spec import Example, TaskSpec
from adapterfuse.train.pe import mimo
from adapterfuse.train.pe.layers import install, load_flat, member_deltas
from adapterfuse.train.pe.swag import SwagPosterior, unflatten

WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1


@dataclass
class PEEnsemble:
    """A trained parameter-efficient ensemble.

    Attributes:
        manifest: kind, members, layout (module -> mode), rank, scale, options, base, training, scores.
        tensors: the trained tensors (``<module>.<A|B|r|s>``, or ``swag.*`` for SWAG).
        path: the folder it was saved to or loaded from.
    """

    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    path: Path | None = None
    _members: list[Deltas] | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        """``batchensemble``, ``mimo``, ``camero`` or ``swag``."""
        return self.manifest["method"]

    @property
    def k(self) -> int:
        """The number of members (MIMO: slots; SWAG: samples)."""
        return int(self.manifest["members"])

    @property
    def stored_params(self) -> int:
        """Numbers kept in ``weights.safetensors``."""
        return sum(t.numel() for t in self.tensors.values())

    def member_deltas(self) -> list[Deltas]:
        """Every member as ``module -> LowRank`` (MIMO: its one adapter; SWAG: the K seeded samples)."""
        if self._members is None:
            m = self.manifest
            if self.kind == "swag":
                post = SwagPosterior.from_state(self.tensors, m["swag"]["count"], m["swag"]["rank"])
                like = {n: torch.empty(s) for n, s in m["shapes"].items()}
                draws = post.sample(self.k, m["options"]["swag_scale"], m["swag"]["sample_seed"])
                self._members = [member_deltas(m["layout"], unflatten(d, like), 1, m["scale"])[0] for d in draws]
            elif self.kind == "mimo":
                self._members = member_deltas(m["layout"], self.tensors, 1, m["scale"])
            else:
                self._members = member_deltas(m["layout"], self.tensors, self.k, m["scale"])
        return self._members

    def swa_deltas(self) -> Deltas:
        """SWAG's mean adapter θ̄ as ``module -> LowRank``.

        Raises:
            ConfigError: for a kind other than SWAG.
        """
        if self.kind != "swag":
            raise ConfigError(f"swa: only a SWAG ensemble has a posterior mean; this one is {self.kind!r}")
        m = self.manifest
        like = {n: torch.empty(s) for n, s in m["shapes"].items()}
        return member_deltas(m["layout"], unflatten(self.tensors["swag.mean"].float(), like), 1, m["scale"])[0]

    def experts(self) -> list[Expert]:
        """The members as in-memory LoRA experts (``member-0`` …) recording the base they were trained on."""
        meta = {"task": self.manifest["task"], "method": f"pe_{self.kind}", "base": self.manifest["base"]}
        out = []
        for i, deltas in enumerate(self.member_deltas()):
            state, config = peft_from_deltas(deltas, self.manifest["base"]["spec"])
            out.append(Expert(name=f"member-{i}", config=config, state_dict=state, meta=dict(meta)))
        return out

    def merged(self, method: str = "uniform", name: str = "merged", **params: Any) -> Expert:
        """The members merged back into one LoRA adapter (a plain PEFT expert).

        Args:
            method: a method of :func:`adapterfuse.backends.merge.merge_deltas` (``uniform``: the mean ΔW, exact),
                or for SWAG ``swa``: the posterior mean θ̄ itself (stochastic weight averaging).
            name: the expert's name.
            params: the method's parameters (``rank``, ``density`` …).

        Returns:
            An :class:`Expert`; ``save`` it to get a folder plain PEFT loads.

        Raises:
            ConfigError: ``swa`` for another kind, or an unknown merge method.
        """
        from adapterfuse.backends.merge.registry import merge_deltas

        if method == "swa":
            deltas, error = self.swa_deltas(), 0.0
        else:
            result = merge_deltas(self.member_deltas(), method, **params)
            deltas, error = result.deltas, result.overall_error
        state, config = peft_from_deltas(deltas, self.manifest["base"]["spec"])
        meta = {
            "task": self.manifest["task"],
            "method": f"pe_{self.kind}+{method}",
            "base": self.manifest["base"],
            "merged_from": {"kind": self.kind, "members": self.k, "overall_error": error},
        }
        return Expert(name=name, config=config, state_dict=state, meta=meta)

    def predictor(self, base: BaseModel, **scoring: Any) -> PEEnsemblePredictor:
        """A :class:`~adapterfuse.predictor.Predictor` over ``base`` (scoring: batch_size, autocast, max_length)."""
        return PEEnsemblePredictor(self, base, **scoring)

    def save(
        self, path: str | Path, overwrite: bool = False, name: str | None = None, scoring: dict[str, Any] | None = None
    ) -> Path:
        """Write ``weights.safetensors`` and ``manifest.json`` (kind ``pe_ensemble``) atomically.

        Args:
            path: the folder.
            overwrite: replace an existing folder.
            name: the predictor's name in the manifest (default: the kind and K).
            scoring: the predictor's scoring settings to keep (default: none, so loading uses the defaults).

        Raises:
            OutputExistsError: ``path`` exists and ``overwrite`` is false.
        """
        with atomic_dir(path, overwrite) as tmp:
            self.write_into(tmp, name, scoring)
        self.path = Path(path)
        return self.path

    def write_into(self, folder: Path, name: str | None = None, scoring: dict[str, Any] | None = None) -> None:
        """Write the files, then the manifest, into an existing folder (callers provide atomicity)."""
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in sorted(self.tensors.items())},
            str(folder / WEIGHTS),
            metadata={"format": "pt"},
        )
        settings = {"pe": self.manifest, **({"scoring": scoring} if scoring else {})}
        write_manifest(folder, "pe_ensemble", name or f"{self.kind} K={self.k}", settings, self.manifest.get("base"))

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> PEEnsemble:
        """Load a folder written by :meth:`save` (or in the older ``pe_ensemble.json`` format).

        Raises:
            ExpertError: a missing folder, manifest or weights file, a changed file, or another kind.
        """
        folder = Path(path)
        return cls.from_manifest(folder, read_manifest(folder, verify, kinds=("pe_ensemble",)))

    @classmethod
    def from_manifest(cls, folder: Path, manifest: Manifest) -> PEEnsemble:
        """The ensemble of a checked manifest (see :meth:`load`)."""
        record = manifest.settings.get("pe")
        if not isinstance(record, dict) or "method" not in record:
            raise ExpertError(
                f"pe ensemble {folder}: the manifest's settings lack the ensemble's record ('pe'); "
                "train or save the ensemble again"
            )
        if not (folder / WEIGHTS).is_file():
            raise ExpertError(f"pe ensemble {folder}: {WEIGHTS} not found; the folder is incomplete")
        return cls(record, load_file(str(folder / WEIGHTS)), folder)


class PEEnsemblePredictor:
    """A trained parameter-efficient ensemble as a harness :class:`~adapterfuse.predictor.Predictor`.

    Args:
        ensemble: the trained ensemble.
        base: the base it was trained on (checked by fingerprint; never modified).
        batch_size, autocast, max_length: scoring settings.
        name: shown in tables (default: the kind and K).

    Raises:
        CompatibilityError: ``base`` is not the base the ensemble was trained on.
        ConfigError: a batch size below 1.
    """

    def __init__(
        self,
        ensemble: PEEnsemble,
        base: BaseModel,
        batch_size: int = 32,
        autocast: bool = True,
        max_length: int = DEFAULT_MAX_LENGTH,
        name: str | None = None,
    ) -> None:
        want = ensemble.manifest["base"]["fingerprint"]
        if want != base.fingerprint and (not want or fingerprints_conflict(want, base.fingerprint)):
            raise CompatibilityError(
                f"pe ensemble: trained on base {want[:19]}…, got {base.fingerprint[:19]}…; expected the same base model"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
        self.ensemble, self.base = ensemble, base
        self.batch_size, self.autocast, self.max_length = batch_size, autocast, max_length
        self.pooling = ensemble.manifest["options"]["pooling"]
        self.name = name or f"{ensemble.kind} K={ensemble.k}"
        if ensemble.kind == "mimo":
            self.inner = None
            self.model = shared_copy(base.model)
            layers = install(
                self.model,
                ensemble.manifest["layout"],
                1,
                ensemble.manifest["rank"],
                ensemble.manifest["scale"],
                0.0,
                0,
            )
            load_flat(layers, ensemble.tensors)
            self.model.eval()
        else:
            self.inner = EnsemblePredictor(
                base,
                ensemble.experts(),
                self.pooling,
                scoring=Scoring(batch_size, autocast, max_length),
                name=self.name,
            )

    def member_log_probs(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """Every member's log-probabilities, ``[K, n, n_labels]``, in the input order."""
        if self.inner is not None:
            return self.inner.member_log_probs(task, batch)
        return self._mimo_log_probs(task, batch)

    @torch.no_grad()
    def _mimo_log_probs(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """The same prompt in all K slots; each slot's answer is one member's."""
        tok = self.base.tokenizer
        labels = label_token_ids(task, tok)
        sep = tok.encode(self.ensemble.manifest["options"]["mimo_separator"], add_special_tokens=False)
        encoded = encode(task, batch, tok, self.max_length)
        out = torch.empty((self.ensemble.k, len(batch), len(labels)))
        device = next(self.model.parameters()).device
        for idx in length_batches([len(x) for x in encoded], self.batch_size):
            rows = [encoded[i] for i in idx]
            ids, mask, pos = mimo.pack([rows] * self.ensemble.k, sep, tok.pad_token_id)
            with autocast_context(self.autocast, device):
                logits = mimo.slot_logits(self.model, ids.to(device), mask.to(device), pos, labels)
            out[:, idx] = torch.log_softmax(logits.float(), dim=-1).cpu()
        return out

    def predict_proba(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """``[n, n_labels]`` pooled probabilities over the task's label words."""
        if not batch:
            return torch.empty((0, task.n_labels))
        return self.pool_members(self.member_log_probs(task, batch))

    def pool_members(self, member_log_probs: torch.Tensor) -> torch.Tensor:
        """``[n, n_labels]``: the members' ``[K, n, n_labels]`` log-probabilities pooled with weights 1/K."""
        k = self.ensemble.k  # uniform weights 1/K, as the ensemble backend's: log-linear is the geometric mean
        return pool(self.pooling, member_log_probs, [1.0 / k] * k)

    def cost(self) -> Cost:
        """What is stored (the compact trained tensors) and K rows (MIMO: K-times longer rows) of work."""
        params = self.ensemble.stored_params
        return Cost(stored_params=params, forward_passes=float(self.ensemble.k), memory_bytes=4 * params)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the ensemble's folder (see :meth:`PEEnsemble.save`) with this predictor's name and scoring."""
        self.ensemble.save(
            path,
            overwrite,
            self.name,
            {"batch_size": self.batch_size, "autocast": self.autocast, "max_length": self.max_length},
        )


def load_pe_ensemble(path: str | Path, base: BaseModel, verify: bool = True, **scoring: Any) -> PEEnsemblePredictor:
    """Load a saved parameter-efficient ensemble as a predictor over ``base``.

    Raises:
        ExpertError / CompatibilityError: see :meth:`PEEnsemble.load` and :class:`PEEnsemblePredictor`.
    """
    folder = Path(path)
    return from_manifest(folder, read_manifest(folder, verify, kinds=("pe_ensemble",)), base, **scoring)


def from_manifest(folder: Path, manifest: Manifest, base: BaseModel, **overrides: Any) -> PEEnsemblePredictor:
    """The predictor of a checked ``pe_ensemble`` manifest, with its saved name and scoring settings."""
    scoring = {**manifest.settings.get("scoring", {}), **overrides}
    name = scoring.pop("name", manifest.name)
    return PEEnsemblePredictor(PEEnsemble.from_manifest(folder, manifest), base, name=name, **scoring)
