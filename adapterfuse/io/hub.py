"""Push a folder to the Hugging Face Hub in one verified commit, and pull one back atomically.

Both directions go through the real ``huggingface_hub`` client (``HfApi``), pointed at ``endpoint`` or
``HF_ENDPOINT``. Network steps are retried as :mod:`adapterfuse.io.retry` says (backoff on HTTP 5xx, 429 and
connection errors, the server's ``Retry-After``, never in offline mode). (The client itself also retries its
preupload and listing requests a few times before our retry loop sees an error.)

A push makes the repo hold exactly the folder: the commit adds every local file, and a repo that already holds
other files (an earlier, different folder) is refused unless ``overwrite`` is given, in which case the same
commit deletes them. The commit names the head it was planned against (``parent_commit``), so a concurrent
commit makes it fail rather than mix two folders.

Verification. After a push, the remote tree at the *new commit sha* is listed (``HfApi.list_repo_tree``) and each
local file must be there with the same content hash: for files the Hub stores with LFS/Xet the listing carries
the sha256 and size, compared with the local sha256 and size; for regular git files it carries the size and git
blob id, ``sha1(b"blob <size>\\0" + content)``, compared with the same value computed locally. A pull is checked
the same way, against the commit it downloaded, and must contain exactly the remote files.

Errors are :class:`HubError` with a one-line message naming the repo, the step, the HTTP status and a fix; the
token never appears in them (see :mod:`adapterfuse.io.retry`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterfuse.io.atomic import atomic_dir, check_output
from adapterfuse.io.retry import HubError, Policy, Retry, check_retry, known_secrets, offline_message, with_retries

__all__ = ["HubError", "PushResult", "Retry", "pull_folder", "push_folder"]

logger = logging.getLogger(__name__)

# One segment of a Hub repo id: letters, digits, '-', '_', '.'; not starting or ending with '-' or '.'.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
_MAX_NAME = 96
_CHUNK = 1 << 20
# Files the Hub writes into every new repo itself: never debris of an earlier push.
_HUB_OWN = frozenset({".gitattributes"})


@dataclass(frozen=True)
class PushResult:
    """What :func:`push_folder` committed.

    Attributes:
        repo_id: the repo pushed to.
        commit_url: the URL of the commit on the Hub.
        files: relative POSIX path -> sha256 (hex) of every local file pushed.
        commit_sha: the commit id (40 hex digits).
    """

    repo_id: str
    commit_url: str
    files: dict[str, str]
    commit_sha: str = ""


@dataclass(frozen=True)
class _LocalFile:
    path: Path
    size: int
    sha256: str
    git_sha1: str


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    retry: Retry = Retry(),
) -> PushResult:
    """Make the model repo ``repo_id`` hold exactly the files of ``folder``, in one commit, then verify it remotely.

    Args:
        folder: the folder to push (e.g. an expert folder); every file in it, recursively, is uploaded.
        repo_id: ``owner/name`` of a model repo; it is created (``exist_ok``) if missing.
        token: a Hub token with write access; ``None`` uses ``HF_TOKEN`` or the stored login.
        private: create the repo private (ignored if it exists already).
        overwrite: when the repo holds files that ``folder`` lacks (another folder pushed there before), delete
            them in the same commit; without it such a push is refused before anything is uploaded.
        commit_message: the commit summary; a default naming the file count is used if ``None``.
        endpoint: Hub URL; defaults to ``HF_ENDPOINT``, then the public Hub.
        retry: how network steps are retried on HTTP 5xx/429 and connection errors (:class:`Retry`).

    Returns:
        A :class:`PushResult` with the commit URL and sha and the sha256 of every pushed file.

    Raises:
        HubError: on a bad ``repo_id``, a missing or empty ``folder`` or bad retry settings (before any request);
            in offline mode (before any request); when the repo holds other files and ``overwrite`` is false; on
            HTTP 401/403/404 (at once) or other 4xx; after ``retry.max_retries`` retries on 5xx/429/connection
            errors; and when the repo at the new commit does not hold exactly the local files.
    """
    _check_repo_id(repo_id)
    check_retry(retry)
    local = _scan_folder(folder)

    # Imported here: the client is heavy and most adapterfuse commands never talk to the Hub.
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    _check_online("push", repo_id)
    api = HfApi(endpoint=_resolve_endpoint(endpoint), token=token)
    policy = Policy("push", repo_id, api.endpoint, retry, known_secrets(token))

    with_retries(
        "create repo", policy, lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    )
    current = with_retries(
        "list files", policy, lambda: list(api.list_repo_tree(repo_id, recursive=True, repo_type="model"))
    )
    stale = sorted(set(_remote_files(current)) - set(local) - _HUB_OWN)
    if stale and not overwrite:
        raise HubError(
            f"push of folder {Path(folder)} to repo '{repo_id}': the repo holds {len(stale)} file(s) the folder "
            f"lacks (e.g. '{stale[0]}'), from an earlier push of another folder; expected a repo holding only this "
            "folder's files; pass overwrite=True (--overwrite) to replace its content, or push to another repo"
        )
    message = commit_message or f"Upload {len(local)} file(s) with adapterfuse"

    def commit() -> Any:
        # Fresh operations on each attempt: the client mutates them and refuses to reuse committed ones.
        operations: list[Any] = [CommitOperationDelete(path_in_repo=rel) for rel in stale]
        operations += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f.path)) for rel, f in local.items()]
        return api.create_commit(repo_id, operations, commit_message=message, repo_type="model")

    with _commit_urls_parsed_against(api.endpoint):
        info = with_retries("commit", policy, commit)
    sha = str(info.oid)
    # List at the new sha, not "main": a concurrent commit must not make a good push look bad (or vice versa).
    entries = with_retries(
        "verify", policy, lambda: list(api.list_repo_tree(repo_id, recursive=True, revision=sha, repo_type="model"))
    )
    _verify(entries, local, policy, sha, exact=True)
    logger.info("pushed %d file(s) to %s at commit %s", len(local), repo_id, sha)
    return PushResult(repo_id, str(info.commit_url), {rel: f.sha256 for rel, f in local.items()}, sha)


def pull_folder(
    repo_id: str,
    target: str | os.PathLike,
    *,
    token: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    overwrite: bool = False,
    retry: Retry = Retry(),
) -> Path:
    """Download the files of model repo ``repo_id`` into ``target``, atomically and verified.

    The files are downloaded (``snapshot_download``) into a temporary sibling of ``target``, checked against the
    remote listing, and only then renamed into place (:func:`adapterfuse.io.atomic.atomic_dir`): a failed pull leaves
    ``target`` as it was.

    Args:
        repo_id: ``owner/name`` of a model repo.
        target: the folder to create.
        token: a Hub token with read access (needed for private repos); ``None`` uses ``HF_TOKEN`` or the login.
        revision: branch, tag or commit sha; ``None`` means ``main``.
        endpoint: Hub URL; defaults to ``HF_ENDPOINT``, then the public Hub.
        overwrite: replace an existing ``target`` (only once the new copy is complete).
        retry: how network steps are retried on HTTP 5xx/429 and connection errors (:class:`Retry`).

    Returns:
        ``target`` as a :class:`~pathlib.Path`.

    Raises:
        OutputExistsError: if ``target`` exists and ``overwrite`` is false (before any request).
        HubError: on a bad ``repo_id``; on HTTP errors (see :func:`push_folder`); if the repo has no files; if a
            downloaded file does not match the remote listing.
    """
    _check_repo_id(repo_id)
    check_retry(retry)
    target = check_output(target, overwrite)

    from huggingface_hub import HfApi, snapshot_download

    _check_online("pull", repo_id)
    api = HfApi(endpoint=_resolve_endpoint(endpoint), token=token)
    policy = Policy("pull", repo_id, api.endpoint, retry, known_secrets(token))
    # Pin one commit first, so the listing, the download and the check all see the same files.
    sha = with_retries(
        "resolve revision", policy, lambda: str(api.repo_info(repo_id, revision=revision, repo_type="model").sha)
    )
    entries = with_retries(
        "list files", policy, lambda: list(api.list_repo_tree(repo_id, recursive=True, revision=sha, repo_type="model"))
    )
    if not _remote_files(entries):
        raise HubError(
            f"pull of repo '{repo_id}': revision {revision or 'main'} ({sha[:12]}) holds no files; "
            "expected an expert folder; check the repo id and revision"
        )

    with atomic_dir(target, overwrite) as tmp, tempfile.TemporaryDirectory(prefix="adapterfuse-hf-cache-") as cache:
        # A throwaway cache_dir: the files land in `tmp` itself and the user's HF cache stays untouched.
        with_retries(
            "download",
            policy,
            lambda: snapshot_download(
                repo_id,
                repo_type="model",
                revision=sha,
                local_dir=tmp,
                cache_dir=cache,
                endpoint=api.endpoint,
                token=token,
            ),
        )
        # snapshot_download keeps its bookkeeping in <local_dir>/.cache/huggingface; it is not part of the repo.
        shutil.rmtree(tmp / ".cache" / "huggingface", ignore_errors=True)
        if (tmp / ".cache").is_dir() and not any((tmp / ".cache").iterdir()):
            (tmp / ".cache").rmdir()
        _verify(entries, _hash_tree(tmp), policy, sha, exact=True)
    logger.info("pulled %s at %s into %s", repo_id, sha, target)
    return target


def _check_repo_id(repo_id: object) -> None:
    expected = (
        "expected 'owner/name': a user or organisation, a slash, then the repo name, using letters, digits, "
        "'-', '_' and '.' (e.g. 'my-user/sst2-lora')"
    )
    if not isinstance(repo_id, str):
        raise HubError(f"repo_id {repo_id!r}: {expected}; got a {type(repo_id).__name__}")
    parts = repo_id.split("/")
    if len(parts) == 1 and _SEGMENT_RE.fullmatch(repo_id):
        raise HubError(f"repo_id {repo_id!r}: {expected}; the owner is missing, pass e.g. 'my-user/{repo_id}'")
    if (
        len(parts) != 2
        or not all(_SEGMENT_RE.fullmatch(p) for p in parts)
        or "--" in repo_id
        or ".." in repo_id
        or len(parts[1]) > _MAX_NAME
    ):
        raise HubError(
            f"repo_id {repo_id!r}: {expected}, at most {_MAX_NAME} characters in the name and no '--' "
            "or '..'; fix the id"
        )


def _check_online(action: str, repo_id: str) -> None:
    # In offline mode the client refuses every request; that cannot heal by retrying, so say so before the first.
    from huggingface_hub import constants

    # The client reads the variable once, at import: check the environment too, in case it was set since.
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in names)
    if constants.HF_HUB_OFFLINE or env:
        raise HubError(offline_message(action, repo_id))


def _scan_folder(folder: str | os.PathLike) -> dict[str, _LocalFile]:
    root = Path(folder)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise HubError(
            f"folder {root}: {what}; expected the folder to push (e.g. an expert folder written by "
            "adapterfuse); check the path"
        )
    files = _hash_tree(root)
    if not files:
        raise HubError(
            f"folder {root}: holds no files; expected an expert folder (adapter_config.json, "
            "adapter_model.safetensors, ...); check the path or train the expert first"
        )
    return files


def _hash_tree(root: Path) -> dict[str, _LocalFile]:
    """Relative POSIX path -> hashes for every regular file under ``root`` (symlinked folders not followed)."""
    files: dict[str, _LocalFile] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                files[path.relative_to(root).as_posix()] = _hash_file(path)
    return files


def _hash_file(path: Path) -> _LocalFile:
    """sha256 (what the Hub reports for LFS files) and the git blob id (what it reports for regular files),
    in a single read."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    git_sha1 = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            sha256.update(chunk)
            git_sha1.update(chunk)
    return _LocalFile(path, size, sha256.hexdigest(), git_sha1.hexdigest())


