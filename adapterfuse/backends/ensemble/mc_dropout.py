"""MC-dropout: one expert run N times with dropout left on, the N answers pooled (Gal & Ghahramani 2016).

The N samples are N members of one batched pass (:class:`~adapterfuse.backends.ensemble.batched.BatchedEnsemble`)
that share the expert's factors; each row gets its own dropout mask on the adapter's input in every adapted
module, as PEFT's ``lora_dropout`` draws it in training. The masks come from one generator reseeded with
``seed`` at every call, so the same inputs give the same bytes. Paper: https://arxiv.org/abs/1506.02142
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.backends.ensemble.pooling import linear
from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert, load_member
from adapterfuse.harness import adapter_params
from adapterfuse.head import DEFAULT_MAX_LENGTH
from adapterfuse.io.atomic import atomic_dir
from adapterfuse.io.manifest import Manifest, member_entries, write_manifest
from adapterfuse.predictor import Cost
from adapterfuse.surgery import StackedLoRALinear
from adapterfuse.tasks.spec import Example, TaskSpec


def _check(samples: int, p: float) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples: expected an integer >= 1 (dropout masks per input), got {samples!r}")
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"p: expected a dropout probability in [0, 1), got {p!r}")


class MCDropoutPredictor:
    """One expert with test-time dropout: ``samples`` masks per input in one batched pass, averaged.

    Args:
        base: the frozen base.
        expert: the expert.
        samples: dropout masks (members) per input.
        p: the dropout probability; ``None`` takes the ``lora_dropout`` the expert was trained with.
        seed: the masks' seed.
        name: shown in tables.
        **scoring: ``batch_size``, ``autocast``, ``max_length``.

    Raises:
        ConfigError: ``samples`` below 1, ``p`` outside [0, 1), or ``p=None`` for an expert trained without dropout.
    """

    def __init__(
        self,
        base: BaseModel,
        expert: Expert,
        samples: int = 8,
        p: float | None = None,
        seed: int = 0,
        name: str | None = None,
        **scoring: Any,
    ) -> None:
        if p is None:
            p = float(expert.config.get("lora_dropout") or 0.0)
            if not p:
                raise ConfigError(
                    f"p: expert {expert.name!r} was trained without dropout (lora_dropout 0); give p, e.g. p=0.1"
                )
        _check(samples, p)
        self.base, self.expert, self.samples, self.p, self.seed = base, expert, samples, p, seed
        self.batch_size = int(scoring.get("batch_size", 32))
        self.autocast = bool(scoring.get("autocast", True))
        self.max_length = int(scoring.get("max_length", DEFAULT_MAX_LENGTH))
        self.name = name or f"{expert.name} MC-dropout x{samples}"
        names = [f"{expert.name}#{i}" for i in range(samples)]
        self.batched = BatchedEnsemble(base.model, [expert.deltas] * samples, names)
        self.generator = torch.Generator(device=self.batched.device)
        for module in self.batched.model.modules():
            if isinstance(module, StackedLoRALinear):
                module.dropout, module.generator = p, self.generator

    def member_log_probs(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """Each mask's log-probabilities ``[samples, n, n_labels]`` (the masks reseeded with ``seed`` first)."""
        self.generator.manual_seed(self.seed)
        return self.batched.member_log_probs(
            self.base.tokenizer, task, batch, self.batch_size, self.autocast, self.max_length
        )

    def predict_proba(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """``[n, n_labels]``: the mean of the samples' probabilities."""
        if not batch:
            return torch.empty((0, task.n_labels))
        return self.pool_members(self.member_log_probs(task, batch))

    def pool_members(self, member_log_probs: torch.Tensor) -> torch.Tensor:
        """``[n, n_labels]``: the mean of the masks' probabilities."""
        return linear(member_log_probs.exp(), [1.0 / self.samples] * self.samples)

    def cost(self) -> Cost:
        """One expert stored; ``samples`` rows of base work per input."""
        params = adapter_params([self.expert])
        return Cost(stored_params=params, forward_passes=float(self.samples), memory_bytes=4 * params)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the expert under ``expert/`` and ``manifest.json`` (kind ``mc_dropout``), atomically.

        Raises:
            OutputExistsError: if ``path`` exists and ``overwrite`` is false.
        """
        member = {
            "name": self.expert.name,
            "folder": "expert",
            "task": self.expert.task,
            "sha256": self.expert.weights_sha256(),
        }
        scoring = {"batch_size": self.batch_size, "autocast": self.autocast, "max_length": self.max_length}
        settings = {"members": [member], "samples": self.samples, "p": self.p, "seed": self.seed, "scoring": scoring}
        with atomic_dir(path, overwrite) as tmp:
            (tmp / "expert").mkdir()
            self.expert.write_into(tmp / "expert")
            write_manifest(tmp, "mc_dropout", self.name, settings, self.base.record())

    @classmethod
    def from_manifest(cls, folder: Path, manifest: Manifest, base: BaseModel) -> MCDropoutPredictor:
        """Rebuild the predictor from its checked manifest."""
        (entry,) = member_entries(folder, manifest, "members")
        expert = load_member(folder / entry["folder"], entry, manifest)
        s = manifest.settings
        return cls(base, expert, s["samples"], s["p"], s["seed"], name=manifest.name, **s["scoring"])
