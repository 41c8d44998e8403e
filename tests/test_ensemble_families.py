"""Ensemble families built on one expert or one run: bagging, MC-dropout, checkpoint averaging, grids."""

from __future__ import annotations

import pytest
import torch

from adapterfuse import load_predictor
from adapterfuse.errors import ConfigError
from adapterfuse.harness import ExpertPredictor
from adapterfuse.tasks.glue import load_task
from adapterfuse.uncertainty import mutual_information
from tests.conftest import write_glue_dir
from tests.helpers import random_expert


def test_bootstrap_resamples_are_seeded_and_drawn_with_replacement():
    from adapterfuse.tasks.spec import Example
    from adapterfuse.train.config import TrainConfig
    from adapterfuse.train.expert import bootstrap_sample

    examples = [Example(fields=(str(i),), label=i % 2, idx=i) for i in range(50)]
    one, again, other = bootstrap_sample(examples, 0), bootstrap_sample(examples, 0), bootstrap_sample(examples, 1)
    assert one == again and one != other and len(one) == len(examples)
    assert len({e.idx for e in one}) < len(examples)  # with replacement: some drawn twice
    assert TrainConfig(bootstrap=True).bootstrap and not TrainConfig().bootstrap


def test_a_bagged_expert_is_reproducible_and_differs_from_the_plain_one(tiny_base, tmp_path):
    from adapterfuse.train.expert import train_expert
    from tests.helpers import tiny_config

    root = write_glue_dir(tmp_path / "glue", n_train=40, n_dev=6)
    data = load_task("sst2", validation_size=8, max_train=24, glue_dir=root)
    weights = {}
    for name, bootstrap in (("a", True), ("b", True), ("plain", False)):
        config = tiny_config(max_train_examples=24, max_eval_examples=4, bootstrap=bootstrap)
        train_expert(tiny_base, "sst2", config, out=tmp_path / name, data=data, progress=False)
        weights[name] = (tmp_path / name / "adapter_model.safetensors").read_bytes()
    assert weights["a"] == weights["b"] and weights["a"] != weights["plain"]


def test_mc_dropout_at_p_0_is_the_expert_and_is_seeded_above_it(tiny_base, tmp_path):
    from adapterfuse.backends.ensemble.mc_dropout import MCDropoutPredictor

    root = write_glue_dir(tmp_path / "glue", n_train=40, n_dev=6)
    td = load_task("sst2", validation_size=8, max_train=16, glue_dir=root)
    expert = random_expert(tiny_base, "x", rank=4, seed=0, scale=4.0, task="sst2")
    plain = ExpertPredictor(tiny_base, expert, autocast=False).predict_proba(td.task, td.test)
    off = MCDropoutPredictor(tiny_base, expert, samples=3, p=0.0, autocast=False)
    torch.testing.assert_close(off.predict_proba(td.task, td.test), plain, rtol=0, atol=1e-5)
    on = MCDropoutPredictor(tiny_base, expert, samples=4, p=0.5, seed=1, autocast=False)
    first, again = on.member_log_probs(td.task, td.test), on.member_log_probs(td.task, td.test)
    assert torch.equal(first, again) and not torch.equal(first[0], first[1])  # seeded; one mask per sample
    assert (mutual_information(first.exp()) > 0).all()
    other = MCDropoutPredictor(tiny_base, expert, samples=4, p=0.5, seed=2, autocast=False)
    assert not torch.equal(other.member_log_probs(td.task, td.test), first)
    assert on.cost().forward_passes == 4 and on.cost().stored_params == off.cost().stored_params
    on.save(tmp_path / "mc")
    loaded = load_predictor(tmp_path / "mc", tiny_base)
    assert isinstance(loaded, MCDropoutPredictor) and (loaded.samples, loaded.p, loaded.seed) == (4, 0.5, 1)
    assert torch.equal(loaded.predict_proba(td.task, td.test), on.predict_proba(td.task, td.test))
    with pytest.raises(ConfigError, match="was trained without dropout"):
        MCDropoutPredictor(tiny_base, expert)
    with pytest.raises(ConfigError, match=r"p: expected a dropout probability in \[0, 1\), got 1.0"):
        MCDropoutPredictor(tiny_base, expert, p=1.0)


