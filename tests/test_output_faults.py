"""Faults while writing an output: disk full, a killed process, a race, a dangling link.

Each test checks the message (one line, naming the path and the cause) and that nothing on disk was
lost or left behind. Kills are real ``SIGKILL``s of a child process; a full disk is a real file-size
limit on a child process, or a writer that raises the OS error.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import adapterfuse.backends.merge.adapter as merge_adapter
from adapterfuse import cli
from adapterfuse.backends.merge.api import merge
from adapterfuse.errors import AdapterFuseWarning, ConfigError, OutputExistsError, SaveError
from adapterfuse.io.atomic import atomic_dir, check_output, commit_cache_dir, write_json
from tests.helpers import random_expert

ROOT = Path(__file__).resolve().parents[1]


def _debris(folder: Path) -> list[str]:
    """Hidden leftovers of atomic writes (temporary and moved-aside folders or files)."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _child(script: str, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.fixture(scope="module")
def experts(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return [random_expert(tiny_base, f"e{i}", rank=4, seed=i).save(root / f"e{i}") for i in range(2)]


def test_a_full_disk_during_a_merge_gives_one_line_and_leaves_nothing(experts, tmp_path):
    """A real write failure: the child may write files of at most 4 KiB, the weights need more."""

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "merged"
    script = "import sys; from adapterfuse.cli.main import main; sys.exit(main(sys.argv[1:]))"
    argv = ["merge", "--experts", *map(str, experts), "--method", "uniform", "--out", str(out)]
    child = _child(script, *argv, preexec_fn=limit_file_size)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"adapterfuse merge: error: output {out}: could not be written (")
    assert "File too large" in line and "Traceback" not in err
    assert not out.exists() and _debris(tmp_path) == []


def test_an_os_error_while_saving_keeps_the_old_output(experts, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    adapter = merge(experts, method="uniform")
    adapter.save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # a partial file, as a real full disk leaves one
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(merge_adapter, "save_file", full_disk)
    with pytest.raises(SaveError) as e:
        adapter.save_pretrained(out, overwrite=True)
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, OSError)
    assert message.startswith(f"output {out}: could not be written (No space left on device: ")
    assert f"{out}/adapter_model.safetensors" in message  # the output's path, not the temporary folder's
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _debris(tmp_path) == []


