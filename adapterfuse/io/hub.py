"""Push an expert folder to the Hugging Face Hub in one verified commit, and pull one back atomically.

Both directions go through the real ``huggingface_hub`` client (``HfApi``), pointed at ``endpoint`` or
``HF_ENDPOINT``. Network steps are retried with exponential backoff (``backoff * 2**attempt``) on HTTP 5xx, 429
and connection errors, and fail at once on any other status (401/403/404 cannot heal by waiting). (The client
itself also retries its preupload and listing requests a few times before our retry loop sees an error.)

Verification. After a push, the remote tree at the *new commit sha* is listed (``HfApi.list_repo_tree``) and each
local file must be there with the same content hash: for files the Hub stores with LFS/Xet the listing carries
the sha256 and size, compared with the local sha256 and size; for regular git files it carries the size and git
blob id, ``sha1(b"blob <size>\\0" + content)``, compared with the same value computed locally. A pull is checked
the same way, against the commit it downloaded, and must contain exactly the remote files.

Errors are :class:`HubError` with a one-line message naming the repo, the step, the HTTP status and a fix. The
token never appears in them: messages are built here, scrubbed of the token, and raised without chaining the
client's exception (whose request object holds the ``Authorization`` header).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from adapterfuse.errors import AdapterFuseError
from adapterfuse.io.atomic import atomic_dir, check_output

logger = logging.getLogger(__name__)

T = TypeVar("T")

# One segment of a Hub repo id: letters, digits, '-', '_', '.'; not starting or ending with '-' or '.'.
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_MAX_NAME = 96
# Hub tokens and bearer headers, scrubbed from any text we put in a message even if we did not know the token.
_TOKEN_RES = (re.compile(r"hf_[A-Za-z0-9]{6,}"), re.compile(r"(?i)(bearer\s+)\S+"))
_CHUNK = 1 << 20


class HubError(AdapterFuseError):
    """A push to or pull from the Hub failed: bad arguments, a refusing or unreachable server, or remote files
    that do not match the local ones."""


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
class Retry:
    """How :func:`push_folder` and :func:`pull_folder` retry a network step on HTTP 5xx/429 or a connection error.

    Attributes:
        max_retries: retries per network step (0 disables them).
        backoff: the first retry waits ``backoff`` seconds, then ``backoff * 2**attempt``.
        sleep: the function used to wait between retries (injectable for tests).
    """

    max_retries: int = 4
    backoff: float = 1.0
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class _LocalFile:
    path: Path
    size: int
    sha256: str
    git_sha1: str


@dataclass(frozen=True)
class _Policy:  # everything a network step needs to retry and to explain a failure
    action: str  # "push" or "pull"
    repo_id: str
    endpoint: str
    retry: Retry
    secrets: tuple[str, ...]


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    retry: Retry = Retry(),
) -> PushResult:
    """Upload every file of ``folder`` to the model repo ``repo_id`` in one commit, then verify it remotely.

    Args:
        folder: the folder to push (e.g. an expert folder); every file in it, recursively, is uploaded.
        repo_id: ``owner/name`` of a model repo; it is created (``exist_ok``) if missing.
        token: a Hub token with write access; ``None`` uses ``HF_TOKEN`` or the stored login.
        private: create the repo private (ignored if it exists already).
        commit_message: the commit summary; a default naming the file count is used if ``None``.
        endpoint: Hub URL; defaults to ``HF_ENDPOINT``, then the public Hub.
        retry: how network steps are retried on HTTP 5xx/429 and connection errors (:class:`Retry`).

    Returns:
        A :class:`PushResult` with the commit URL and sha and the sha256 of every pushed file.

    Raises:
        HubError: on a bad ``repo_id``, a missing or empty ``folder`` or bad retry settings (before any request);
            on HTTP 401/403/404 (at once) or other 4xx; after ``retry.max_retries`` retries on 5xx/429/connection
            errors; and when a remote file is missing or its hash differs from the local one.
    """
    _check_repo_id(repo_id)
    _check_retry(retry)
    local = _scan_folder(folder)

    # Imported here: the client is heavy and most adapterfuse commands never talk to the Hub.
    from huggingface_hub import CommitOperationAdd, HfApi

    _check_online("push", repo_id)
    api = HfApi(endpoint=_resolve_endpoint(endpoint), token=token)
    policy = _Policy("push", repo_id, api.endpoint, retry, _secrets(token))

    _with_retries(
        "create repo", policy, lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    )
    message = commit_message or f"Upload {len(local)} file(s) with adapterfuse"

    def commit() -> Any:
        # Fresh operations on each attempt: the client mutates them and refuses to reuse committed ones.
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f.path)) for rel, f in local.items()]
        return api.create_commit(repo_id, operations, commit_message=message, repo_type="model")

    info = _with_retries("commit", policy, commit)
    sha = str(info.oid)
    # List at the new sha, not "main": a concurrent commit must not make a good push look bad (or vice versa).
    entries = _with_retries(
        "verify", policy, lambda: list(api.list_repo_tree(repo_id, recursive=True, revision=sha, repo_type="model"))
    )
    _verify(entries, local, policy, sha, exact=False)
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
    _check_retry(retry)
    target = check_output(target, overwrite)

    from huggingface_hub import HfApi, snapshot_download

    _check_online("pull", repo_id)
    api = HfApi(endpoint=_resolve_endpoint(endpoint), token=token)
    policy = _Policy("pull", repo_id, api.endpoint, retry, _secrets(token))
    # Pin one commit first, so the listing, the download and the check all see the same files.
    sha = _with_retries(
        "resolve revision", policy, lambda: str(api.repo_info(repo_id, revision=revision, repo_type="model").sha)
    )
    entries = _with_retries(
        "list files", policy, lambda: list(api.list_repo_tree(repo_id, recursive=True, revision=sha, repo_type="model"))
    )
    if not _remote_files(entries):
        raise HubError(
            f"pull of repo '{repo_id}': revision {revision or 'main'} ({sha[:12]}) holds no files; "
            "expected an expert folder; check the repo id and revision"
        )

    with atomic_dir(target, overwrite) as tmp, tempfile.TemporaryDirectory(prefix="adapterfuse-hf-cache-") as cache:
        # A throwaway cache_dir: the files land in `tmp` itself and the user's HF cache stays untouched.
        _with_retries(
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
    if len(parts) == 1 and _SEGMENT_RE.match(repo_id):
        raise HubError(f"repo_id {repo_id!r}: {expected}; the owner is missing, pass e.g. 'my-user/{repo_id}'")
    if (
        len(parts) != 2
        or not all(_SEGMENT_RE.match(p) for p in parts)
        or "--" in repo_id
        or ".." in repo_id
        or len(parts[1]) > _MAX_NAME
    ):
        raise HubError(
            f"repo_id {repo_id!r}: {expected}, at most {_MAX_NAME} characters in the name and no '--' "
            "or '..'; fix the id"
        )


def _check_retry(retry: object) -> None:
    if not isinstance(retry, Retry):
        raise HubError(
            f"retry {retry!r}: expected an adapterfuse.io.hub.Retry (e.g. Retry(max_retries=4, "
            "backoff=1.0)); fix the argument"
        )
    max_retries, backoff = retry.max_retries, retry.backoff
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise HubError(f"retry.max_retries {max_retries!r}: expected an integer >= 0 (e.g. 4); fix the argument")
    if not isinstance(backoff, (int, float)) or isinstance(backoff, bool) or backoff < 0:
        raise HubError(f"retry.backoff {backoff!r}: expected a number of seconds >= 0 (e.g. 1.0); fix the argument")


def _check_online(action: str, repo_id: str) -> None:
    # In offline mode the client refuses every request; that cannot heal by retrying, so say so before the first.
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # what the client's own offline check reads (set from the environment at import)
        raise HubError(
            f"{action} of repo '{repo_id}': the Hugging Face client is in offline mode (HF_HUB_OFFLINE or "
            f"TRANSFORMERS_OFFLINE is set) and refuses every request; expected online mode; unset "
            f"HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE to {action}"
        )


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


def _verify(entries: Iterable[Any], local: dict[str, _LocalFile], policy: _Policy, sha: str, *, exact: bool) -> None:
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
        missing = sorted(set(remote) - set(local))
        if missing:
            raise HubError(f"{where}: file '{missing[0]}' was not downloaded; {fix}")


def _resolve_endpoint(endpoint: str | None) -> str | None:
    # Read HF_ENDPOINT now: huggingface_hub reads it once at import, which may be before the caller set it.
    value = endpoint or os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _secrets(token: str | None) -> tuple[str, ...]:
    if isinstance(token, str) and token:
        return (token,)
    try:  # token=None means the client sends the stored one: scrub that one too
        from huggingface_hub import get_token

        stored = get_token()
    except Exception:  # a broken token file must not hide the real error
        stored = None
    return (stored,) if stored else ()


def _scrub(text: str, secrets: tuple[str, ...], limit: int = 240) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    text = _TOKEN_RES[1].sub(r"\1***", _TOKEN_RES[0].sub("hf_***", text))
    text = " ".join(text.split())  # one line
    return text if len(text) <= limit else text[:limit] + "..."


@functools.lru_cache(maxsize=1)
def _connection_error_types() -> tuple[type[BaseException], ...]:
    """Transport-level errors of whichever HTTP stack this huggingface_hub version uses."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TimeoutException", "NetworkError", "RemoteProtocolError")),
        ("httpx", ("TimeoutException", "NetworkError", "RemoteProtocolError")),
        ("requests.exceptions", ("ConnectionError", "Timeout")),
    ):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        kinds.extend(getattr(imported, name) for name in names if hasattr(imported, name))
    return tuple(kinds)