def test_stacked_snapshots_are_the_exact_mean_of_their_delta_w():
    from adapterfuse.train.average import average_steps, stack_snapshots

    g = torch.Generator().manual_seed(0)
    key_a, key_b = "m.q_proj.lora_A.default.weight", "m.q_proj.lora_B.default.weight"
    snaps = [{key_a: torch.randn(3, 10, generator=g), key_b: torch.randn(7, 3, generator=g)} for _ in range(4)]
    stacked = stack_snapshots(snaps)
    want = sum(s[key_b].double() @ s[key_a].double() for s in snaps) / 4
    torch.testing.assert_close(stacked[key_b].double() @ stacked[key_a].double(), want, rtol=1e-6, atol=1e-6)
    assert stacked[key_a].shape == (12, 10) and average_steps(20, 3, 4) == [12, 16, 20]
    with pytest.raises(ConfigError, match="average_last 3: needs 9 training steps at checkpoint_every 4, got 8"):
        average_steps(8, 3, 4)


def test_an_averaged_run_saves_the_mean_of_its_last_checkpoints(tiny_base, tmp_path):
    from adapterfuse.expert import Expert
    from adapterfuse.train.expert import train_expert
    from tests.helpers import tiny_config

    root = write_glue_dir(tmp_path / "glue", n_train=40, n_dev=6)
    data = load_task("sst2", validation_size=8, max_train=24, glue_dir=root)
    config = tiny_config(max_train_examples=24, max_eval_examples=4, checkpoint_every=2, average_last=2, rank=2)
    averaged = train_expert(tiny_base, "sst2", config, out=tmp_path / "avg", data=data, progress=False)
    final = train_expert(
        tiny_base,
        "sst2",
        config.model_copy(update={"average_last": 1}),
        out=tmp_path / "last",
        data=data,
        progress=False,
    )
    assert Expert.load(tmp_path / "avg").config["r"] == 4 and averaged.meta["training"]["averaged_steps"] == [4, 6]
    for module, delta in averaged.deltas.items():
        # mean of steps 4 and 6, and step 6 alone: 2·mean - last is step 4's ΔW, a rank-2 update
        earlier = 2 * delta.dense(torch.float64) - final.deltas[module].dense(torch.float64)
        s = torch.linalg.svdvals(earlier)
        assert float(s[2]) < 1e-5 * float(s[0]) and float(s[1]) > 1e-3 * float(s[0])


def test_a_hyperparameter_grid_trains_one_member_per_point_and_reuses_finished_ones(tiny_base, tmp_path):
    from adapterfuse.train.grid import grid_configs, train_grid
    from tests.helpers import tiny_config

    config = tiny_config(max_train_examples=16, max_eval_examples=4)
    names = [n for n, _ in grid_configs(config, {"rank": [2, 4], "lr": [1e-3, 5e-3]})]
    assert names == ["lr0.001-rank2", "lr0.001-rank4", "lr0.005-rank2", "lr0.005-rank4"]
    with pytest.raises(ConfigError, match="grid field 'rnak': not a training setting"):
        grid_configs(config, {"rnak": [2]})
    with pytest.raises(ConfigError, match=r"grid point \{'rank': 0\}"):
        grid_configs(config, {"rank": [0, 2]})
    with pytest.raises(ConfigError, match="expected distinct values"):
        grid_configs(config, {"rank": [2, 2]})
    root = write_glue_dir(tmp_path / "glue", n_train=40, n_dev=6)
    data = load_task("sst2", validation_size=8, max_train=16, glue_dir=root)
    members = train_grid(tiny_base, "sst2", config, {"rank": [2, 3]}, tmp_path / "grid", data=data, progress=False)
    assert [e.deltas[next(iter(e.deltas))].rank for e in members] == [2, 3]
    stamp = (tmp_path / "grid" / "rank2" / "adapter_model.safetensors").stat().st_mtime_ns
    again = train_grid(tiny_base, "sst2", config, {"rank": [2, 3]}, tmp_path / "grid", data=data, progress=False)
    assert (tmp_path / "grid" / "rank2" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert [e.weights_sha256() for e in again] == [e.weights_sha256() for e in members]


def test_the_train_command_reads_a_grid_and_refuses_a_bad_one(capsys):
    from adapterfuse.cli.main import main
    from adapterfuse.cli.train import _grid

    assert _grid(["lr=1e-3,3e-3", "rank=4,8", "balance-classes=true,false"]) == {
        "lr": [0.001, 0.003],
        "rank": [4, 8],
        "balance_classes": [True, False],
    }
    assert main(["train", "--task", "sst2", "--out", "x", "--grid", "rank=0,2"]) == 1
    assert "grid point {'rank': 0}" in capsys.readouterr().err
    assert main(["train", "--task", "sst2", "--out", "x", "--grid", "lr"]) == 1
    assert "expected FIELD=V1,V2" in capsys.readouterr().err
