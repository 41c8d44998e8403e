"""Loading a saved merged adapter: the :class:`MergedAdapter` back from its folder, and its predictor.

The folder is a plain PEFT LoRA folder whose every scale is 1 (see :meth:`MergedAdapter.peft_files`),
so its tensors are the merged ΔW factors themselves; ``adapterfuse.json`` holds the provenance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adapterfuse.backends.merge.adapter import META, MergedAdapter, MergedPredictor
from adapterfuse.backends.merge.common import MergeParams, MergeResult
from adapterfuse.backends.merge.registry import get_method
from adapterfuse.base import BaseModel, load_base
from adapterfuse.delta import deltas_from_peft
from adapterfuse.errors import ExpertError
from adapterfuse.expert import Expert
from adapterfuse.harness import ModelPredictor
from adapterfuse.io.manifest import Manifest, read_manifest


def load_merged_adapter(path: str | Path, verify: bool = True) -> MergedAdapter:
    """Read a merged adapter folder written by :meth:`MergedAdapter.save_pretrained` (not ``full``).

    Args:
        path: the folder.
        verify: check every file's sha256 against the manifest.

    Returns:
        The merged adapter, with its sources, parameters, errors and searches.

    Raises:
        ExpertError: not a merged adapter folder, a full model, a changed file or unreadable weights.
    """
    folder = Path(path)
    return adapter_from_manifest(folder, read_manifest(folder, verify, kinds=("merged",)))


def adapter_from_manifest(folder: Path, manifest: Manifest) -> MergedAdapter:
    """The merged adapter of a checked ``merged`` manifest (see :func:`load_merged_adapter`).

    Raises:
        ExpertError: a full model folder (no adapter to read) or unreadable files.
    """
    if manifest.settings.get("full"):
        raise ExpertError(
            f"merged adapter {folder}: holds a full merged model, not an adapter; load it with "
            "adapterfuse.load_predictor(folder) or transformers' from_pretrained"
        )
    expert = Expert.load(folder, verify=False)  # the caller checked the manifest
    meta = expert.meta
    names = [s.get("name") for s in meta.get("sources", [])]
    errors = meta.get("truncation_error", {})
    result = MergeResult(
        method=meta["merged_with"],
        params=_result_params(meta, manifest.settings),
        deltas=deltas_from_peft(expert.state_dict, expert.config, expert.name),
        per_module_error=dict(errors.get("per_module", {})),
        overall_error=float(errors.get("overall", 0.0)),
        coverage={m: [names.index(n) for n in ns] for m, ns in meta.get("coverage", {}).items()},
    )
    return MergedAdapter(
        result=result,
        method=meta["method"],
        params=meta.get("params", {}),
        sources=meta.get("sources", []),
        base=meta.get("base", {}),
        search=meta.get("search", {}),
        notes=meta.get("notes", []),
        evaluation=meta.get("evaluation", []),
        command=meta.get("command"),
    )


def _result_params(meta: dict[str, Any], settings: dict[str, Any]) -> MergeParams:
    """The maths' validated parameters: saved in the manifest; for older folders, read from the user's."""
    model = get_method(meta["merged_with"]).params
    if "result_params" in settings:
        return model.model_validate(settings["result_params"])
    try:
        return model.model_validate({k: v for k, v in meta.get("params", {}).items() if v is not None})
    except ValidationError:  # a search method's own parameters: only weights, rank and seed carry over
        return MergeParams()


def load_merged(folder: Path, manifest: Manifest, base: BaseModel | None) -> ModelPredictor:
    """The predictor of a saved merged adapter (or full merged model; see :func:`adapterfuse.load_predictor`).

    Args:
        folder: the saved folder (its manifest already checked).
        manifest: its manifest.
        base: the base the experts were trained on (unused for a full model, which carries its weights).

    Returns:
        A :class:`MergedPredictor` with the saved name and scoring (a plain model predictor for a full model).

    Raises:
        ExpertError: see :func:`adapter_from_manifest`.
        CompatibilityError: ``base`` is not the experts' base.
    """
    scoring = dict(manifest.settings.get("scoring", {}))
    if manifest.settings.get("full"):
        merged = load_base(str(folder))
        meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
        return ModelPredictor(
            manifest.name, merged.model, merged.tokenizer, stored_params=int(meta.get("adapter_params", 0)), **scoring
        )
    if base is None:
        raise ExpertError(f"merged adapter {folder}: needs the base it was merged for; pass base=")
    predictor: MergedPredictor = adapter_from_manifest(folder, manifest).predictor(base, manifest.name, **scoring)
    return predictor
