"""MergedAdapter: one merged adapter with its provenance, saved as a plain PEFT LoRA folder.

A merge produces per-module ΔW factors (:class:`~adapterfuse.backends.merge.common.MergeResult`). This module
turns them into something a user keeps: a folder that plain ``PeftModel.from_pretrained`` loads (or a
full merged model), an ``adapterfuse.json`` that says exactly what was merged and how (sources with
their hashes, method, parameters, truncation errors, searches), a model card, and a predictor the
harness can measure.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel as PydanticModel
from safetensors.torch import save_file

from adapterfuse.backends.merge.card import merged_card
from adapterfuse.backends.merge.common import MergeResult, check_finite_deltas, check_finite_weights
from adapterfuse.base import BaseModel, fingerprints_conflict
from adapterfuse.delta import Deltas, peft_from_deltas
from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.expert import CARD, CONFIG, META, WEIGHTS, Expert, versions
from adapterfuse.harness import ModelPredictor
from adapterfuse.io.atomic import atomic_dir, check_output, write_json
from adapterfuse.io.card import invocation
from adapterfuse.io.manifest import write_manifest
from adapterfuse.library import ExpertLibrary, same_base_name

FORMAT_VERSION = 1


def expert_record(expert: Expert) -> dict[str, Any]:
    """What the merged adapter records about one source expert (name, task, hash, where it came from)."""
    return {
        "name": expert.name,
        "task": expert.task,
        "peft_type": expert.peft_type,
        "sha256": expert.weights_sha256(),
        "path": str(expert.path) if expert.path else None,
        "base_fingerprint": expert.base_fingerprint,
    }


def base_record(experts: Sequence[Expert], base: BaseModel | None) -> dict[str, Any]:
    """The base the merge belongs to: the loaded one if given, else what the first expert recorded."""
    if base is not None:
        return base.record()
    first = experts[0]
    return {"spec": first.base_name, "fingerprint": first.base_fingerprint}


class MergedPredictor(ModelPredictor):
    """A :class:`~adapterfuse.harness.ModelPredictor` whose ``save`` writes the merged PEFT adapter."""

    def __init__(self, adapter: MergedAdapter, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter = adapter

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the merged adapter folder (see :meth:`MergedAdapter.save_pretrained`) with this name and scoring."""
        self.adapter.save_pretrained(path, overwrite=overwrite, name=self.name, scoring=self.scoring())


