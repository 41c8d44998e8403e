"""The one manifest of a saved predictor folder: its kind, its settings, and the hash of every file.

Every predictor's ``save`` writes its files into the temporary folder of
:func:`~adapterfuse.io.atomic.atomic_dir` and then, last, ``manifest.json``: a folder without one was
never finished. :func:`read_manifest` checks it (kind, format version, each listed file and its sha256)
before any loader reads a weight. Folders written in the formats that came before (``ensemble.json``,
``route.json``, ``pe_ensemble.json``, ``predictor.json``, expert folders) are read into the same model,
with no files to check.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from adapterfuse._version import __version__
from adapterfuse.errors import ExpertError
from adapterfuse.io.atomic import SAFE_FOLDER, write_json
from adapterfuse.io.atomic import read_manifest as read_legacy

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
Kind = Literal[
    "zero_shot",
    "oracle",
    "expert",
    "merged",
    "ensemble",
    "route",
    "arrow",
    "pe_ensemble",
    "temperature_scaled",
    "mc_dropout",
    "guarded",
]
KINDS: tuple[str, ...] = get_args(Kind)
_FIX = "save the predictor again with adapterfuse's save(), or load it with load_predictor(folder, verify=False)"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileHash(_Frozen):
    """One saved file: its path inside the folder (``/``-separated), sha256 and size in bytes."""

    path: str
    sha256: str
    size: int


class BaseRecord(_Frozen):
    """The base a predictor runs on: the spec :func:`~adapterfuse.base.load_base` takes, and its fingerprint."""

    spec: str | None = None
    fingerprint: str | None = None


class Manifest(_Frozen):
    """``manifest.json``: what a saved predictor folder is and how to rebuild it.

    Attributes:
        kind: which loader rebuilds it.
        format_version: the version of this layout.
        name: the predictor's name (shown in tables).
        adapterfuse_version: the version that wrote it.
        base: the base it runs on, when it has one.
        settings: the kind's own settings (pooling, router, scoring …).
        files: every other file in the folder with its hash (empty for a folder in an older format).
    """

    kind: Kind
    format_version: int
    name: str
    adapterfuse_version: str
    base: BaseRecord | None = None
    settings: dict[str, Any] = {}
    files: tuple[FileHash, ...] = ()


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(
    folder: Path, kind: Kind, name: str, settings: dict[str, Any] | None = None, base: dict[str, Any] | None = None
) -> Manifest:
    """Hash every file under ``folder`` and write ``manifest.json``; call it after every other file.

    Args:
        folder: the (temporary) folder being saved.
        kind: the predictor kind.
        name: the predictor's name.
        settings: the kind's settings (JSON-ready).
        base: ``{"spec", "fingerprint"}`` of the base, if any.

    Returns:
        The manifest written.
    """
    files = [
        FileHash(path=p.relative_to(folder).as_posix(), sha256=sha256_file(p), size=p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p != folder / MANIFEST
    ]
    manifest = Manifest(
        kind=kind,
        format_version=FORMAT_VERSION,
        name=name,
        adapterfuse_version=__version__,
        base=_base(base),
        settings=dict(settings or {}),
        files=tuple(files),
    )
    write_json(folder / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def read_manifest(path: str | Path, verify: bool = True, kinds: Sequence[str] | None = None) -> Manifest:
    """Read and check a saved predictor folder's manifest (or the file of an older format).

    Args:
        path: the folder.
        verify: compare every listed file's sha256 with the manifest (``False`` checks only that they exist).
        kinds: the kinds the caller can load (default: any).

    Returns:
        The manifest.

    Raises:
        ExpertError: no folder or manifest, invalid JSON, a newer format version, an unknown or unwanted
            kind, a listed file missing or with another hash.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ExpertError(f"predictor folder {folder}: not found; expected a folder written by a predictor's save()")
    if (folder / MANIFEST).is_file():
        manifest = _parse(folder, _read_json(folder / MANIFEST))
    else:
        manifest = legacy_manifest(folder)
    if kinds is not None and manifest.kind not in kinds:
        raise ExpertError(
            f"predictor folder {folder}: holds a predictor of kind {manifest.kind!r}, expected one of "
            f"{list(kinds)}; load it with adapterfuse.load_predictor(folder)"
        )
    check_files(folder, manifest, verify)
    return manifest


def check_files(folder: Path, manifest: Manifest, verify: bool = True) -> None:
    """Every listed file must exist inside ``folder`` and (with ``verify``) have its recorded sha256.

    Raises:
        ExpertError: naming the file, the expected and the actual hash, and the fix.
    """
    for entry in manifest.files:
        rel = PurePosixPath(entry.path)
        if rel.is_absolute() or ".." in rel.parts:
            raise ExpertError(
                f"predictor folder {folder}: {MANIFEST} lists {entry.path!r}, expected a path inside "
                "the folder; the manifest was edited by hand, save the predictor again"
            )
        file = folder.joinpath(*rel.parts)
        if not file.is_file():
            raise ExpertError(
                f"predictor folder {folder}: {entry.path} is missing (listed in {MANIFEST}); the "
                "folder is incomplete, copy or save it again"
            )
        if verify:
            got = sha256_file(file)
            if got != entry.sha256:
                raise ExpertError(
                    f"predictor folder {folder}: {entry.path} has sha256 {got}, expected {entry.sha256} "
                    f"(from {MANIFEST}); the file changed after saving: {_FIX}"
                )


