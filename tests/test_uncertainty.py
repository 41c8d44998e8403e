"""NLL, Brier, ECE, entropy, mutual information, AUROC against hand-computed values; temperature scaling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adapterfuse import load_predictor
from adapterfuse.calibration import TemperatureScaled, fit_temperature, scale, temperature_scale
from adapterfuse.errors import ConfigError
from adapterfuse.harness import ExpertPredictor, evaluate, uncertainty_table
from adapterfuse.io.manifest import MANIFEST
from adapterfuse.tasks.glue import get_task, load_task
from adapterfuse.uncertainty import auroc, brier, ece, entropy, mutual_information, nll, uncertainty_metrics
from tests.conftest import write_glue_dir
from tests.helpers import random_expert

SST2, STSB = get_task("sst2"), get_task("stsb")
PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
LABELS = [0, 1, 1, 1]


def test_nll_and_brier_by_hand():
    want_nll = -(math.log(0.9) + math.log(0.2) + math.log(0.7) + math.log(0.6)) / 4
    assert nll(SST2, PROBS, LABELS) == pytest.approx(want_nll, abs=1e-6)
    want_brier = (2 * 0.1**2 + 2 * 0.8**2 + 2 * 0.3**2 + 2 * 0.4**2) / 4
    assert brier(SST2, PROBS, LABELS) == pytest.approx(want_brier, abs=1e-6)


def test_regression_nll_uses_the_two_level_soft_target():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.1, 0.1]])
    want = -(0.75 * math.log(0.3) + 0.25 * math.log(0.2))  # 2.25: 0.75 on level 2, 0.25 on level 3
    assert nll(STSB, probs, [2.25]) == pytest.approx(want, abs=1e-6)
    target = torch.tensor([0, 0, 0.75, 0.25, 0, 0])
    assert brier(STSB, probs, [2.25]) == pytest.approx(float(((probs[0] - target) ** 2).sum()), abs=1e-6)
    assert "ece" not in uncertainty_metrics(STSB, probs, [2.25])


def test_ece_over_equal_mass_bins_by_hand():
    # Confidences sorted: 0.6 (right), 0.7 (right) | 0.8 (wrong: predicts 0, label 1), 0.9 (right).
    want = (2 * abs(1.0 - 0.65) + 2 * abs(0.5 - 0.85)) / 4
    assert ece(PROBS, LABELS, bins=2) == pytest.approx(want, abs=1e-6)
    assert ece(PROBS, LABELS, bins=1) == pytest.approx(abs(0.75 - 0.75), abs=1e-6)
    with pytest.raises(ConfigError, match="ece bins: expected an integer >= 1, got 0"):
        ece(PROBS, LABELS, bins=0)


def test_entropy_mutual_information_and_auroc():
    assert entropy(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(math.log(2))
    agree = torch.stack([PROBS, PROBS])
    assert torch.allclose(mutual_information(agree), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    split = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two sure members that disagree: MI = log 2
    assert mutual_information(split).item() == pytest.approx(math.log(2), abs=1e-9)
    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0 and auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert auroc([0.1, 0.3], [0.2, 0.4]) == 0.75
    with pytest.raises(ConfigError, match="got 0 and 2"):
        auroc([], [0.1, 0.2])


def test_temperature_scaling_softens_an_overconfident_predictor():
    assert torch.allclose(scale(PROBS, 1.0), PROBS, atol=1e-6)
    sure = torch.tensor([[0.99, 0.01], [0.99, 0.01], [0.01, 0.99], [0.99, 0.01]])  # 3 of 4 right, all very sure
    t = fit_temperature(SST2, sure, LABELS)
    assert t > 1.5
    assert nll(SST2, scale(sure, t), LABELS) < nll(SST2, sure, LABELS)
    assert torch.equal(scale(sure, t).argmax(1), sure.argmax(1))  # the ranking (accuracy) is unchanged


def test_the_harness_reports_uncertainty_and_a_scaled_predictor_round_trips(tiny_base, tmp_path):
    root = write_glue_dir(tmp_path / "glue", n_train=40, n_dev=6)
    data = [load_task(t, validation_size=16, max_train=16, glue_dir=root) for t in ("sst2", "stsb")]
    expert = ExpertPredictor(tiny_base, random_expert(tiny_base, "x", rank=2, seed=0, scale=2.0, task="sst2"))
    result = evaluate(expert, data)
    assert {"nll", "brier", "ece"} <= set(result["tasks"]["sst2"]) and "ece" not in result["tasks"]["stsb"]
    assert result["ece_bins"] == 15 and "NLL / ECE / Brier" in uncertainty_table([result])
    scaled = temperature_scale(expert, data)
    assert isinstance(scaled, TemperatureScaled) and set(scaled.temperatures) == {"sst2", "stsb"}
    calibrated = evaluate(scaled, data, "validation")
    for task in ("sst2", "stsb"):  # fitted on the validation split: its NLL there can only go down
        assert calibrated["tasks"][task]["nll"] <= evaluate(expert, data, "validation")["tasks"][task]["nll"] + 1e-6
    scaled.save(tmp_path / "scaled")
    assert json.loads((tmp_path / "scaled" / MANIFEST).read_text())["kind"] == "temperature_scaled"
    loaded = load_predictor(tmp_path / "scaled", tiny_base)
    assert isinstance(loaded, TemperatureScaled) and loaded.temperatures == scaled.temperatures
    for td in data:
        assert torch.equal(loaded.predict_proba(td.task, td.test), scaled.predict_proba(td.task, td.test))
    with pytest.raises(ConfigError, match="no temperature for task 'rte'"):
        scaled.predict_proba(get_task("rte"), data[0].test)


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


def test_out_of_task_auroc_scores_every_uncertainty_of_a_predictor(tiny_base, tmp_path):
    from adapterfuse.backends.ensemble.mc_dropout import MCDropoutPredictor
    from adapterfuse.detection import out_of_task_auroc, uncertainty_scores
    from adapterfuse.tasks.glue import load_held_out

    root = write_glue_dir(tmp_path / "glue", n_train=40, n_dev=8)
    inside = [load_task("sst2", validation_size=8, max_train=16, glue_dir=root)]
    outside = [load_held_out("rte", glue_dir=root)]
    expert = random_expert(tiny_base, "x", rank=4, seed=0, scale=4.0, task="sst2")
    one = ExpertPredictor(tiny_base, expert, autocast=False)
    assert set(out_of_task_auroc(one, inside, outside)) == {"entropy"}
    mc = MCDropoutPredictor(tiny_base, expert, samples=4, p=0.3, autocast=False)
    found = out_of_task_auroc(mc, inside, outside)
    want = auroc(
        uncertainty_scores(mc, inside[0].task, inside[0].test)["mutual_information"],
        uncertainty_scores(mc, outside[0].task, outside[0].test)["mutual_information"],
    )
    assert set(found) == {"entropy", "mutual_information"} and found["mutual_information"] == want
    assert all(0.0 <= v <= 1.0 for v in found.values())
    with pytest.raises(ConfigError, match="got 1 and 0"):
        out_of_task_auroc(one, inside, [])


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
