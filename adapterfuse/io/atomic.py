"""Atomic outputs: write into a temporary sibling folder, then rename it into place."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapterfuse.errors import ExpertError, OutputExistsError


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; call it before any expensive work.

    Raises:
        OutputExistsError: if ``path`` exists and ``overwrite`` is false.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"output {target}: already exists; expected a new path, or pass --overwrite (overwrite=True) to replace it"
        )
    return target


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block finishes.

    On error the temporary folder is removed and ``path`` is left exactly as it was. With
    ``overwrite``, the old folder is moved aside first and deleted only after the new one is in place.

    Raises:
        OutputExistsError: see :func:`check_output`.
    """
    target = check_output(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON (sorted keys, indented) through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


SAFE_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A plain sub-folder name a saved manifest may point to (no separators, no leading dot)."""


def read_manifest(
    folder: Path,
    filename: str,
    kind: str,
    version: int,
    required: Sequence[str] = (),
    saved_by: str = "its save()",
    members: str | None = None,
) -> dict[str, Any]:
    """Read and check the JSON manifest of a saved predictor folder.

    Args:
        folder: the saved folder.
        filename: the manifest's file name inside it.
        kind: the ``kind`` the manifest must declare (also the word naming the folder in messages).
        version: the ``format_version`` it must carry.
        required: keys it must have.
        saved_by: what writes such folders (named in the message when the manifest is missing).
        members: a key listing sub-folder entries ``{"name", "folder"}`` whose folder names are checked.

    Returns:
        The manifest.

    Raises:
        ExpertError: missing, not JSON, another kind or format version, incomplete, or a member entry
            whose folder is not a plain name.
    """
    try:
        manifest = json.loads((folder / filename).read_text())
    except FileNotFoundError:
        raise ExpertError(f"{kind} {folder}: no {filename}; expected a folder saved by {saved_by}") from None
    except json.JSONDecodeError as e:
        raise ExpertError(f"{kind} {folder}: {filename} is not valid JSON ({e})") from None
    got = manifest.get("kind") if isinstance(manifest, dict) else None
    if got != kind:
        raise ExpertError(
            f"{kind} {folder}: {filename} is not a{'n' if kind[0] in 'aeiou' else ''} {kind} manifest "
            f"(kind {got!r}, expected {kind!r})"
        )
    if manifest.get("format_version") != version:
        raise ExpertError(
            f"{kind} {folder}: format_version {manifest.get('format_version')!r}, expected {version}; "
            "re-save it with this version of adapterfuse"
        )
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ExpertError(f"{kind} {folder}: {filename} lacks {missing}; the file is incomplete")
    for m in manifest.get(members, []) if members else []:
        if not isinstance(m, dict) or not SAFE_FOLDER.fullmatch(str(m.get("folder", ""))):
            raise ExpertError(f"{kind} {folder}: entry {m!r} in {members!r} needs a 'name' and a plain 'folder' name")
    return manifest
