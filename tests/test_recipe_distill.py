"""Distilling a recipe's fitted ensemble into one LoRA student: the student is the row."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import adapterfuse.train.distill
from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.harness import ExpertPredictor, evaluate
from adapterfuse.library import ExpertLibrary
from adapterfuse.recipe.plan import plan
from adapterfuse.recipe.resume import combiner_setting
from adapterfuse.recipe.runner import load_data, run_recipe
from adapterfuse.recipe.schema import CombinerEntry, load_recipe
from tests.helpers import write_tiny_recipe

SEEDS = {"family": "seeds", "members": 2}


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"backend": "merge", "options": {"method": "uniform"}},
            "distill: the teacher must be an ensemble; got backend 'merge'",
        ),
        (
            {"backend": "task_ensemble", "options": {"family": "temperature"}},
            "got backend 'task_ensemble'; use backend",
        ),
        ({"backend": "ensemble", "guard": "base"}, "distill: a distilled student is not guarded"),
        ({"backend": "ensemble", "distill": {"max_train": 0}}, "distill.max_train"),
        ({"backend": "ensemble", "distill": {"epoch": 1}}, "distill.epoch: Extra inputs are not permitted"),
    ],
)
def test_a_bad_distillation_fails_on_load(tmp_path, no_loading, entry, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(write_tiny_recipe(tmp_path, [{"distill": {}, **entry}]))
    assert message in str(e.value)


def test_students_of_a_task_ensemble_and_of_a_cross_task_ensemble(tmp_path, glue_dir, tiny_base, monkeypatch):
    combiners = [
        {"backend": "task_ensemble", "name": "seeds distilled", "options": SEEDS, "distill": {}},
        {"backend": "ensemble", "name": "cross distilled", "distill": {"max_train": 8, "epochs": 2.0}},
    ]
    recipe = load_recipe(write_tiny_recipe(tmp_path, combiners))
    assert "predictor seeds distilled: fit and evaluate (distilled into a LoRA student)" in plan(recipe, tmp_path / "o")
    out = tmp_path / "out"
    summary = run_recipe(recipe, out, base=tiny_base, log=lambda _: None)
    rows = {r["predictor"]: r for r in summary["results"]}
    data, _ = load_data(recipe)

    # Each task's student is what distilling that task's seed ensemble gives, byte for byte, and is the row.
    (per_task,) = [p for p in (out / "distilled").iterdir() if (p / "sst2").is_dir()]
    members = ExpertLibrary([Expert.load(out / "experts" / f"sst2-lora-r4-s{s}") for s in (0, 1)])
    teacher = ensemble(members, tiny_base, pooling="linear")
    config = recipe.train_config("sst2", 0)
    direct = adapterfuse.train.distill.distill(teacher, [data["sst2"]], tmp_path / "direct", config, compare=False)
    ours = load_file(per_task / "sst2" / "adapter_model.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in load_file(direct.path / "adapter_model.safetensors").items())
    for task in ("sst2", "rte"):
        student = Expert.load(per_task / task)
        assert student.meta["task"] == task and student.meta["method"] == "distill"
        alone = evaluate(ExpertPredictor(tiny_base, student), [data[task]])["tasks"][task]
        assert rows["seeds distilled"]["tasks"][task]["nll"] == pytest.approx(alone["nll"], abs=1e-6)
    assert rows["seeds distilled"]["cost"]["forward_passes"] == 1 and rows["seeds distilled"]["needs_task_id"]

    # The cross-task student learns every task from one ensemble of all experts, with its own caps.
    (cross,) = [p / "all" for p in (out / "distilled").iterdir() if (p / "all").is_dir()]
    student = Expert.load(cross)
    assert student.meta["tasks"] == ["sst2", "rte"] and student.meta["training"]["train_examples"] == 16
    assert student.meta["training"]["epochs"] == 2.0 and "test_average" not in student.meta["distillation"]

    # A rerun reuses both rows; without the results it reuses the finished students, training none.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished student was trained again")

    monkeypatch.setattr(adapterfuse.train.distill, "distill", refuse)
    lines: list[str] = []
    run_recipe(recipe, out, base=tiny_base, log=lines.append)
    assert sum("reused result" in x for x in lines) == 3
    (out / "results.jsonl").unlink()
    again = {r["predictor"]: r for r in run_recipe(recipe, out, base=tiny_base, log=lambda _: None)["results"]}
    assert again["cross distilled"]["average"] == pytest.approx(rows["cross distilled"]["average"], abs=1e-9)


def test_an_entry_without_distill_keeps_its_key():
    plain = combiner_setting(CombinerEntry(backend="ensemble", name="x"))
    assert "distill" not in plain and "guard" not in plain
    assert combiner_setting(CombinerEntry(backend="ensemble", name="x", distill={}))["distill"] == {
        "max_train": None,
        "epochs": None,
    }