def _classify(err: BaseException, secrets: tuple[str, ...]) -> tuple[int | None, bool, bool, str]:
    """(HTTP status or None, retryable, is_connection_error, scrubbed detail) for ``err`` or its causes."""
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen and len(chain) < 8:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    for exc in chain:  # wrappers (e.g. snapshot_download's) keep the HTTP error as their cause
        try:
            status = exc.response.status_code  # type: ignore[attr-defined]
        except Exception:
            continue
        if isinstance(status, int):
            detail = _scrub(str(getattr(exc, "server_message", None) or ""), secrets)
            return status, status == 429 or status >= 500, False, detail
    for exc in chain:
        if isinstance(exc, _connection_error_types()):
            return None, True, True, f"{type(exc).__name__}: {_scrub(str(exc), secrets)}"
    return None, False, False, f"{type(err).__name__}: {_scrub(str(err), secrets)}"


def _explain(step: str, policy: _Policy, status: int | None, connection: bool, detail: str, attempts: int) -> str:
    repo, access = policy.repo_id, "write" if policy.action == "push" else "read"
    head, tries = f"{policy.action} of repo '{repo}' failed at step '{step}'", f"after {attempts} attempt(s)"
    said = f" (server said: {detail})" if detail else ""
    if status == 401:
        return (
            f"{head}: HTTP 401 unauthorized{said}; the token is missing, invalid or expired: pass token=..., "
            "set HF_TOKEN or run `hf auth login` with a valid token"
        )
    if status == 403:
        return (
            f"{head}: HTTP 403 forbidden{said}; check that the token has {access} permission on '{repo}' "
            "(a token with the 'write' role for that user or organisation)"
        )
    if status == 404:
        return (
            f"{head}: HTTP 404 not found{said}; check the repo id (and revision), and that the token can "
            f"see '{repo}' if it is private"
        )
    if status == 429:
        return (
            f"{head}: HTTP 429 rate limited {tries}; wait a few minutes and retry, or raise "
            "retry.max_retries/retry.backoff"
        )
    if status is not None and status >= 500:
        return (
            f"{head}: HTTP {status} server error {tries}{said}; the Hub is having trouble: retry later, "
            "or raise retry.max_retries/retry.backoff"
        )
    if status is not None:
        return f"{head}: HTTP {status}{said}; check the repo id, the files and the token"
    if connection:
        return (
            f"{head}: could not reach {policy.endpoint} {tries} ({detail}); check the network and "
            "HF_ENDPOINT, then retry"
        )
    return f"{head}: {detail}"


def _with_retries(step: str, policy: _Policy, fn: Callable[[], T]) -> T:
    """Run ``fn``; retry it on 5xx/429/connection errors with exponential backoff; raise :class:`HubError`."""
    attempt = 0
    while True:
        try:
            return fn()
        except HubError:
            raise
        except Exception as err:  # every client error is turned into our own scrubbed message below
            status, retryable, connection, detail = _classify(err, policy.secrets)
        # Raised outside the `except` block (and `from None`) so that neither __cause__ nor __context__ carries
        # the client's exception, whose request holds the Authorization header.
        if not retryable or attempt >= policy.retry.max_retries:
            raise HubError(_explain(step, policy, status, connection, detail, attempt + 1)) from None
        delay = policy.retry.backoff * 2**attempt
        logger.warning(
            "%s of %s: step '%s' got %s; retrying in %.1fs (retry %d/%d)",
            policy.action,
            policy.repo_id,
            step,
            f"HTTP {status}" if status else "a connection error",
            delay,
            attempt + 1,
            policy.retry.max_retries,
        )
        policy.retry.sleep(delay)
        attempt += 1
