"""A predictor guarded by the feature detector: who answers which input, its cost, its folder."""

from __future__ import annotations

import json

import pytest
import torch

import adapterfuse
from adapterfuse.calibration import TemperatureScaled
from adapterfuse.errors import ConfigError
from adapterfuse.feature_detector import DetectorSpec, FeatureDetector
from adapterfuse.guarded import Guarded, guard
from adapterfuse.harness import ZeroShotPredictor
from adapterfuse.loading import load_predictor
from adapterfuse.tasks.glue import load_held_out, load_task


@pytest.fixture()
def setting(tiny_base, glue_dir):
    tasks = [load_task(name, validation_size=20, max_train=30) for name in ("sst2", "cola")]
    detector = FeatureDetector.fit(tiny_base, tasks, DetectorSpec(layer=1), accept=0.8)
    # a real predictor whose answers differ from the base's: the base at temperature 0.5 on both tasks
    inner = TemperatureScaled(ZeroShotPredictor(tiny_base), {"sst2": 0.5, "cola": 0.5, "mrpc": 0.5}, "sharp base")
    return tasks, detector, inner


def test_flagged_inputs_get_the_fallback_and_the_others_the_inner_predictor(tiny_base, setting):
    tasks, detector, inner = setting
    pairs = load_held_out("mrpc")  # two fields: unlike every known input
    for td in [*tasks, pairs]:
        batch = list(td.test)
        flags = detector.flags(td.task, batch)
        guarded = guard(inner, detector)
        probs = guarded.predict_proba(td.task, batch)
        want = torch.where(
            flags[:, None],
            ZeroShotPredictor(tiny_base).predict_proba(td.task, batch),
            inner.predict_proba(td.task, batch),
        )
        assert torch.allclose(probs, want, atol=1e-6)
        assert (guarded.flagged, guarded.answered) == (int(flags.sum()), len(batch))
    assert 0 < int(detector.flags(pairs.task, list(pairs.test)).sum())  # the mix above had both kinds


def test_a_threshold_past_every_distance_changes_nothing_and_below_every_one_hands_all_over(tiny_base, setting):
    tasks, detector, inner = setting
    batch = list(tasks[1].test)
    keep_all = Guarded(inner, with_threshold(detector, 2.5))  # a cosine distance is at most 2
    assert torch.equal(keep_all.predict_proba(tasks[1].task, batch), inner.predict_proba(tasks[1].task, batch))
    fallback = TemperatureScaled(ZeroShotPredictor(tiny_base), {"cola": 2.0})
    hand_all = Guarded(inner, with_threshold(detector, -1.0), fallback)
    assert hand_all.name == "sharp base + detector -> base zero-shot + temperature"
    assert torch.equal(hand_all.predict_proba(tasks[1].task, batch), fallback.predict_proba(tasks[1].task, batch))


def with_threshold(detector: FeatureDetector, threshold: float | None) -> FeatureDetector:
    return FeatureDetector(detector.base, detector.spec, detector.tasks, detector.bank, threshold, detector.accept)


def test_saved_and_loaded_it_answers_the_same(tiny_base, setting, tmp_path):
    tasks, detector, inner = setting
    guarded = adapterfuse.guard(inner, detector, name="guarded sharp base")
    guarded.save(tmp_path / "g")
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["kind"] == "guarded" and manifest["name"] == "guarded sharp base"
    loaded = load_predictor(tmp_path / "g", tiny_base)
    assert isinstance(loaded, Guarded) and loaded.name == "guarded sharp base"
    pairs = load_held_out("mrpc")  # two fields: unlike every known input
    for td in [*tasks, pairs]:
        batch = list(td.test)
        assert torch.equal(loaded.predict_proba(td.task, batch), guarded.predict_proba(td.task, batch))


def test_its_cost_adds_the_detectors_pass_and_its_features(tiny_base, setting):
    _, detector, inner = setting
    cost = guard(inner, detector).cost()
    assert cost.forward_passes == 2 and cost.stored_params == detector.bank.numel()
    assert cost.memory_bytes == detector.bank.numel() * 4


def test_a_detector_without_a_threshold_is_refused(tiny_base, setting):
    _, detector, inner = setting
    with pytest.raises(ConfigError, match="no threshold; fit it on tasks with validation inputs"):
        guard(inner, with_threshold(detector, None))
