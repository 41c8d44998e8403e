"""Checkpoints keep the previous complete one: a corrupt or half-written latest one is passed over with a warning.

A small regression run (10 steps, a checkpoint every 3) is interrupted at step 8, so the partial folder
holds the checkpoint of step 6 and the previous one, of step 3; the latest is then damaged in each way
a crash or a disk can damage it, and the resumed run must end with the same parameters as a run that
was never interrupted.
"""

from __future__ import annotations

import errno
import json

import pytest
import torch

import adapterfuse.train.checkpoint as checkpoint_module
from adapterfuse.errors import AdapterFuseWarning, ResumeError, SaveError
from adapterfuse.train.config import TrainConfig
from adapterfuse.train.loop import Checkpoint, Trainable, linear_schedule, run_loop
from tests.helpers import Interrupt, stop_at

SCHEDULE = [float(i % 3) for i in range(10)]
CONFIG = TrainConfig(checkpoint_every=3, grad_clip=1.0)
IDENTITY = {"run": "regression", "config": CONFIG.model_dump(mode="json")}


def _run(tmp_path, callback=None) -> tuple[dict[str, torch.Tensor], int]:
    """Train the regression (resuming from ``tmp_path``'s checkpoint); its parameters and resumed step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    trainable = Trainable(dict(model.named_parameters()), optimizer, linear_schedule(optimizer, 10, 2))

    def loss(step: int, batch: float) -> torch.Tensor:
        x = torch.randn(4, 3)
        return ((model(x).squeeze(1) - batch * x.sum(1)) ** 2).mean()

    result = run_loop(SCHEDULE, trainable, loss, CONFIG, Checkpoint(tmp_path / "out", IDENTITY), callback)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, result.resumed_from_step


@pytest.fixture()
def interrupted(tmp_path):
    """The parameters of an uninterrupted run, and a partial folder with checkpoints of steps 6 and 3."""
    straight, _ = _run(tmp_path / "straight")
    with pytest.raises(Interrupt):
        _run(tmp_path, stop_at(8))
    partial = tmp_path / ".out.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["checkpoint.pt", "previous.json", "previous.pt", "state.json"]
    assert json.loads((partial / "state.json").read_text())["step"] == 6
    assert json.loads((partial / "previous.json").read_text())["step"] == 3
    return straight, partial


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_intact_checkpoint_resumes_from_the_latest_without_a_warning(interrupted, tmp_path, recwarn):
    straight, _ = interrupted
    params, resumed = _run(tmp_path)
    assert resumed == 6 and _same(params, straight)
    assert not [w for w in recwarn if issubclass(w.category, AdapterFuseWarning)]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / "checkpoint.pt").write_bytes((d / "checkpoint.pt").read_bytes()[:200]), "does not match"),
        (lambda d: (d / "state.json").write_bytes(b"\x00garbage{"), "state.json is not valid JSON"),
        (lambda d: (d / "state.json").unlink(), "state.json is missing"),
        (lambda d: (d / "checkpoint.pt").unlink(), "checkpoint.pt is missing"),
    ],
    ids=["truncated checkpoint.pt", "garbage state.json", "no state.json", "no checkpoint.pt"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(interrupted, tmp_path, damage, reason):
    straight, partial = interrupted
    damage(partial)
    with pytest.warns(AdapterFuseWarning, match=rf"{reason}.*resuming from the previous complete checkpoint at step 3"):
        params, resumed = _run(tmp_path)
    assert resumed == 3 and _same(params, straight)
    assert not partial.exists() or not any(".tmp" in p.name for p in partial.iterdir())


def test_an_old_checkpoint_without_a_hash_still_resumes(interrupted, tmp_path):
    """Checkpoints written before the hash was recorded are read (and checked by loading them)."""
    straight, partial = interrupted
    state = json.loads((partial / "state.json").read_text())
    del state["sha256"]
    (partial / "state.json").write_text(json.dumps(state))
    params, resumed = _run(tmp_path)
    assert resumed == 6 and _same(params, straight)


def test_no_complete_checkpoint_starts_from_step_0_with_a_warning(interrupted, tmp_path):
    straight, partial = interrupted
    (partial / "checkpoint.pt").write_bytes(b"")
    (partial / "previous.json").write_text("{")
    with pytest.warns(AdapterFuseWarning, match=r"no complete checkpoint \(.*\); training starts from step 0"):
        params, resumed = _run(tmp_path)
    assert resumed == 0 and _same(params, straight)


def test_a_changed_run_is_refused_even_when_the_latest_checkpoint_is_damaged(interrupted, tmp_path):
    _, partial = interrupted
    (partial / "checkpoint.pt").write_bytes(b"")
    other = Checkpoint(tmp_path / "out", {**IDENTITY, "run": "another"})
    with pytest.raises(ResumeError, match="different run;"):
        other.load()


def test_a_kill_between_the_two_files_of_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """The checkpoint of step 6 is written but its state file is not (the process dies in between)."""
    straight, _ = _run(tmp_path / "straight")
    real = checkpoint_module.write_json

    def die_before_the_second_state(path, data):
        if path.name == "state.json" and data["step"] == 6:
            raise Interrupt
        real(path, data)

    monkeypatch.setattr(checkpoint_module, "write_json", die_before_the_second_state)
    with pytest.raises(Interrupt):
        _run(tmp_path)
    monkeypatch.setattr(checkpoint_module, "write_json", real)
    with pytest.warns(AdapterFuseWarning, match=r"checkpoint\.pt does not match .*at step 3"):
        params, resumed = _run(tmp_path)
    assert resumed == 3 and _same(params, straight)


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_complete_checkpoints(
    interrupted, tmp_path, monkeypatch
):
    straight, partial = interrupted
    before = {p.name: p.read_bytes() for p in partial.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", full_disk)
    with pytest.raises(SaveError) as e:
        _run(tmp_path)  # resumes at 6 and fails writing the checkpoint of step 9
    assert str(e.value).startswith(
        f"output {partial / 'checkpoint.pt'}: could not be written (No space left on device)"
    )
    assert "\n" not in str(e.value)
    after = {p.name: p.read_bytes() for p in partial.iterdir()}
    assert after["checkpoint.pt"] == before["checkpoint.pt"] and after["state.json"] == before["state.json"]
    assert not any(".tmp" in name for name in after)  # no temporary file left
    monkeypatch.undo()
    params, resumed = _run(tmp_path)
    assert resumed == 6 and _same(params, straight)
