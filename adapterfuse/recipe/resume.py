"""What a rerun of a recipe reuses: the result lines a run appends, and the hashes that say whether a
recorded result or a finished expert still matches what the recipe asks for."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from adapterfuse.backends.base import BACKENDS, backend_config
from adapterfuse.errors import AdapterFuseWarning, ConfigError
from adapterfuse.expert import Expert
from adapterfuse.io.atomic import save_error, write_failure
from adapterfuse.library import ExpertLibrary
from adapterfuse.recipe.families import FamilyOptions
from adapterfuse.recipe.schema import CombinerEntry, Recipe
from adapterfuse.train.config import TrainConfig
from adapterfuse.train.pe.options import PEOptions


def digest(*parts: Any) -> str:
    """A short hash of JSON-able parts: what names a run's settings and its trained folders."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Fields recorded by training that are measurements, not settings.
_MEASURED = {"eval_wall_s", "resumed_from_step", "steps", "train_examples", "train_tokens_per_s", "train_wall_s"}


def finished_results(out: Path) -> dict[str, dict[str, Any]]:
    """The results recorded so far; a line a killed run left incomplete is measured again (with a warning)."""
    log = out / "results.jsonl"
    if not log.is_file():
        return {}
    results = {}
    for i, line in enumerate(log.read_text().splitlines(), start=1):
        try:
            result = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            result = None
        if isinstance(result, dict) and "predictor" in result:
            results[result["predictor"]] = result
        elif line.strip():
            warnings.warn(
                f"{log}:{i}: an incomplete result (an interrupted run); that predictor is measured again",
                AdapterFuseWarning,
                stacklevel=2,
            )
    return results


def append_line(path: Path, line: str) -> None:
    """Append one line whole: on a failed write the file is cut back to what it was.

    Raises:
        SaveError: the line could not be written.
    """
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as e:
        with open(path, "r+") as fh:
            fh.truncate(size)
        reason = write_failure(e)
        if reason is None:
            raise
        raise save_error(path, reason) from e


def check_reused(expert: Expert, config: TrainConfig) -> None:
    recorded = {k: v for k, v in (expert.meta.get("training") or {}).items() if k not in _MEASURED}
    wanted = json.loads(config.model_dump_json())
    changed = sorted(k for k in wanted if k in recorded and recorded[k] != wanted[k])
    if changed:
        k = changed[0]
        raise ConfigError(
            f"expert {expert.name!r} at {expert.path} was trained with {k}={recorded[k]!r}, the recipe "
            f"asks {k}={wanted[k]!r}; delete that folder to retrain, or change the recipe"
        )


FAMILY_ADDED = {"weights": "uniform"}
"""Options of :class:`FamilyOptions` left out of a result's key at these defaults, so that keys written
before the options existed still match."""


def combiner_setting(entry: CombinerEntry, detector_key: str = "") -> dict[str, Any]:
    """What produced a combiner's result: its recipe entry and the full config its options resolve to (so a
    changed default does not reuse a result fitted with the old one), and for a guarded entry what its
    detector was fitted on (``detector_key``)."""
    # an entry without guard or distill is keyed as before those existed, so its results stay valid
    recorded = entry.model_dump(exclude={k for k in ("guard", "distill") if getattr(entry, k) is None})
    if entry.guard:
        recorded["detector"] = detector_key
    if entry.backend == "pe_ensemble":
        kind, members, opts = entry.pe_parts()
        full = {"kind": kind, "members": members, **PEOptions(**opts).model_dump(mode="json")}
        return {**recorded, "config": full}
    if entry.backend not in BACKENDS:
        family = FamilyOptions(**entry.options).model_dump(mode="json")
        # options added later are left out at their defaults, so results measured before them stay valid
        family = {k: v for k, v in family.items() if FAMILY_ADDED.get(k, object()) != v}
        return {**recorded, "config": family}
    config = backend_config(entry.backend, entry.backend_options())
    return {**recorded, "config": config.model_dump(mode="json")}


def run_digest(recipe: Recipe, library: ExpertLibrary) -> str:
    """What every result of a run shares: the harness, the tasks, the experts' weights (and held-out tasks,
    when there are any, so results measured without them stay valid)."""
    h = recipe.harness
    return digest(
        h.model_dump(exclude={"held_out", "max_held_out", "detector"}),
        {t: e.model_dump() for t, e in recipe.tasks.items()},
        sorted(e.weights_sha256() for e in library),
        *([h.held_out, h.max_held_out] if h.held_out else []),
    )
