from __future__ import annotations

import pytest
import torch

from adapterfuse.errors import ResumeError
from adapterfuse.head import predict_proba, task_loss
from adapterfuse.tasks.glue import get_task
from adapterfuse.train.expert import train_expert
from adapterfuse.train.loop import batch_schedule
from tests.helpers import Interrupt, plain_peft_model, state_equal, stop_at, tiny_config, tiny_data


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_resume_after_interruption_gives_the_same_adapter(tiny_base, tmp_path, method):
    extra = (
        dict(adalora_init_r=6, adalora_delta_t=1, adalora_tinit_ratio=0.1, adalora_tfinal_ratio=0.2, dropout=0.1)
        if method == "adalora"
        else {"dropout": 0.1}
    )
    config = tiny_config(method=method, **extra)
    data = tiny_data(tmp_path / "glue", config=config)
    straight = train_expert(tiny_base, "sst2", config, out=tmp_path / "straight", data=data, progress=False)

    with pytest.raises(Interrupt):
        train_expert(
            tiny_base, "sst2", config, out=tmp_path / "resumed", data=data, progress=False, callback=stop_at(7)
        )
    assert not (tmp_path / "resumed").exists()  # nothing half-written in place
    checkpoint = torch.load(tmp_path / ".resumed.partial" / "checkpoint.pt", weights_only=True)
    resumed = train_expert(tiny_base, "sst2", config, out=tmp_path / "resumed", data=data, progress=False)
    assert resumed.meta["training"]["resumed_from_step"] == 4
    assert resumed.meta["training"]["train_wall_s"] >= round(checkpoint["wall_s"], 2) > 0  # time adds up
    assert state_equal(straight.state_dict, resumed.state_dict)
    assert not (tmp_path / ".resumed.partial").exists()


def test_changed_config_refuses_to_resume_and_says_what_changed(tiny_base, tmp_path):
    config = tiny_config()
    data = tiny_data(tmp_path / "glue", config=config)
    with pytest.raises(Interrupt):
        train_expert(tiny_base, "sst2", config, out=tmp_path / "x", data=data, progress=False, callback=stop_at(5))
    with pytest.raises(ResumeError, match=r"config\.lr"):
        train_expert(tiny_base, "sst2", tiny_config(lr=1e-4), out=tmp_path / "x", data=data, progress=False)


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_base, tmp_path):
    data = tiny_data(tmp_path / "glue")
    a, b = (
        train_expert(tiny_base, "sst2", tiny_config(dropout=0.1), out=tmp_path / n, data=data, progress=False)
        for n in ("a", "b")
    )
    c = train_expert(tiny_base, "sst2", tiny_config(dropout=0.1, seed=1), out=tmp_path / "c", data=data, progress=False)
    assert (a.path / "adapter_model.safetensors").read_bytes() == (b.path / "adapter_model.safetensors").read_bytes()
    assert not state_equal(a.state_dict, c.state_dict)


def test_adalora_saves_its_final_ranks_and_loads_in_plain_peft(tiny_base, tmp_path):
    config = tiny_config(method="adalora", rank=2, adalora_init_r=6, adalora_delta_t=1, epochs=2.0)
    data = tiny_data(tmp_path / "glue", config=config)
    expert = train_expert(tiny_base, "sst2", config, out=tmp_path / "ada", data=data, progress=False)
    ranks = expert.meta["adalora_ranks"]
    assert len(ranks) == 14 and sum(ranks.values()) <= 2 * 14  # the budget is target_r per module on average
    assert len(set(ranks.values())) > 1  # the allocation is not uniform
    task = get_task("sst2")
    plain = plain_peft_model(tiny_base.model, expert.path)
    p_plain = predict_proba(plain, tiny_base.tokenizer, task, data.test, autocast=False)
    p_ours = predict_proba(expert.attach(tiny_base.model), tiny_base.tokenizer, task, data.test, autocast=False)
    torch.testing.assert_close(p_plain, p_ours, rtol=0, atol=1e-6)
    # The folded ΔW of every module equals what PEFT itself computes.
    modules = dict(plain.named_modules())
    for name, delta in expert.deltas.items():
        peft_delta = modules[f"base_model.model.{name}"].get_delta_weight("default")
        torch.testing.assert_close(delta.dense(), peft_delta, rtol=1e-5, atol=1e-7)
        assert delta.rank == ranks[name]