def member_entries(folder: Path, manifest: Manifest, key: str) -> list[dict[str, Any]]:
    """The sub-folder entries ``{"name", "folder", …}`` a manifest's settings list under ``key``.

    Raises:
        ExpertError: not a non-empty list, or an entry without a name or a plain folder name.
    """
    entries = manifest.settings.get(key)
    if not isinstance(entries, list) or not entries:
        raise ExpertError(
            f"{manifest.kind} {folder}: the manifest's {key!r} is {entries!r}, expected a non-empty "
            "list; save the predictor again"
        )
    for entry in entries:
        if not isinstance(entry, dict) or "name" not in entry or not SAFE_FOLDER.fullmatch(str(entry.get("folder"))):
            raise ExpertError(
                f"{manifest.kind} {folder}: entry {entry!r} in {key!r} needs a 'name' and a plain "
                "'folder' name; save the predictor again"
            )
    return entries


def member_folders(names: Sequence[str], prefix: str) -> list[str]:
    """A sub-folder name per member of a saved predictor.

    Args:
        names: the members' names, in order.
        prefix: the stem of the fallback name (``member``, ``expert``).

    Returns:
        Each member's own name when it is a safe single path part, else ``{prefix}-{i}`` (also for a
        repeated name, or one that is the manifest's).
    """
    out: list[str] = []
    for i, name in enumerate(names):
        folder = name if SAFE_FOLDER.fullmatch(name) and name != MANIFEST else f"{prefix}-{i}"
        out.append(folder if folder not in out else f"{prefix}-{i}")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExpertError(f"predictor folder {path.parent}: {path.name} is not valid JSON ({e}); {_FIX}") from None
    if not isinstance(data, dict):
        raise ExpertError(
            f"predictor folder {path.parent}: {path.name} holds a {type(data).__name__}, expected an object; {_FIX}"
        )
    return data


def _parse(folder: Path, data: dict[str, Any]) -> Manifest:
    """Validate the manifest's JSON, refusing a newer format and an unknown kind in words first."""
    version = data.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ExpertError(
            f"predictor folder {folder}: format_version {version}, this adapterfuse ({__version__}) "
            f"reads up to {FORMAT_VERSION}; upgrade adapterfuse to load it"
        )
    if data.get("kind") not in KINDS:
        raise ExpertError(
            f"predictor folder {folder}: kind {data.get('kind')!r} in {MANIFEST} is unknown; expected "
            f"one of {', '.join(KINDS)} (a newer adapterfuse may know it: upgrade)"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ExpertError(
            f"predictor folder {folder}: {MANIFEST} field {where!r}: {first['msg']} "
            f"({e.error_count()} problem(s)); {_FIX}"
        ) from None


def _legacy(kind: Kind, name: str, settings: dict[str, Any], base: dict[str, Any] | None = None) -> Manifest:
    return Manifest(
        kind=kind,
        format_version=FORMAT_VERSION,
        name=name,
        adapterfuse_version=__version__,
        base=_base(base),
        settings=settings,
    )


def _base(base: dict[str, Any] | None) -> BaseRecord | None:
    """The base's spec and fingerprint from a record that may hold more (or be missing)."""
    if not isinstance(base, dict):
        return None
    return BaseRecord(spec=base.get("spec"), fingerprint=base.get("fingerprint"))


def legacy_manifest(folder: Path) -> Manifest:
    """The manifest of a folder saved in an older format (its own JSON file and no hashes).

    Raises:
        ExpertError: no manifest and no older format's file either, or an invalid older file.
    """
    if (folder / "ensemble.json").is_file():
        old = read_legacy(
            folder,
            "ensemble.json",
            "ensemble",
            1,
            ("members", "pooling", "weights", "temperature"),
            "EnsemblePredictor.save",
            members="members",
        )
        return _legacy("ensemble", old.get("name") or "ensemble", _rest(old), old.get("base"))
    if (folder / "route.json").is_file():
        old = read_legacy(
            folder, "route.json", "route", 1, ("experts", "router"), "RoutePredictor.save", members="experts"
        )
        kind: Kind = "arrow" if old["router"].get("kind") == "arrow" else "route"
        return _legacy(kind, old.get("name") or kind, _rest(old), old.get("base"))
    if (folder / "pe_ensemble.json").is_file():
        old = read_legacy(folder, "pe_ensemble.json", "pe_ensemble", 1, saved_by="train_pe_ensemble")
        return _legacy("pe_ensemble", f"{old.get('method')} K={old.get('members')}", {"pe": old}, old.get("base"))
    if (folder / "predictor.json").is_file():
        old = _read_json(folder / "predictor.json")
        if old.get("kind") == "zero_shot":
            return _legacy("zero_shot", old.get("name") or "base zero-shot", {})
        if old.get("kind") == "oracle" and isinstance(old.get("tasks"), dict):
            tasks = [{"task": t, "name": e, "folder": e} for t, e in old["tasks"].items()]
            return _legacy("oracle", "oracle", {"tasks": tasks})
    meta = _read_json(folder / "adapterfuse.json") if (folder / "adapterfuse.json").is_file() else {}
    if meta.get("kind") == "merged":
        return _legacy(
            "merged", f"merge:{meta.get('method')}", {"full": bool(meta.get("full_model"))}, meta.get("base")
        )
    if (folder / "adapter_config.json").is_file():  # an expert folder, ours or plain PEFT
        return _legacy("expert", folder.name, {}, meta.get("base"))
    raise ExpertError(
        f"predictor folder {folder}: no {MANIFEST}; expected a folder written by a predictor's save() "
        "(a half-written folder has none); save the predictor again"
    )


def _rest(old: dict[str, Any]) -> dict[str, Any]:
    """An older manifest's settings: everything but what the new manifest keeps in its own fields."""
    return {k: v for k, v in old.items() if k not in ("kind", "format_version", "name", "base")}