def test_other_os_errors_reach_the_cli_as_one_line(experts, tmp_path, monkeypatch, capsys):
    def unwritable(tensors, filename, metadata=None):
        raise OSError(errno.ENAMETOOLONG, "File name too long", filename)

    monkeypatch.setattr(merge_adapter, "save_file", unwritable)
    out = tmp_path / "merged"
    argv = ["merge", "--experts", *map(str, experts), "--method", "uniform", "--out", str(out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adapterfuse merge: error: ")
    assert "adapter_model.safetensors: File name too long; check that path" in err
    assert not out.exists() and _debris(tmp_path) == []


def test_write_json_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_open = Path.open

    class FullDisk:  # the temporary file is created, then writing to it fails
        def __init__(self, path, *args, **kwargs):
            self.fh = real_open(path, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    # how every atomic file write opens its temporary file
    monkeypatch.setattr(Path, "open", lambda self, *args, **kwargs: FullDisk(self, *args, **kwargs))
    with pytest.raises(SaveError, match=r"results\.json: could not be written \(No space left on device\)"):
        write_json(tmp_path / "results.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


KILLED_MID_SAVE = """
    import sys, time
    from adapterfuse.io.atomic import atomic_dir
    with atomic_dir(sys.argv[1]) as tmp:
        (tmp / "weights.bin").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(120)
"""


def test_a_kill_mid_save_leaves_debris_that_the_next_write_removes(tmp_path):
    out = tmp_path / "out"
    child = _child(KILLED_MID_SAVE, str(out))
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    left = _debris(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".out.tmp-{child.pid}-") and not out.exists()
    with pytest.warns(
        AdapterFuseWarning, match=r"out: removed 1 unfinished folder\(s\) left beside it by interrupted runs"
    ):
        with atomic_dir(out) as tmp:
            (tmp / "weights.bin").write_text("complete")
    assert (out / "weights.bin").read_text() == "complete" and _debris(tmp_path) == []


KILLED_BETWEEN_RENAMES = """
    import os, signal, sys
    from adapterfuse.io.atomic import atomic_dir
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)  # the old folder is moved aside; the new one never moves in
    with atomic_dir(sys.argv[1], overwrite=True) as tmp:
        (tmp / "version").write_text("new")
        os.replace = replace
"""


def test_a_kill_between_the_renames_of_overwrite_is_restored_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "version").write_text("old")
    child = _child(KILLED_BETWEEN_RENAMES, str(out))
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists() and sorted(n.split("-")[0] for n in _debris(tmp_path)) == [".out.old", ".out.tmp"]
    with pytest.warns(AdapterFuseWarning) as warned, pytest.raises(OutputExistsError):
        check_output(out, overwrite=False)
    messages = [str(w.message) for w in warned]
    assert any(f"output {out}: restored from .out.old-{child.pid}" in m for m in messages)
    assert any("removed 1 unfinished folder(s)" in m for m in messages)
    assert (out / "version").read_text() == "old" and _debris(tmp_path) == []


def test_debris_of_a_running_process_is_left_alone(tmp_path):
    mine = tmp_path / f".out.tmp-{os.getpid()}-abc"
    mine.mkdir()
    check_output(tmp_path / "out", overwrite=False)
    assert mine.is_dir()


def test_two_writers_racing_into_one_output_keep_the_first_complete_one(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError) as e:
        with atomic_dir(out) as slow:
            (slow / "who").write_text("slow")
            with atomic_dir(out) as fast:  # another writer finishes first
                (fast / "who").write_text("fast")
    assert "was written by another process while this one ran" in str(e.value) and "\n" not in str(e.value)
    assert (out / "who").read_text() == "fast" and _debris(tmp_path) == []


def _cache_copy(folder: Path, who: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(who)
    return folder


def test_two_processes_filling_one_cache_entry_keep_the_first_copy_and_both_go_on(tmp_path):
    entry = tmp_path / "base"
    commit_cache_dir(_cache_copy(tmp_path / ".tmp-first", "first"), entry, "config.json")
    commit_cache_dir(_cache_copy(tmp_path / ".tmp-second", "second"), entry, "config.json")  # no error
    assert (entry / "config.json").read_text() == "first" and _debris(tmp_path) == []


def test_a_cache_entry_without_its_done_file_is_not_taken_for_a_finished_copy(tmp_path):
    entry = tmp_path / "base"
    entry.mkdir()
    (entry / "partial.safetensors").write_text("half")
    with pytest.raises(OSError):
        commit_cache_dir(_cache_copy(tmp_path / ".tmp-mine", "mine"), entry, "config.json")
    assert _debris(tmp_path) == [] and not (entry / "config.json").exists()


def test_a_dangling_symlink_as_output_is_refused_in_one_line(experts, tmp_path, capsys):
    out = tmp_path / "merged"
    out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"is a symbolic link to .*nowhere.*which does not exist"):
        check_output(out, overwrite=True)
    argv = ["merge", "--experts", *map(str, experts), "--method", "uniform", "--out", str(out), "--overwrite"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a symbolic link to" in err and "Traceback" not in err
    assert out.is_symlink() and not (tmp_path / "nowhere").exists() and _debris(tmp_path) == []


def test_the_cli_reports_what_it_tidied_as_one_warning_line(experts, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".merged.tmp-{int(gone.stdout)}-abc").mkdir()  # left by a process that is gone
    out = tmp_path / "merged"
    script = "import sys; from adapterfuse.cli.main import main; sys.exit(main(sys.argv[1:]))"
    child = _child(script, "merge", "--experts", *map(str, experts), "--method", "uniform", "--out", str(out))
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    ours = [line for line in err.splitlines() if line.startswith("adapterfuse merge:")]
    assert ours == [
        f"adapterfuse merge: warning: output {out}: removed 1 unfinished folder(s) left beside it by interrupted runs"
    ]
    assert "Warning" not in err and (out / "adapter_model.safetensors").is_file() and _debris(tmp_path) == []


def test_a_results_line_cut_short_by_a_kill_is_measured_again(tmp_path):
    from adapterfuse.recipe.resume import finished_results

    whole = json.dumps({"predictor": "oracle", "average": 0.5})
    (tmp_path / "results.jsonl").write_text(whole + "\n" + whole.replace("oracle", "ens")[:20])
    with pytest.warns(AdapterFuseWarning, match=r"results\.jsonl:2: an incomplete result \(an interrupted run\)"):
        assert list(finished_results(tmp_path)) == ["oracle"]


def test_a_full_disk_while_a_result_is_appended_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    from adapterfuse.recipe import resume

    log = tmp_path / "results.jsonl"
    log.write_text('{"predictor": "oracle"}\n')

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume.os, "fsync", full_disk)
    with pytest.raises(SaveError, match=rf"output {log}: could not be written \(No space left on device\)"):
        resume.append_line(log, '{"predictor": "ens"}')
    assert log.read_text() == '{"predictor": "oracle"}\n'


@pytest.mark.parametrize(
    "message",
    [
        "I/O error: File too large (os error 27)",  # safetensors 0.5 and later
        'Error while serializing: IoError(Os { code: 27, kind: FileTooLarge, message: "File too large" })',  # 0.4
    ],
)
def test_an_os_error_inside_a_safetensors_error_is_read_in_both_formats(message):
    from adapterfuse.io.atomic import write_failure

    safetensor_error = type("SafetensorError", (Exception,), {})  # the Rust extension's type, by name
    assert write_failure(safetensor_error(message)) == "File too large (os error 27)"
    assert write_failure(safetensor_error("Error while deserializing header: HeaderTooLarge")) is None