def _remote_files(entries: Iterable[Any]) -> dict[str, Any]:
    from huggingface_hub.hf_api import RepoFile  # folders (RepoFolder) are skipped

    return {entry.path: entry for entry in entries if isinstance(entry, RepoFile)}


def _mismatch(entry: Any, local: _LocalFile) -> str | None:
    """Why ``entry`` (a ``RepoFile``) does not hold the bytes of ``local``, or ``None`` if it does."""
    lfs = getattr(entry, "lfs", None)
    if lfs is not None:
        if lfs.size != local.size:
            return f"remote LFS size {lfs.size} bytes, local {local.size} bytes"
        if str(lfs.sha256).lower() != local.sha256:
            return f"remote sha256 {str(lfs.sha256)[:16]}..., local {local.sha256[:16]}..."
        return None
    if entry.size != local.size:
        return f"remote size {entry.size} bytes, local {local.size} bytes"
    if str(entry.blob_id).lower() != local.git_sha1:
        return f"remote git blob id {str(entry.blob_id)[:16]}..., local {local.git_sha1[:16]}..."
    return None


def _verify(entries: Iterable[Any], local: dict[str, _LocalFile], policy: Policy, sha: str, *, exact: bool) -> None:
    """Raise :class:`HubError` naming the first file missing remotely or whose hash differs.

    With ``exact`` (pull), remote files missing locally are errors too.
    """
    remote = _remote_files(entries)
    where = f"{policy.action} verification of repo '{policy.repo_id}' at commit {sha[:12]}"
    fix = (
        "push again and make sure nothing else writes to the repo meanwhile"
        if policy.action == "push"
        else "pull again; if it persists the remote file may be corrupt"
    )
    for rel, file in local.items():
        if rel not in remote:
            raise HubError(f"{where}: file '{rel}' is missing remotely; {fix}")
        problem = _mismatch(remote[rel], file)
        if problem:
            raise HubError(f"{where}: file '{rel}' differs ({problem}); {fix}")
    if exact:
        extra = sorted(set(remote) - set(local) - _HUB_OWN)
        if extra and policy.action == "push":
            raise HubError(f"{where}: file '{extra[0]}' is in the repo but not in the folder; {fix}")
        if extra:
            raise HubError(f"{where}: file '{extra[0]}' was not downloaded; {fix}")


@contextlib.contextmanager
def _commit_urls_parsed_against(endpoint: str) -> Iterator[None]:
    """huggingface_hub before 1.0 parses the commit URL a Hub returns against its ``ENDPOINT`` constant, not
    the endpoint the client was given, so a push to another Hub failed after committing; point the constant at
    ``endpoint`` meanwhile (later versions use the client's endpoint, and this changes nothing)."""
    from huggingface_hub import constants

    saved = constants.ENDPOINT
    constants.ENDPOINT = endpoint
    try:
        yield
    finally:
        constants.ENDPOINT = saved


def _resolve_endpoint(endpoint: str | None) -> str | None:
    # Read HF_ENDPOINT now: huggingface_hub reads it once at import, which may be before the caller set it.
    value = endpoint or os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None
