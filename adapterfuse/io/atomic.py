"""Atomic outputs: write into a temporary sibling folder, then rename it into place.

Temporary folders are named ``.<out>.tmp-<pid>-<random>`` and an overwritten folder is moved aside to
``.<out>.old-<pid>`` until the new one is in place, so a process killed at any moment leaves its output
either complete or untouched, and the next write to the same path (:func:`check_output`) tidies up
what the killed process left: a folder moved aside is put back when the output is missing, and
temporary and moved-aside folders of processes that are gone are removed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapterfuse.errors import AdapterFuseWarning, ConfigError, ExpertError, OutputExistsError, SaveError

# OS errors that mean "this file could not be written" (not a bug, not a network error): the user can act.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_LEGACY_TMP_AGE_S = 3600.0  # a temporary folder without a pid (older versions) is stale after an hour


def write_failure(exc: BaseException) -> str | None:
    """The reason, when ``exc`` says a file could not be written (disk full, read-only, no permission …).

    Returns:
        ``"No space left on device: 'path'"`` and the like, or ``None`` for any other exception.
    """
    if isinstance(exc, SaveError):
        return None
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        reason = exc.strerror or os.strerror(exc.errno)
        return f"{reason}: {exc.filename!r}" if exc.filename else reason
    # safetensors writes in Rust and reports an OS error as its own type, with the OS message inside:
    # "I/O error: File too large (os error 27)", or before 0.5 'IoError(Os { ..., message: "File too large" })'
    if type(exc).__name__ == "SafetensorError":
        text = str(exc)
        if "I/O error" in text:
            return text.split("I/O error: ", 1)[-1]
        debug = re.search(r'IoError\(Os \{ code: (\d+), [^}]*message: "([^"]*)"', text)
        if debug:
            return f"{debug.group(2)} (os error {debug.group(1)})"
    return None


def save_error(target: Path, reason: str) -> SaveError:
    """The one-line error of a failed write to ``target``."""
    return SaveError(
        f"output {target}: could not be written ({reason}); nothing was left half-written; free disk space "
        "or fix the permissions of that folder, then run the command again"
    )


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stale(entry: Path, prefix: str) -> bool:
    """Whether the debris ``entry`` (named ``prefix`` + pid …) belongs to a process that is gone."""
    pid = re.match(r"\d+(?=-|$)", entry.name[len(prefix) :])  # "<pid>-<random>" (folders) or "<pid>" (files)
    if pid is None:
        return time.time() - entry.lstat().st_mtime > _LEGACY_TMP_AGE_S
    return not _alive(int(pid.group()))


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def recover(target: Path) -> list[str]:
    """Tidy what interrupted writes to ``target`` left beside it (see the module docstring).

    A moved-aside folder of a process that is gone is renamed back when ``target`` is missing (the
    newest one, if there are several), else removed; temporary folders of processes that are gone are
    removed. Debris of a process still running is left alone.

    Args:
        target: the output path.

    Returns:
        What was done, one phrase each (also reported as an :class:`AdapterFuseWarning`).
    """
    if not target.parent.is_dir():
        return []
    old_prefix, tmp_prefix = f".{target.name}.old-", f".{target.name}.tmp-"
    try:
        found = [p for p in target.parent.iterdir() if p.name.startswith((old_prefix, tmp_prefix))]
        found.sort(key=lambda p: p.lstat().st_mtime, reverse=True)
        olds = [p for p in found if p.name.startswith(old_prefix) and _stale(p, old_prefix)]
        tmps = [p for p in found if p.name.startswith(tmp_prefix) and _stale(p, tmp_prefix)]
    except FileNotFoundError:  # another process is tidying the same folder
        return []
    done = []
    if olds and not os.path.lexists(target):
        try:
            os.replace(olds[0], target)
            done.append(f"output {target}: restored from {olds[0].name}, left by an interrupted --overwrite")
            olds = olds[1:]
        except OSError:  # another process restored it first
            pass
    for entry in olds + tmps:
        _remove(entry)
    if olds or tmps:
        done.append(
            f"output {target}: removed {len(olds) + len(tmps)} unfinished folder(s) left beside it by interrupted runs"
        )
    for line in done:
        warnings.warn(line, AdapterFuseWarning, stacklevel=3)
    return done


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; call it before any expensive work.

    First tidies what interrupted writes to ``path`` left (:func:`recover`).

    Raises:
        OutputExistsError: if ``path`` exists and ``overwrite`` is false.
        ConfigError: ``path`` is a symbolic link to nothing.
    """
    target = Path(path)
    if target.is_symlink() and not target.exists():
        raise ConfigError(
            f"output {target}: is a symbolic link to {os.readlink(target)!r}, which does not exist; expected a "
            "new path or a folder; remove the link or give another path"
        )
    recover(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"output {target}: already exists; expected a new path, or pass --overwrite (overwrite=True) to replace it"
        )
    return target


