"""A tiny in-memory stand-in for the Hugging Face Hub HTTP API, for tests that must never leave 127.0.0.1.

It implements only what ``huggingface_hub`` calls for ``create_repo``, ``create_commit`` (preupload + NDJSON
commit with inline base64 "regular" files), ``list_repo_tree``, ``repo_info``/``model_info`` and
``hf_hub_download``/``snapshot_download`` (``HEAD``/``GET`` on ``/{repo}/resolve/{revision}/{path}``).
Every file is declared "regular" at preupload time, so the LFS/Xet upload protocols are never needed.

Tests can make it misbehave: :meth:`FakeHub.fail_next` answers chosen statuses (or drops the connection) before
serving normally, :meth:`FakeHub.corrupt_next_commit` stores a file with one byte flipped and
:meth:`FakeHub.serve_corrupt` serves one with a flipped byte while listing its true hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")

TOKEN = "hf_SECRETtoken123"  # the write token the `hub` fixture (conftest.py) requires


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which is what the Hub reports as ``oid`` for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]


@dataclass
class _Failure:
    prefix: str
    method: str | None
    statuses: deque[int | None]
    headers: dict[str, str] = field(default_factory=dict)


class _NotFound(Exception):
    """Internal: answer 404 with the given ``X-Error-Code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FakeHub:
    """The server's state plus a background ``ThreadingHTTPServer`` bound to ``127.0.0.1`` on a free port.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, require_token: str | None = None) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path without query)
        self.auth_headers: list[str | None] = []
        self.require_token = require_token
        self._failures: list[_Failure] = []
        self._corrupt: set[str] = set()
        self._corrupt_downloads: set[str] = set()
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> FakeHub:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # a short poll interval keeps stop() (which waits for the next poll) fast
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ----------------------------------------------------------------- test controls
    def fail_next(
        self,
        path_prefix: str,
        statuses: list[int | None],
        method: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next requests whose path starts with ``path_prefix`` with ``statuses``, in order.

        ``None`` in ``statuses`` closes the connection without any answer (a connection error for the client).
        ``headers`` go with each injected answer (e.g. ``{"Retry-After": "7"}``).
        """
        with self._lock:
            self._failures.append(_Failure(path_prefix, method, deque(statuses), dict(headers or {})))

    def corrupt_next_commit(self, path: str) -> None:
        """Flip the first byte of ``path`` when the next commit that adds it is stored."""
        with self._lock:
            self._corrupt.add(path)

    def serve_corrupt(self, path: str) -> None:
        """Serve ``path`` with its first byte flipped on every download (the listing still tells the truth)."""
        with self._lock:
            self._corrupt_downloads.add(path)

    def count(self, method: str, contains: str) -> int:
        """How many requests with ``method`` had ``contains`` in their path."""
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and contains in p)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a copy)."""
        with self._lock:
            return dict(self._commit(self.repos[repo_id], revision).files)

    # ----------------------------------------------------------------- internals used by the handler
    def _take_failure(self, method: str, path: str) -> tuple[bool, int | None, dict[str, str]]:
        with self._lock:
            for failure in self._failures:
                if path.startswith(failure.prefix) and failure.method in (None, method) and failure.statuses:
                    return True, failure.statuses.popleft(), failure.headers
        return False, None, {}

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _NotFound("RepoNotFound", f"Repository {repo_id} not found")
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        if revision == "main":
            return repo.head
        for commit in repo.commits:
            if _SHA1_RE.match(revision) and commit.oid == revision:
                return commit
        raise _NotFound("RevisionNotFound", f"Invalid rev id: {revision}")

    def _new_commit(self, repo: Repo, message: str, files: dict[str, bytes]) -> Commit:
        digest = hashlib.sha1()
        digest.update((repo.commits[-1].oid if repo.commits else "root").encode())
        digest.update(message.encode())
        digest.update(str(len(repo.commits)).encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        commit = Commit(digest.hexdigest(), message, files)
        repo.commits.append(commit)
        return commit


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    # HTTP/1.0: one request per connection, so a stopped server leaves no idle keep-alive connection behind.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # ----------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        headers = {**(headers or {}), "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _handle(self) -> None:
        hub = self.hub
        path = urlsplit(self.path).path
        with hub._lock:
            hub.requests.append((self.command, path))
            hub.auth_headers.append(self.headers.get("Authorization"))
        body = self._body() if self.command in ("POST", "PUT") else b""
        injected, status, extra = hub._take_failure(self.command, path)
        if injected:
            if status is None:  # simulate a dropped connection
                self.close_connection = True
                self.connection.close()
                return
            self._error(status, f"injected HTTP {status}", headers=extra)
            return
        if hub.require_token and self.headers.get("Authorization") != f"Bearer {hub.require_token}":
            self._error(401, "Invalid credentials in Authorization header")
            return
        try:
            with hub._lock:
                self._route(path, body)
        except _NotFound as err:
            self._error(404, str(err), err.code)

    do_GET = do_POST = do_HEAD = do_PUT = _handle

    # ----------------------------------------------------------------- routes
    def _route(self, path: str, body: bytes) -> None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if self.command == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if self.command == "POST" and path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self.hub._repo(f"{parts[2]}/{parts[3]}")
            action, rest = (parts[4], parts[5:]) if len(parts) > 4 else (None, [])
            if action is None and self.command == "GET":
                return self._model_info(repo, "main")
            if action == "revision" and self.command == "GET" and rest:
                return self._model_info(repo, "/".join(rest))
            if action == "preupload" and self.command == "POST":
                return self._preupload(repo, rest[0] if rest else "main", json.loads(body))
            if action == "commit" and self.command == "POST":
                return self._commit(repo, rest[0] if rest else "main", body)
            if action == "tree" and self.command == "GET" and rest:
                return self._tree(repo, rest[0], "/".join(rest[1:]))
        if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
            repo = self.hub._repo(f"{parts[0]}/{parts[1]}")
            return self._resolve(repo, parts[3], "/".join(parts[4:]))
        self._error(404, f"fake hub: no route for {self.command} {path}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization')}/{payload.get('name')}"
        url = f"{self.hub.endpoint}/{repo_id}"
        if payload.get("type") not in (None, "model"):
            return self._error(400, "fake hub: only model repos are supported")
        if repo_id in self.hub.repos:
            return self._json(
                409,
                {"error": "You already created this model repo", "url": url},
                {"X-Error-Message": "You already created this model repo"},
            )
        # huggingface_hub >= 1.0 sends "visibility"; older versions send "private".
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or payload.get("private") is True)
        self.hub.repos[repo_id] = repo
        self.hub._new_commit(repo, "initial commit", {})
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _model_info(self, repo: Repo, revision: str) -> None:
        commit = self.hub._commit(repo, revision)
        siblings = [{"rfilename": p} for p in sorted(commit.files)]
        self._json(200, {"id": repo.repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings})

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> None:
        current = self.hub._commit(repo, revision).files
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None,
            }
            for f in payload["files"]
        ]
        self._json(200, {"files": files, "commitOid": repo.head.oid})

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        if revision != "main":
            return self._error(400, "fake hub: commits only go to main")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "fake hub: the first NDJSON line must be the commit header")
        files = dict(repo.head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                data = base64.b64decode(value["content"])
                if value["path"] in self.hub._corrupt:
                    self.hub._corrupt.discard(value["path"])
                    data = bytes([data[0] ^ 0xFF]) + data[1:] if data else b"\xff"
                files[value["path"]] = data
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                return self._error(400, f"fake hub: unsupported commit operation {key!r} (no LFS here)")
        commit = self.hub._new_commit(repo, lines[0]["value"].get("summary", ""), files)
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "pullRequestUrl": None,
                "commitUrl": f"{self.hub.endpoint}/{repo.repo_id}/commit/{commit.oid}",
            },
        )

    def _tree(self, repo: Repo, revision: str, under: str) -> None:
        commit = self.hub._commit(repo, revision)
        recursive = "recursive=true" in self.path.lower() or "recursive=1" in self.path
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            # every folder between `under` and the file is listed as a directory entry
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    folder,
                    {"type": "directory", "path": folder, "size": 0, "oid": hashlib.sha1(folder.encode()).hexdigest()},
                )
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if prefix and not entries:
            raise _NotFound("EntryNotFound", f"{under} does not exist")
        self._json(200, list(entries.values()))

    def _resolve(self, repo: Repo, revision: str, path: str) -> None:
        commit = self.hub._commit(repo, revision)
        if path not in commit.files:
            raise _NotFound("EntryNotFound", f"{path} does not exist at {revision}")
        data = commit.files[path]
        if path in self.hub._corrupt_downloads:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha1(data)}"'}
        self._send(200, data, headers, content_type="application/octet-stream")
