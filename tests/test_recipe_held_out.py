"""Held-out tasks in a recipe: every predictor not told the task is also scored on tasks no expert knows."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from adapterfuse import load_predictor
from adapterfuse.backends.route.api import routing_accuracy
from adapterfuse.detection import out_of_task_auroc
from adapterfuse.errors import ConfigError
from adapterfuse.harness import ZeroShotPredictor
from adapterfuse.recipe.plan import count_steps, plan
from adapterfuse.recipe.runner import DATA_SEED, load_data, run_recipe
from adapterfuse.recipe.schema import load_recipe
from adapterfuse.tasks.glue import load_held_out

TINY_TRAIN = {"batch_size": 4, "lr": 5e-3, "checkpoint_every": 4, "max_eval_examples": 8, "autocast": False}


def _write(tmp_path, **harness):
    raw = {
        "name": "held",
        "tasks": {"sst2": {}, "rte": {}},
        "experts": {"rank": 4, "max_train": 16, "epochs": 1.0, "train": TINY_TRAIN},
        "harness": {"validation_size": 8, "validation_per_task": 8, "max_test": 10, **harness},
        "combiners": [
            {"backend": "merge", "options": {"method": "uniform"}},
            {"backend": "route", "name": "routed", "options": {"router": "learned", "epochs": 20}},
        ],
        "outputs": {"plots": False, "save": ["routed"]},
    }
    path = tmp_path / "held.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "harness, message",
    [
        ({"held_out": ["rte"]}, "harness.held_out: ['rte'] also in tasks"),
        ({"held_out": ["qnly"]}, "harness.held_out: unknown task(s) ['qnly']"),
        ({"held_out": ["mrpc", "mrpc"]}, "expected distinct task names"),
        ({"max_held_out": 0}, "harness.max_held_out"),
        ({"baselines": ["expert"]}, "harness.baselines.0"),
        ({"detector": True}, "harness.detector: is measured on held-out tasks, but held_out is empty"),
    ],
)
def test_bad_held_out_settings_fail_on_load(tmp_path, no_loading, harness, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(_write(tmp_path, **harness))
    assert message in str(e.value)


def test_held_out_tasks_are_scored_apart_with_their_detection_auroc(tmp_path, glue_dir, tiny_base):
    recipe = load_recipe(
        _write(tmp_path, held_out=["mrpc"], max_held_out=12, baselines=["zero_shot", "oracle", "experts"])
    )
    assert count_steps(recipe) == 2 + 4 + 2 + 1  # two experts, four baseline rows, two combiners, the report
    summary = run_recipe(recipe, tmp_path / "out", base=tiny_base, log=lambda _: None)
    rows = {r["predictor"]: r for r in summary["results"]}
    assert list(rows) == [
        "base zero-shot",
        "oracle",
        "expert sst2-lora-r4-s0",
        "expert rte-lora-r4-s0",
        "merge uniform",
        "routed",
    ]
    assert "held_out" not in rows["oracle"], "a predictor told the task has no answer on a task without an expert"
    for name in ("base zero-shot", "expert sst2-lora-r4-s0", "merge uniform", "routed"):
        row = rows[name]
        assert set(row["held_out"]) == {"mrpc"} and row["held_out"]["mrpc"]["n"] == 12
        assert set(row["tasks"]) == {"sst2", "rte"}, "a held-out task stays out of the average"
        assert 0.0 <= row["out_of_task_auroc"] <= 1.0
    assert all("entropies" not in r for r in summary["results"])

    # A sequence-level router also reports how often it picks each input's own task's expert.
    data, _ = load_data(recipe)
    predictor = load_predictor(tmp_path / "out" / "predictors" / "routed", tiny_base)
    expected = routing_accuracy(predictor, list(data.values()))["oracle"]
    assert rows["routed"]["routing_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert all("routing_accuracy" not in r for n, r in rows.items() if n != "routed")

    # The AUROC is the detection module's, on the same inputs.
    held = load_held_out("mrpc", 12, DATA_SEED)
    expected = out_of_task_auroc(ZeroShotPredictor(tiny_base), list(data.values()), [held])["entropy"]
    assert rows["base zero-shot"]["out_of_task_auroc"] == pytest.approx(expected, abs=1e-9)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Tasks no expert was trained for" in md and "| routing acc. |" in md
    assert f"| merge uniform | {rows['merge uniform']['held_out']['mrpc']['score']:.3f} |" in md

    # Results without held-out tasks stay valid: dropping them re-measures everything once, and a
    # rerun of that reuses it all.
    plain = load_recipe(_write(tmp_path, baselines=["zero_shot"]))
    lines: list[str] = []
    run_recipe(plain, tmp_path / "out", base=tiny_base, log=lines.append)
    assert not any("reused result" in x for x in lines)
    lines.clear()
    run_recipe(plain, tmp_path / "out", base=tiny_base, log=lines.append)
    assert sum("reused result" in x for x in lines) == 3
    assert "held_out" not in json.loads((tmp_path / "out" / "results.json").read_text())["results"][0]


def test_the_recipe_reports_the_feature_detector_and_a_rerun_reuses_it(tmp_path, glue_dir, tiny_base):
    recipe = load_recipe(_write(tmp_path, held_out=["mrpc"], max_held_out=12, baselines=["zero_shot"], detector=True))
    assert "feature detector: fit and score on mrpc (reused if unchanged)" in plan(recipe, tmp_path / "out")
    summary = run_recipe(recipe, tmp_path / "out", base=tiny_base, log=lambda _: None)
    found = summary["detector"]
    assert 0.0 <= found["auroc"] <= 1.0 and set(found["held_out"]) == {"mrpc"} and found["held_out"]["mrpc"]["n"] == 12
    assert set(found["in_task"]) == {"sst2", "rte"}
    assert "## Telling the held-out tasks from the input" in (tmp_path / "out" / "results.md").read_text()
    lines: list[str] = []
    again = run_recipe(recipe, tmp_path / "out", base=tiny_base, log=lines.append)
    assert again["detector"] == found and any("feature detector: reused result" in line for line in lines)


def test_a_guarded_combiner_hands_what_the_run_detector_flags_to_the_base(tmp_path, glue_dir, tiny_base):
    from adapterfuse.feature_detector import FeatureDetector
    from adapterfuse.guarded import Guarded

    path = _write(tmp_path, held_out=["mrpc"], max_held_out=12, baselines=[], detector=True)
    raw = yaml.safe_load(path.read_text())
    guarded = {
        "backend": "route",
        "name": "routed, guarded",
        "options": raw["combiners"][1]["options"],
        "guard": "base",
    }
    mixed = {"backend": "merge", "name": "merged, guarded", "options": {"method": "uniform"}, "guard": "mix"}
    raw["combiners"] += [guarded, mixed]
    raw["outputs"]["save"] = ["routed", "routed, guarded", "merged, guarded"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    recipe = load_recipe(path)
    dry = plan(recipe, tmp_path / "out")
    assert "predictor routed, guarded: fit and evaluate (flagged inputs to the base)" in dry
    assert "predictor merged, guarded: fit and evaluate (flagged inputs to every expert merged)" in dry
    summary = run_recipe(recipe, tmp_path / "out", base=tiny_base, log=lambda _: None)
    rows = {r["predictor"]: r for r in summary["results"]}
    assert "handed_over" not in rows["routed"]

    detector = FeatureDetector.load(tmp_path / "out" / "detector", tiny_base)
    data, _ = load_data(recipe)
    inside = [f for td in data.values() for f in detector.flags(td.task, list(td.test)).tolist()]
    held = load_held_out("mrpc", 12, DATA_SEED)
    assert rows["routed, guarded"]["handed_over"] == pytest.approx(sum(inside) / len(inside))
    assert rows["routed, guarded"]["held_out_handed_over"] == pytest.approx(
        float(detector.flags(held.task, list(held.test)).float().mean())
    )
    loaded = load_predictor(tmp_path / "out" / "predictors" / "routed,_guarded", tiny_base)
    routed = load_predictor(tmp_path / "out" / "predictors" / "routed", tiny_base)
    assert isinstance(loaded, Guarded)
    batch = list(held.test)
    flags = detector.flags(held.task, batch)[:, None]
    want = torch.where(
        flags, ZeroShotPredictor(tiny_base).predict_proba(held.task, batch), routed.predict_proba(held.task, batch)
    )
    assert torch.allclose(loaded.predict_proba(held.task, batch), want, atol=1e-6)
    assert "handed over: held-out" in (tmp_path / "out" / "results.md").read_text()
    mix = json.loads((tmp_path / "out" / "predictors" / "merged,_guarded" / "fallback" / "manifest.json").read_text())
    assert mix["kind"] == "merged" and mix["name"] == "every expert merged"

    lines: list[str] = []
    run_recipe(recipe, tmp_path / "out", base=tiny_base, log=lines.append)
    assert any("predictor routed, guarded: reused result" in line for line in lines)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"detector": False}, "guard needs the run's feature detector; set harness.detector: true"),
        ({"backend": "task_ensemble"}, "guard: a task_ensemble or pe_ensemble is told each input's task"),
    ],
)
def test_a_guard_without_a_detector_or_on_a_taskwise_combiner_fails_on_load(tmp_path, no_loading, change, message):
    path = _write(tmp_path, held_out=["mrpc"], detector=change.get("detector", True))
    raw = yaml.safe_load(path.read_text())
    entry = {"backend": change.get("backend", "merge"), "name": "guarded", "guard": "base"}
    raw["combiners"].append({**entry, "options": {"family": "seeds"}} if "backend" in change else entry)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert message in str(e.value)