def _raced(target: Path) -> OutputExistsError:
    return OutputExistsError(
        f"output {target}: was written by another process while this one ran; that output is kept and this "
        "one discarded; give each run its own path (or pass --overwrite to replace it)"
    )


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``target``; with ``overwrite``, the old one moves aside until then."""
    if not overwrite:
        if os.path.lexists(target):
            raise _raced(target)
        try:
            os.rename(tmp, target)  # onto a folder that appeared meanwhile: fails (unless it is empty)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise _raced(target) from None
            raise
        return
    old = None
    if os.path.lexists(target):
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        _remove(old)  # a leftover of a gone process that had this pid
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError as e:
        if old is not None and not os.path.lexists(target):
            os.replace(old, target)
        elif old is not None and e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            shutil.rmtree(old, ignore_errors=True)
            raise _raced(target) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def commit_cache_dir(tmp: Path, target: Path, done_file: str) -> None:
    """Rename a finished cache folder ``tmp`` to ``target``, keeping a complete copy another process put first.

    A cache entry is a pure function of its key, so when two processes fill the same one at once the
    first rename wins and the later copy is dropped instead of failing the second process.

    Args:
        tmp: the finished temporary folder (removed when it is not used).
        target: the cache entry.
        done_file: a file that only a finished entry holds (``config.json``, ``tokenizer.json``).

    Raises:
        OSError: the rename failed and ``target`` holds no finished copy.
    """
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / done_file).is_file():
            raise


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block finishes.

    On error the temporary folder is removed and ``path`` is left exactly as it was. With
    ``overwrite``, the old folder is moved aside first and deleted only after the new one is in place.

    Raises:
        OutputExistsError: see :func:`check_output`; also when another process wrote ``path`` meanwhile.
        ConfigError: see :func:`check_output`.
        SaveError: a file could not be written (disk full, read-only, no permission), naming the
            path and the OS error.
    """
    target = check_output(path, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise save_error(target, reason) from e
    try:
        yield tmp
        _commit(tmp, target, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, SaveError) and str(tmp) in str(e):  # name the output, not the temporary folder
            raise SaveError(str(e).replace(str(tmp), str(target))) from e
        reason = write_failure(e)
        if reason is None:
            raise
        raise save_error(target, reason.replace(str(tmp), str(target))) from e


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON (sorted keys, indented) through a temporary file and a rename.

    Raises:
        SaveError: the file could not be written (nothing is left half-written).
    """
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) through a temporary file and a rename.

    Raises:
        SaveError: the file could not be written (nothing is left half-written).
    """
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    """Write a file through a temporary file beside it and a rename.

    Args:
        path: the file.
        data: its bytes.
        fsync: flush them to disk before the rename (a checkpoint a crash must not leave empty).

    Raises:
        SaveError: the file could not be written (nothing is left half-written).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        reason = write_failure(e)
        if reason is None:
            raise
        raise save_error(path, reason) from e


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
