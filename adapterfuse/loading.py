"""``load_predictor(folder)``: any saved predictor back, whatever made it.

Every predictor's ``save`` writes ``manifest.json`` (see :mod:`adapterfuse.io.manifest`); its ``kind``
picks the loader below. This module sits above the backends and ``train/``, so it imports them directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterfuse.backends.ensemble.mc_dropout import MCDropoutPredictor
from adapterfuse.backends.ensemble.predictor import EnsemblePredictor
from adapterfuse.backends.merge.load import load_merged
from adapterfuse.backends.route.predictor import load_routed
from adapterfuse.base import BaseModel, fingerprints_conflict, load_base
from adapterfuse.calibration import TemperatureScaled
from adapterfuse.errors import CompatibilityError
from adapterfuse.guarded import load_guarded
from adapterfuse.harness import load_model_predictor
from adapterfuse.io.manifest import Kind, Manifest, read_manifest
from adapterfuse.predictor import Predictor
from adapterfuse.train.pe.predictor import from_manifest as load_pe

LOADERS: dict[Kind, Callable[[Path, Manifest, Any], Predictor]] = {
    "zero_shot": load_model_predictor,
    "oracle": load_model_predictor,
    "expert": load_model_predictor,
    "merged": load_merged,
    "ensemble": EnsemblePredictor.from_manifest,
    "route": load_routed,
    "arrow": load_routed,
    "pe_ensemble": load_pe,
    "mc_dropout": MCDropoutPredictor.from_manifest,
    "temperature_scaled": lambda folder, manifest, base: TemperatureScaled(
        load_predictor(folder / manifest.settings["inner"], base),
        manifest.settings["temperatures"],
        manifest.name,
        manifest.settings.get("unseen", "error"),
    ),
    "guarded": lambda folder, manifest, base: load_guarded(folder, manifest, base, load_predictor),
}
"""Kind -> ``(folder, manifest, base) -> predictor``; one entry per kind of :data:`~adapterfuse.io.manifest.Kind`."""


def load_predictor(folder: str | Path, base: BaseModel | None = None, *, verify: bool = True) -> Predictor:
    """Load any saved predictor folder; it answers exactly as the predictor that was saved.

    Args:
        folder: a folder written by a predictor's ``save`` (or an expert / merged adapter folder, or one
            in an older format).
        base: the base to run on; ``None`` loads the base the manifest records (the default base if none).
        verify: check every file's sha256 against the manifest before reading it.

    Returns:
        The predictor, with its saved name and scoring settings.

    Raises:
        ExpertError: no manifest, an unknown kind or newer format, a missing or changed file.
        CompatibilityError: ``base`` is not the base the predictor was saved with.
        BaseModelError: the recorded base cannot be loaded (pass ``base=``).
    """
    path = Path(folder)
    manifest = read_manifest(path, verify)
    recorded = manifest.base
    # A full merged model carries its own weights: it needs no base.
    if base is None and not (manifest.kind == "merged" and manifest.settings.get("full")):
        base = load_base(recorded.spec if recorded else None)
    if base is not None and recorded and fingerprints_conflict(recorded.fingerprint, base.fingerprint):
        raise CompatibilityError(
            f"predictor {path}: saved for base {recorded.spec!r} (fingerprint "
            f"{recorded.fingerprint[:19]}…), got base {base.spec!r} ({base.fingerprint[:19]}…); "
            "pass the base it was saved with, or base=None to load the recorded one"
        )
    return LOADERS[manifest.kind](path, manifest, base)