def test_schedule_is_seeded_and_covers_each_epoch():
    lengths = [i % 7 for i in range(50)]
    a = batch_schedule(lengths, 8, 2.0, seed=0)
    assert a == batch_schedule(lengths, 8, 2.0, seed=0) != batch_schedule(lengths, 8, 2.0, seed=1)
    assert len(a) == 14 and sorted(i for b in a[:7] for i in b) == list(range(50))


def test_regression_loss_targets_the_two_nearest_digits():
    task = get_task("stsb")
    logits = torch.log(torch.tensor([[0.05, 0.05, 0.3, 0.5, 0.05, 0.05]]))
    expected = -(0.6 * torch.log(torch.tensor(0.3)) + 0.4 * torch.log(torch.tensor(0.5)))
    torch.testing.assert_close(task_loss(task, logits, [2.4]), expected)


def test_snapshots_are_taken_at_each_cycle_end_and_survive_a_resume(tiny_base, tmp_path):
    config = tiny_config(snapshots=3)  # 48 examples / batch 4 = 12 steps: cycles of 4
    data = tiny_data(tmp_path / "glue", config=config)
    straight = train_expert(tiny_base, "sst2", config, out=tmp_path / "s", data=data, progress=False)
    folders = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert folders == ["snapshot-1", "snapshot-2", "snapshot-3"]
    assert straight.path == tmp_path / "s" / "snapshot-3"
    from adapterfuse.expert import Expert

    snaps = [Expert.load(tmp_path / "s" / f) for f in folders]
    assert not state_equal(snaps[0].state_dict, snaps[1].state_dict)
    assert state_equal(snaps[2].state_dict, straight.state_dict)
    assert [s.meta["training"]["snapshot"] for s in snaps] == [1, 2, 3]
    assert all("accuracy" in s.meta["scores"]["test"] for s in snaps)

    with pytest.raises(Interrupt):  # interrupted after the first snapshot, resumed from step 8
        train_expert(tiny_base, "sst2", config, out=tmp_path / "r", data=data, progress=False, callback=stop_at(10))
    train_expert(tiny_base, "sst2", config, out=tmp_path / "r", data=data, progress=False)
    for f in folders:
        assert (tmp_path / "s" / f / "adapter_model.safetensors").read_bytes() == (
            tmp_path / "r" / f / "adapter_model.safetensors"
        ).read_bytes()


def test_cyclic_schedule_restarts_at_each_cycle():
    from adapterfuse.train.loop import cyclic_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cyclic_schedule(opt, [4, 8])
    rates = []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == rates[4] == 1.0
    assert rates[0] > rates[1] > rates[2] > rates[3] > 0
    assert rates[2] == pytest.approx(0.5)


def test_snapshots_need_lora_and_enough_steps(tiny_base, tmp_path):
    from pydantic import ValidationError

    from adapterfuse.errors import ConfigError

    with pytest.raises(ValidationError, match="snapshots > 1 needs method 'lora'"):
        tiny_config(method="adalora", snapshots=2, adalora_init_r=6)
    data = tiny_data(tmp_path / "glue")
    with pytest.raises(ConfigError, match="snapshots 20: more than the 12 training steps"):
        train_expert(tiny_base, "sst2", tiny_config(snapshots=20), out=tmp_path / "x", data=data, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("total, cycles", [(10, 6), (12, 5), (7, 7), (100, 3), (5, 1)])
def test_cycle_ends_give_exactly_the_snapshots_asked_for(total, cycles):
    from adapterfuse.train.loop import cycle_ends

    ends = cycle_ends(total, cycles)
    assert len(ends) == len(set(ends)) == cycles and ends[-1] == total and ends == sorted(ends) and ends[0] >= 1


def test_uneven_cycles_still_save_every_snapshot(tiny_base, tmp_path):
    config = tiny_config(snapshots=5)  # 12 steps: a fixed ceil(12/5)=3-step cycle would give only 4
    data = tiny_data(tmp_path / "glue", config=config)
    train_expert(tiny_base, "sst2", config, out=tmp_path / "s", data=data, progress=False)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [f"snapshot-{i}" for i in range(1, 6)]
