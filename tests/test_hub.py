"""adapterfuse.io.hub against a fake Hub on 127.0.0.1, through the real huggingface_hub client (no internet)."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import traceback
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from adapterfuse.errors import AdapterFuseError, OutputExistsError
from adapterfuse.io.hub import HubError, PushResult, Retry, _LocalFile, _mismatch, pull_folder, push_folder
from tests.fake_hub_server import TOKEN, FakeHub, git_blob_sha1

REPO = "alice/sst2-lora"
COMMIT = f"/api/models/{REPO}/commit/"


@pytest.fixture(scope="module", autouse=True)
def _only_localhost():
    """Make the shared huggingface_hub client refuse any request that is not for 127.0.0.1."""
    try:
        from huggingface_hub import set_client_factory
    except ImportError:  # huggingface_hub < 1.0 sends its requests through a requests.Session
        yield from _only_localhost_requests()
        return
    from huggingface_hub.utils import _http

    previous = _http._GLOBAL_CLIENT_FACTORY

    def refuse_remote(request) -> None:
        if request.url.host != "127.0.0.1":
            raise AssertionError(f"a request left 127.0.0.1: {request.url}")

    def factory():
        client = previous()
        client.event_hooks = {**client.event_hooks, "request": [refuse_remote, *client.event_hooks["request"]]}
        return client

    set_client_factory(factory)
    yield
    set_client_factory(previous)


def _only_localhost_requests():
    import requests
    from huggingface_hub import configure_http_backend

    class LocalOnly(requests.Session):
        def request(self, method, url, *args, **kwargs):
            if urlsplit(str(url)).hostname != "127.0.0.1":
                raise AssertionError(f"a request left 127.0.0.1: {url}")
            return super().request(method, url, *args, **kwargs)

    from huggingface_hub.utils._http import _default_backend_factory

    configure_http_backend(LocalOnly)
    yield
    configure_http_backend(_default_backend_factory)


pytestmark = pytest.mark.usefixtures("hub_env")  # the fake Hub's `hub` fixture is in conftest.py


@pytest.fixture()
def sleeps() -> list[float]:
    return []


def _safetensors_bytes() -> bytes:
    """A small valid safetensors file (16x16 float32) whose payload holds every byte value."""
    payload = bytes(i % 256 for i in range(16 * 16 * 4))
    header = json.dumps(
        {
            "base_model.model.q_proj.lora_A.weight": {
                "dtype": "F32",
                "shape": [16, 16],
                "data_offsets": [0, len(payload)],
            }
        }
    ).encode()
    return struct.pack("<Q", len(header)) + header + payload


@pytest.fixture()
def expert_dir(tmp_path) -> Path:
    folder = tmp_path / "expert"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (folder / "adapter_model.safetensors").write_bytes(_safetensors_bytes())
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# SST-2 expert\n")
    (folder / "adapterfuse.json").write_text(json.dumps({"task": "sst2", "base": "tiny-llama-0"}))
    return folder


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _push(
    folder: Path, hub: FakeHub, sleeps: list[float], max_retries: int = 4, backoff: float = 1.0, **kwargs
) -> PushResult:
    retry = Retry(max_retries=max_retries, backoff=backoff, sleep=sleeps.append)
    return push_folder(folder, REPO, token=TOKEN, endpoint=hub.endpoint, retry=retry, **kwargs)


# ----------------------------------------------------------------------------- push
def test_push_sends_every_file_in_one_commit_with_identical_bytes(hub, expert_dir, sleeps):
    result = _push(expert_dir, hub, sleeps, commit_message="add sst2 expert")

    local = _contents(expert_dir)
    assert sorted(local) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapterfuse.json"]
    assert hub.count("POST", COMMIT) == 1
    repo = hub.repos[REPO]
    assert len(repo.commits) == 2  # the empty initial commit + ours
    assert repo.head.message == "add sst2 expert"
    assert hub.files(REPO) == local
    assert result.repo_id == REPO
    assert result.commit_sha == repo.head.oid
    assert result.commit_url.endswith(f"/{REPO}/commit/{repo.head.oid}")
    assert result.files == {rel: hashlib.sha256(data).hexdigest() for rel, data in local.items()}
    assert sleeps == []
    # the listing used for verification was taken at the new commit, not at a moving branch
    assert hub.count("GET", f"/api/models/{REPO}/tree/{repo.head.oid}") == 1


def test_push_twice_to_an_existing_repo_with_hf_endpoint_from_env(hub, expert_dir, sleeps, monkeypatch):
    _push(expert_dir, hub, sleeps)
    (expert_dir / "adapterfuse.json").write_text(json.dumps({"task": "sst2", "version": 2}))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    result = push_folder(expert_dir, REPO, token=TOKEN, retry=Retry(sleep=sleeps.append))
    assert hub.files(REPO) == _contents(expert_dir)
    assert result.commit_sha == hub.repos[REPO].head.oid


@pytest.mark.parametrize("statuses", [[500, 500], [429], [None, 503]], ids=["500x2", "429", "drop+503"])
def test_push_retries_transient_commit_failures_with_growing_backoff(hub, expert_dir, sleeps, statuses):
    hub.fail_next(COMMIT, statuses)
    result = _push(expert_dir, hub, sleeps, backoff=0.5)

    assert hub.count("POST", COMMIT) == len(statuses) + 1
    assert sleeps == [0.5 * 2**i for i in range(len(statuses))]
    assert hub.files(REPO) == _contents(expert_dir)
    assert len(hub.repos[REPO].commits) == 2
    assert result.commit_sha == hub.repos[REPO].head.oid


def test_push_gives_up_after_max_retries(hub, expert_dir, sleeps):
    hub.fail_next(COMMIT, [503] * 10)
    with pytest.raises(HubError) as info:
        _push(expert_dir, hub, sleeps, max_retries=2, backoff=1.0)
    message = str(info.value)
    assert hub.count("POST", COMMIT) == 3
    assert sleeps == [1.0, 2.0]
    assert REPO in message and "503" in message and "3 attempt" in message
    assert TOKEN not in message


@pytest.mark.parametrize("status", [401, 403, 404])
def test_push_auth_errors_fail_at_once_and_never_show_the_token(hub, expert_dir, sleeps, caplog, status):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    hub.fail_next(COMMIT, [status] * 5)
    with pytest.raises(HubError) as info:
        _push(expert_dir, hub, sleeps)
    err = info.value

    assert hub.count("POST", COMMIT) == 1
    assert sleeps == []
    message = str(err)
    assert REPO in message and str(status) in message and "\n" not in message
    if status == 403:
        assert "write permission" in message
    assert err.__cause__ is None and err.__context__ is None
    texts = [
        str(err),
        repr(err),
        str(err.__cause__),
        repr(err.__cause__),
        str(err.__context__),
        repr(err.__context__),
        "".join(traceback.format_exception(err)),
        caplog.text,
    ]
    assert all(TOKEN not in text for text in texts)
    assert hub.auth_headers and all(header == f"Bearer {TOKEN}" for header in hub.auth_headers)


def test_push_verification_names_a_file_the_server_corrupted(hub, expert_dir, sleeps):
    hub.corrupt_next_commit("adapter_model.safetensors")
    with pytest.raises(HubError, match=r"'adapter_model\.safetensors' differs") as info:
        _push(expert_dir, hub, sleeps)
    assert REPO in str(info.value)
    assert hub.count("POST", COMMIT) == 1  # a bad upload is reported, not silently re-pushed


def test_lfs_entries_are_compared_by_sha256_and_size(tmp_path):
    from huggingface_hub.hf_api import RepoFile

    data = b"weights" * 100
    local = _LocalFile(tmp_path / "w", len(data), hashlib.sha256(data).hexdigest(), git_blob_sha1(data))
    pointer_oid = "0" * 40  # an LFS entry's git oid is the pointer's, not the content's: it must be ignored

    def entry(sha256: str, size: int) -> RepoFile:
        return RepoFile(path="w", size=size, oid=pointer_oid, lfs={"size": size, "oid": sha256, "pointerSize": 134})

    assert _mismatch(entry(local.sha256, len(data)), local) is None
    assert "sha256" in _mismatch(entry(hashlib.sha256(b"other").hexdigest(), len(data)), local)
    assert "size" in _mismatch(entry(local.sha256, len(data) + 1), local)
    regular = RepoFile(path="w", size=len(data), oid=git_blob_sha1(data))
    assert _mismatch(regular, local) is None
    assert "blob id" in _mismatch(RepoFile(path="w", size=len(data), oid=git_blob_sha1(b"x" * len(data))), local)


# ----------------------------------------------------------------------------- pull
def test_pull_round_trips_and_never_clobbers_an_existing_target(hub, expert_dir, sleeps, tmp_path):
    (expert_dir / "eval").mkdir()
    (expert_dir / "eval" / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    _push(expert_dir, hub, sleeps)

    target = tmp_path / "pulled"
    assert pull_folder(REPO, target, token=TOKEN, endpoint=hub.endpoint) == target
    assert _contents(target) == _contents(expert_dir)  # no .cache/huggingface bookkeeping left behind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary siblings left

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    before = len(hub.requests)
    with pytest.raises(OutputExistsError):
        pull_folder(REPO, existing, token=TOKEN, endpoint=hub.endpoint)
    assert _contents(existing) == {"keep.txt": b"mine"}
    assert len(hub.requests) == before

    pull_folder(REPO, existing, token=TOKEN, endpoint=hub.endpoint, overwrite=True)
    assert _contents(existing) == _contents(expert_dir)


def test_pull_an_older_revision(hub, expert_dir, sleeps, tmp_path):
    first = _push(expert_dir, hub, sleeps)
    old = _contents(expert_dir)
    (expert_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    _push(expert_dir, hub, sleeps)

    pull_folder(REPO, tmp_path / "v1", token=TOKEN, endpoint=hub.endpoint, revision=first.commit_sha)
    assert _contents(tmp_path / "v1") == old


def test_pull_rejects_a_corrupt_download_and_leaves_no_target(hub, expert_dir, sleeps, tmp_path):
    _push(expert_dir, hub, sleeps)
    hub.serve_corrupt("adapter_config.json")
    target = tmp_path / "pulled"
    with pytest.raises(HubError, match=r"'adapter_config\.json' differs"):
        pull_folder(REPO, target, token=TOKEN, endpoint=hub.endpoint)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pull_of_a_missing_repo_fails_at_once(hub, tmp_path, sleeps):
    with pytest.raises(HubError, match=r"alice/nope.*404") as info:
        pull_folder("alice/nope", tmp_path / "x", token=TOKEN, endpoint=hub.endpoint, retry=Retry(sleep=sleeps.append))
    assert sleeps == [] and not (tmp_path / "x").exists()
    assert TOKEN not in str(info.value)


def test_no_request_leaves_localhost(expert_dir, sleeps):
    with pytest.raises(HubError, match=r"left 127\.0\.0\.1"):
        push_folder(
            expert_dir, REPO, token=TOKEN, endpoint="http://hub.example.invalid", retry=Retry(sleep=sleeps.append)
        )
    assert sleeps == []


# ----------------------------------------------------------------------------- validation
def test_offline_mode_is_refused_before_any_request(hub, expert_dir, tmp_path, sleeps, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"push of repo 'alice/sst2-lora': .*offline mode.*unset HF_HUB_OFFLINE"):
        _push(expert_dir, hub, sleeps)
    with pytest.raises(HubError, match=r"pull of repo 'alice/sst2-lora': .*offline mode.*unset HF_HUB_OFFLINE"):
        pull_folder(REPO, tmp_path / "out", token=TOKEN, endpoint=hub.endpoint, retry=Retry(sleep=sleeps.append))
    assert hub.requests == [] and sleeps == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "bad",
    [
        "sst2-lora",
        "a/b/c",
        "",
        "alice/",
        "/name",
        "-alice/x",
        "alice/bad name",
        "alice/x--y",
        "alice/.hidden",
        "alice/" + "n" * 97,
    ],
)
def test_bad_repo_id_is_refused_before_any_request(hub, expert_dir, tmp_path, bad):
    with pytest.raises(HubError, match="expected 'owner/name'") as info:
        push_folder(expert_dir, bad, token=TOKEN, endpoint=hub.endpoint)
    assert repr(bad) in str(info.value)
    with pytest.raises(HubError, match="expected 'owner/name'"):
        pull_folder(bad, tmp_path / "out", token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []
    assert isinstance(info.value, AdapterFuseError)


def test_bad_folder_or_settings_are_refused_before_any_request(hub, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(HubError, match=r"missing: does not exist.*expected"):
        push_folder(missing, REPO, token=TOKEN, endpoint=hub.endpoint)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="holds no files"):
        push_folder(tmp_path / "empty", REPO, token=TOKEN, endpoint=hub.endpoint)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(HubError, match="is not a folder"):
        push_folder(tmp_path / "file.txt", REPO, token=TOKEN, endpoint=hub.endpoint)
    with pytest.raises(HubError, match="max_retries"):
        push_folder(tmp_path, REPO, token=TOKEN, endpoint=hub.endpoint, retry=Retry(max_retries=-1))
    with pytest.raises(HubError, match="backoff"):
        pull_folder(REPO, tmp_path / "out", token=TOKEN, endpoint=hub.endpoint, retry=Retry(backoff=-1.0))
    with pytest.raises(HubError, match=r"retry 4: expected an adapterfuse\.io\.hub\.Retry"):
        push_folder(tmp_path, REPO, token=TOKEN, endpoint=hub.endpoint, retry=4)
    assert hub.requests == []
