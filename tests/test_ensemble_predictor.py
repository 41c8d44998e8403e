"""EnsemblePredictor and ensemble(): save/load, the harness, and clear errors before any heavy work."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adapterfuse.backends.ensemble import fit as fit_module
from adapterfuse.backends.ensemble import predictor as predictor_module
from adapterfuse.backends.ensemble.config import EnsembleConfig
from adapterfuse.backends.ensemble.fit import EnsembleCombiner, ensemble
from adapterfuse.backends.ensemble.predictor import EnsemblePredictor
from adapterfuse.errors import CompatibilityError, ConfigError, ExpertError, OutputExistsError
from adapterfuse.harness import evaluate, results_table
from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import Predictor
from adapterfuse.tasks.glue import load_task
from tests.helpers import random_expert, write_glue_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("ens-pred") / "glue")
    return [load_task(t, validation_size=12, glue_dir=root) for t in ("sst2", "stsb")]


@pytest.fixture(scope="module")
def experts(tiny_base):
    return [random_expert(tiny_base, f"m{i}", rank=2 + 2 * i, seed=i, scale=2.0) for i in range(3)]


def test_save_load_round_trip_gives_identical_probabilities(tiny_base, experts, data, tmp_path):
    fitted = ensemble(experts, tiny_base, pooling="log_linear", weights="learned", validation=data, autocast=False)
    fitted.save(tmp_path / "ens")
    manifest = json.loads((tmp_path / "ens" / "manifest.json").read_text())
    assert manifest["kind"] == "ensemble" and manifest["name"] == fitted.name
    manifest = manifest["settings"]
    assert [m["name"] for m in manifest["members"]] == ["m0", "m1", "m2"]
    assert manifest["pooling"] == "log_linear" and manifest["weights"] == fitted.weights
    assert manifest["temperature"] == fitted.temperature and "learned" in manifest["info"]
    assert (tmp_path / "ens" / "m1" / "adapter_model.safetensors").is_file()
    loaded = EnsemblePredictor.load(tmp_path / "ens", tiny_base)
    assert loaded.names == fitted.names and loaded.weights == fitted.weights
    for td in data:
        assert torch.equal(loaded.predict_proba(td.task, td.test), fitted.predict_proba(td.task, td.test))
    with pytest.raises(OutputExistsError, match="already exists"):
        fitted.save(tmp_path / "ens")
    fitted.save(tmp_path / "ens", overwrite=True)
    assert ExpertLibrary.load([tmp_path / "ens" / n for n in fitted.names])  # members load as plain experts


def test_load_refuses_another_base_and_a_broken_folder(tiny_base, other_base, experts, tmp_path):
    EnsemblePredictor(tiny_base, experts[:2]).save(tmp_path / "ens")
    with pytest.raises(CompatibilityError, match="base fingerprint"):
        EnsemblePredictor.load(tmp_path / "ens", other_base)
    (tmp_path / "ens" / "manifest.json").write_text("{}")
    with pytest.raises(ExpertError, match=r"kind None in manifest\.json is unknown"):
        EnsemblePredictor.load(tmp_path / "ens", tiny_base)
    with pytest.raises(ExpertError, match=r"no manifest\.json"):
        EnsemblePredictor.load(tmp_path, tiny_base)


def test_the_harness_measures_it(tiny_base, experts, data):
    predictor = ensemble(experts, tiny_base, pooling="linear", weights=[0.2, 0.3, 0.5], autocast=False, batch_size=5)
    assert isinstance(predictor, Predictor)
    result = evaluate(predictor, data)
    assert set(result["tasks"]) == {"sst2", "stsb"}
    assert result["cost"]["forward_passes"] == 3.0
    assert result["cost"]["stored_params"] == sum(t.numel() for e in experts for t in e.state_dict.values())
    assert f"| {predictor.name} |" in results_table([result])
    probs = predictor.predict_proba(data[1].task, data[1].test)
    assert probs.shape == (len(data[1].test), 6) and torch.allclose(probs.sum(-1), torch.ones(len(probs)))


def test_the_combiner_fits_on_a_library(tiny_base, experts, data):
    config = EnsembleConfig(pooling="linear", weights="learned", autocast=False)
    combiner = EnsembleCombiner(tiny_base, config, members=["m2", "m0"])
    predictor = combiner.fit(ExpertLibrary(experts), {td.task.name: td for td in data})
    assert predictor.names == ["m2", "m0"] and predictor.info["weights"] == "learned"


@pytest.fixture()
def no_heavy_work(monkeypatch):
    """Fail if a model copy is made: every argument error must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("heavy work started before the arguments were validated")

    monkeypatch.setattr(fit_module, "BatchedEnsemble", refuse)
    monkeypatch.setattr(predictor_module, "BatchedEnsemble", refuse)


@pytest.mark.parametrize(
    "kwargs,error,fragment",
    [
        (dict(weights=[0.5, 0.5]), ConfigError, r"got 2 weights for 3 members \['m0', 'm1', 'm2'\]"),
        (dict(weights=[0.5, math.nan, 0.5]), ConfigError, "member 'm1' is nan; expected a finite number"),
        (dict(weights=[1.0, -0.5, 0.5], pooling="linear"), ConfigError, "'m1' is -0.5.*expected weights >= 0"),
        (dict(pooling="geometric"), ConfigError, "pooling 'geometric': unknown; expected one of linear, log_linear"),
        (dict(weights="learned"), ConfigError, "weights='learned' needs validation data, got none"),
        (dict(select="greedy"), ConfigError, "select='greedy' needs validation data"),
        (dict(select="best"), ConfigError, "select 'best': unknown"),
        (dict(weights=[0.2, 0.3, 0.5], select="top2"), ConfigError, "cannot be combined with select"),
        (dict(temperature=0.0), ConfigError, "temperature: expected a finite number > 0, got 0.0"),
        (dict(metric="auc"), ConfigError, "metric 'auc': unknown"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny_base, experts, no_heavy_work, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        ensemble(experts, tiny_base, **kwargs)


def test_members_from_different_bases_and_empty_members(tiny_base, other_base, experts, no_heavy_work):
    stranger = random_expert(other_base, "stranger", rank=2)
    with pytest.raises(CompatibilityError, match="'stranger': base fingerprint"):
        ensemble([*experts, stranger], tiny_base)
    with pytest.raises(CompatibilityError, match="base fingerprint"):
        ensemble(experts, other_base)  # members trained on another base than the one given
    with pytest.raises(ConfigError, match="expected at least one expert to ensemble, got an empty list"):
        ensemble([], tiny_base)
    with pytest.raises(ConfigError, match="expected an Expert"):
        ensemble(["experts/sst2"], tiny_base)


def test_the_predictor_checks_its_arguments_too(tiny_base, experts, no_heavy_work):
    with pytest.raises(ConfigError, match="got 1 weights for 2 members"):
        EnsemblePredictor(tiny_base, experts[:2], "log_linear", [1.0])
    with pytest.raises(ConfigError, match="pooling 'mean': unknown"):
        EnsemblePredictor(tiny_base, experts, "mean")
    with pytest.raises(ConfigError, match="weights 'learned': expected numbers"):
        EnsemblePredictor(tiny_base, experts, "linear", "learned")
    with pytest.raises(ConfigError, match="empty list"):
        EnsemblePredictor(tiny_base, [], "linear")