@dataclass
class MergedAdapter:
    """A merged adapter and everything needed to reproduce and judge it.

    Attributes:
        result: the merge maths' output (merged ΔW factors, truncation errors, coverage).
        method: the method the user asked for (``ties``, ``greedy_soup``, ``learned`` …); the maths
            that produced ``result`` is ``result.method``.
        params: the user-level parameters, JSON-ready.
        sources: one record per source expert, in merge order (see :func:`expert_record`).
        base: ``{"spec", "fingerprint"}`` of the base the experts were trained on.
        search: records of what was chosen on validation data (``lambda_search``, ``soup``, ``learned``).
        notes: remarks such as weaker compatibility checks for plain PEFT folders.
        evaluation: harness results of this adapter (see :meth:`evaluate_on`), shown on the card.
        command: the ``adapterfuse`` command line that made it (``None`` through the Python API).
    """

    result: MergeResult
    method: str
    params: dict[str, Any]
    sources: list[dict[str, Any]]
    base: dict[str, Any]
    search: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    command: str | None = field(default_factory=invocation)

    def evaluate_on(self, base: BaseModel, data: Sequence[Any], split: str = "test", **kwargs: Any) -> dict[str, Any]:
        """Measure this adapter on the harness and keep the result for the card and ``adapterfuse.json``.

        Args:
            base: the base the experts were trained on.
            data: the tasks' splits (:class:`~adapterfuse.tasks.glue.TaskData`).
            split: which split to score (``test`` is GLUE dev).
            **kwargs: scoring settings of the predictor (``autocast``, ``batch_size`` …).

        Returns:
            The harness result (per-task metrics, average, cost).
        """
        from adapterfuse.harness import evaluate

        result = evaluate(self.predictor(base, **kwargs), data, split=split)
        self.evaluation.append(result)
        return result

    @classmethod
    def build(
        cls,
        result: MergeResult,
        experts: ExpertLibrary | Sequence[Expert],
        base: BaseModel | None,
        method: str | None = None,
        params: dict[str, Any] | None = None,
        search: dict[str, Any] | None = None,
        notes: Sequence[str] = (),
    ) -> MergedAdapter:
        """Assemble a merged adapter from a merge result and the experts it merged.

        Args:
            result: the merge result.
            experts: the experts merged, in the order of ``result``'s weights (a library's notes are kept).
            base: the loaded base, if any (its fingerprint wins over the experts' record).
            method: the user-level method name (default ``result.method``).
            params: user-level parameters (default: the result's validated parameters).
            search: search records to keep.
            notes: extra remarks.

        Returns:
            The merged adapter.
        """
        listed = list(experts)
        shown = params if params is not None else params_json(result.params)
        all_notes = [*getattr(experts, "notes", []), *notes]
        return cls(
            result=result,
            method=method or result.method,
            params=shown,
            sources=[expert_record(e) for e in listed],
            base=base_record(listed, base),
            search=dict(search or {}),
            notes=list(dict.fromkeys(all_notes)),
        )

    @property
    def deltas(self) -> Deltas:
        """Module -> merged update (fp32, ``B @ A == ΔW``)."""
        return self.result.deltas

    @property
    def overall_error(self) -> float:
        """Relative Frobenius truncation error over all modules together."""
        return self.result.overall_error

    @property
    def per_module_error(self) -> dict[str, float]:
        """Module -> relative Frobenius truncation error."""
        return self.result.per_module_error

    @property
    def coverage(self) -> dict[str, list[str]]:
        """Module -> names of the source experts that adapt it."""
        names = [s["name"] for s in self.sources]
        return {m: [names[i] for i in idx] for m, idx in self.result.coverage.items()}

    @property
    def num_params(self) -> int:
        """Parameters of the merged adapter as stored (A and B of every module)."""
        return sum(d.A.numel() + d.B.numel() for d in self.deltas.values())

    def peft_files(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The adapter as plain PEFT LoRA ``(state_dict, adapter_config)`` with every scale 1."""
        return peft_from_deltas(self.deltas, self.base.get("spec"))

    def metadata(self) -> dict[str, Any]:
        """The content of ``adapterfuse.json``."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": "merged",
            "method": self.method,
            "merged_with": self.result.method,
            "params": self.params,
            "sources": self.sources,
            "base": self.base,
            "truncation_error": {"overall": self.overall_error, "per_module": self.per_module_error},
            "ranks": {m: d.rank for m, d in self.deltas.items()},
            "coverage": self.coverage,
            "search": self.search,
            "notes": self.notes,
            "evaluation": self.evaluation,
            "adapter_params": self.num_params,
            "versions": versions(),
            **({"command": self.command} if self.command else {}),
        }

    def attach(self, model: torch.nn.Module, copy_base: bool = True):
        """The merged adapter on ``model`` as a ``PeftModel`` in eval mode (the base is copied first)."""
        state, config = self.peft_files()
        carrier = Expert(name="merged", config=config, state_dict=state)
        return carrier.attach(model, copy_base=copy_base)

    def predictor(self, base: BaseModel, name: str | None = None, **kwargs: Any) -> MergedPredictor:
        """A predictor reading the merged adapter on a copy of ``base``.

        Args:
            base: the frozen base the experts were trained on.
            name: shown in tables (default ``merge:<method>``).
            **kwargs: scoring settings of :class:`~adapterfuse.harness.ModelPredictor` (``autocast`` …).

        Returns:
            The predictor; its cost is the merged adapter's parameters and one pass per input.

        Raises:
            CompatibilityError: if ``base`` is not the base the experts recorded.
        """
        self.check_base(base)
        return MergedPredictor(
            self,
            name or f"merge:{self.method}",
            self.attach(base.model),
            base.tokenizer,
            stored_params=self.num_params,
            **kwargs,
        )

    def check_base(self, base: BaseModel) -> None:
        """Refuse a base whose fingerprint differs from the recorded one (when both are known), or, with no
        recorded fingerprint (plain PEFT experts), whose name is not the recorded base name.

        Raises:
            CompatibilityError: naming both fingerprints, or both names.
        """
        want, spec = self.base.get("fingerprint"), self.base.get("spec")
        if not want and spec and not same_base_name(spec, base):
            raise CompatibilityError(
                f"merged adapter: the experts name base {spec!r}, got base {base.spec!r}; load the base the "
                "experts were trained on"
            )
        if fingerprints_conflict(want, base.fingerprint):
            raise CompatibilityError(
                f"merged adapter: base fingerprint {base.fingerprint[:19]}… differs from the "
                f"experts' base {want[:19]}…; load the base the experts were trained on"
            )

    def save_pretrained(
        self,
        path: str | Path,
        overwrite: bool = False,
        full: bool = False,
        base: BaseModel | None = None,
        name: str | None = None,
        scoring: dict[str, Any] | None = None,
        load_from: str | None = None,
    ) -> Path:
        """Write the merged adapter (or, with ``full``, the merged full model) atomically.

        The folder is a plain PEFT adapter folder (or transformers model folder) plus ``adapterfuse.json``,
        the card and, last, ``manifest.json`` (kind ``merged``), which :func:`adapterfuse.load_predictor` reads.

        Args:
            path: the output folder.
            overwrite: replace an existing folder.
            full: write base weights + ΔW as a plain transformers model (needs ``base``).
            base: the base to merge into, for ``full``.
            name: the predictor's name in the manifest (default ``merge:<method>``).
            scoring: the predictor's scoring settings (``batch_size``, ``autocast``, ``max_length``) to keep.
            load_from: the Hub repo id or folder the card's load snippet names (default: ``path``).

        Returns:
            The folder written.

        Raises:
            OutputExistsError: ``path`` exists and ``overwrite`` is false (nothing is written).
            ConfigError: ``full`` without a base; a NaN/inf merged update or full-model weight (naming it).
            CompatibilityError: a base other than the experts' one.
        """
        check_output(path, overwrite)
        check_finite_deltas(self.deltas)
        if full:
            if base is None:
                raise ConfigError("full=True writes base weights + ΔW, so it needs the base model; pass base=")
            self.check_base(base)
        with atomic_dir(path, overwrite) as tmp:
            if full:
                self._write_full(tmp, base)  # type: ignore[arg-type]
            else:
                state, config = self.peft_files()
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
                write_json(tmp / CONFIG, config)
            write_json(tmp / META, {**self.metadata(), "full_model": full})
            (tmp / CARD).write_text(self.card(full=full, load_from=load_from or str(path)))
            settings = {"full": full, "result_params": params_json(self.result.params), "scoring": scoring or {}}
            write_manifest(tmp, "merged", name or f"merge:{self.method}", settings, self.base)
        return Path(path)

    def _write_full(self, folder: Path, base: BaseModel) -> None:
        """Fold ΔW into a copy of the base's weights and save model and tokenizer."""
        merged = self.attach(base.model).merge_and_unload()
        check_finite_weights(merged)
        merged.save_pretrained(folder)
        base.tokenizer.save_pretrained(folder)

    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        full: bool = False,
        base: BaseModel | None = None,
        saved: str | Path | None = None,
        **kwargs: Any,
    ):
        """Save to a temporary folder (its card naming ``repo_id``) and push it (``io.hub.push_folder``).

        Args:
            repo_id: ``owner/name`` on the Hub.
            token: a Hub token (default: the logged-in one).
            full, base: as in :meth:`save_pretrained`.
            saved: where this adapter was already saved; a failed push names it, so nothing is redone.
            **kwargs: passed to ``push_folder`` (``private``, ``overwrite``, ``commit_message``, ``retry`` …).

        Returns:
            ``push_folder``'s result.

        Raises:
            HubError: the push failed (see ``push_folder``); with ``saved``, the message says where the folder is.
        """
        from adapterfuse.io.hub import HubError, push_folder  # lazy: the Hub client is only needed to push

        with tempfile.TemporaryDirectory(prefix="adapterfuse-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "adapter", full=full, base=base, load_from=repo_id)
            try:
                return push_folder(folder, repo_id, token=token, **kwargs)
            except HubError as err:
                if saved is None:
                    raise
                raise HubError(
                    f"{err}; the {'model' if full else 'adapter'} is saved in {saved}: push it once the Hub "
                    f"answers with `adapterfuse push {saved} {repo_id}`"
                ) from None

    def card(self, full: bool = False, load_from: str = "merged-adapter") -> str:
        """The model card: Hub metadata, sources, method, parameters, errors, scores, how to load it.

        Args:
            full: the card of the full merged model rather than of the adapter.
            load_from: the Hub repo id or folder the load snippet names.

        Returns:
            The card's text (see :func:`adapterfuse.backends.merge.card.merged_card`).
        """
        return merged_card(self, full, load_from)


def params_json(params: PydanticModel) -> dict[str, Any]:
    """Validated parameters as JSON, spelled as users write them (``lambda``, not ``lam``)."""
    return params.model_dump(mode="json", by_alias=True)


@dataclass(frozen=True)
class SearchMethod:
    """A merge method that fits something on validation data (greedy soup, learned weights).

    Attributes:
        name: the key passed to :func:`~adapterfuse.backends.merge.api.merge` as ``method``.
        paper: the paper it follows.
        summary: one line on what it does.
        params: its frozen parameter model (unknown keys refused).
        run: ``(library, params, base, validation, options) -> MergedAdapter``.
    """

    name: str
    paper: str
    summary: str
    params: type[PydanticModel]
    run: Callable[..., MergedAdapter]


def names_of(library: ExpertLibrary | Sequence[Expert]) -> list[str]:
    """The experts' names, in order."""
    return [e.name for e in library]
