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
from adapterfuse.uncertainty import (
    auroc,
    brier,
    ece,
    entropy,
    mutual_information,
    nll,
    reliability,
    uncertainty_metrics,
)
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
    # The reliability diagram is those bins: mean confidence and accuracy per bin, by rising confidence.
    curve = reliability(PROBS, LABELS, bins=2)
    assert curve["count"] == [2, 2]
    assert curve["confidence"] == pytest.approx([0.65, 0.85], abs=1e-6)
    assert curve["accuracy"] == pytest.approx([1.0, 0.5], abs=1e-12)


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
    mean_t = math.exp((math.log(scaled.temperatures["sst2"]) + math.log(scaled.temperatures["stsb"])) / 2)
    lenient = TemperatureScaled(expert, scaled.temperatures, unseen="mean")
    rte = get_task("rte")  # an unseen task (its prompts take two fields, as STS-B's inputs have)
    torch.testing.assert_close(
        lenient.predict_proba(rte, data[1].test), scale(expert.predict_proba(rte, data[1].test), mean_t)
    )


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


def test_an_ensemble_is_scored_and_its_members_disagreement_measured_in_one_pass(tiny_base, tmp_path):
    from adapterfuse.backends.ensemble.fit import ensemble
    from adapterfuse.detection import probs_and_uncertainty
    from adapterfuse.library import ExpertLibrary
    from adapterfuse.recipe.taskwise import TaskwisePredictor
    from adapterfuse.uncertainty import normalised_entropy

    root = write_glue_dir(tmp_path / "glue", n_train=40, n_dev=8)
    data = load_task("sst2", validation_size=8, max_train=16, glue_dir=root)
    members = [random_expert(tiny_base, f"m{i}", rank=4, seed=i, scale=4.0, task="sst2") for i in range(3)]
    pooled = ensemble(ExpertLibrary(members), tiny_base, pooling="log_linear")
    calls = []
    real = pooled.member_log_probs
    pooled.member_log_probs = lambda task, batch: calls.append(len(batch)) or real(task, batch)
    for predictor in (pooled, TaskwisePredictor("told", {"sst2": pooled})):
        calls.clear()
        probs, scores = probs_and_uncertainty(predictor, data.task, data.test)
        assert calls == [len(data.test)]  # the members run once for both
        torch.testing.assert_close(probs, pooled.predict_proba(data.task, data.test))
        torch.testing.assert_close(scores["entropy"], normalised_entropy(data.task, probs))
        lp = real(data.task, data.test)
        torch.testing.assert_close(scores["mutual_information"], mutual_information(lp.exp()) / math.log(2))
        assert bool((scores["mutual_information"] > 0).all())
