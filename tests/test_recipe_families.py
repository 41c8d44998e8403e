"""Ensemble families in a recipe: each task answered by an ensemble of its own members (task_ensemble)."""

from __future__ import annotations

import statistics

import pytest

import adapterfuse.train.expert
from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.detection import out_of_task_auroc
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.harness import ExpertPredictor, evaluate
from adapterfuse.library import ExpertLibrary
from adapterfuse.recipe.plan import plan
from adapterfuse.recipe.resume import combiner_setting
from adapterfuse.recipe.runner import DATA_SEED, load_data, run_recipe
from adapterfuse.recipe.schema import CombinerEntry, load_recipe
from adapterfuse.tasks.glue import load_held_out
from tests.helpers import write_tiny_recipe

FAMILIES = [
    {"backend": "task_ensemble", "name": "seeds", "options": {"family": "seeds", "members": 2}},
    {"backend": "task_ensemble", "name": "bagging", "options": {"family": "bagging", "members": 2}},
    {"backend": "task_ensemble", "name": "snapshots", "options": {"family": "snapshots", "members": 2}},
    {"backend": "task_ensemble", "name": "grid", "options": {"family": "grid", "grid": {"lr": [5e-3, 1e-2]}}},
    {"backend": "task_ensemble", "name": "mc p0", "options": {"family": "mc_dropout", "members": 2, "p": 0.0}},
    {"backend": "task_ensemble", "name": "temperature", "options": {"family": "temperature"}},
    {
        "backend": "task_ensemble",
        "name": "seeds learned",
        "options": {"family": "seeds", "members": 2, "pooling": "log_linear", "weights": "learned"},
    },
]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"family": "seed"}, "combiners.0.options.family: Input should be 'seeds', 'bagging'"),
        ({"family": "seeds", "grid": {"lr": [1e-3]}}, "grid: give a grid"),
        ({"family": "grid"}, "grid: give a grid"),
        ({"family": "grid", "grid": {"lrate": [1e-3]}}, "grid field 'lrate': not a training setting"),
        ({"family": "seeds", "p": 0.1}, "p: the dropout rate is an option of family 'mc_dropout'"),
        ({"family": "mc_dropout", "members": 0}, "members"),
        ({"family": "seeds", "member": 2}, "member: Extra inputs are not permitted"),
        ({"family": "temperature", "weights": "learned"}, "weights: learned weights pool trained members"),
    ],
)
def test_bad_family_options_fail_on_load(tmp_path, no_loading, options, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(write_tiny_recipe(tmp_path, [{"backend": "task_ensemble", "options": options}]))
    assert message in str(e.value)


def test_a_trained_family_needs_the_recipe_to_train_experts(tmp_path, no_loading):
    given = {"paths": ["experts/sst2", "experts/rte"]}
    for family, fails in (("bagging", True), ("temperature", False)):
        path = write_tiny_recipe(tmp_path, [{"backend": "task_ensemble", "options": {"family": family}}], experts=given)
        if fails:
            with pytest.raises(ConfigError, match="family 'bagging' trains members with the recipe's expert settings"):
                plan(load_recipe(path), tmp_path / "out")
        else:
            load_recipe(path)


def test_every_family_trains_its_members_once_and_scores_like_its_parts(tmp_path, glue_dir, tiny_base, monkeypatch):
    recipe = load_recipe(
        write_tiny_recipe(tmp_path, FAMILIES, harness={**_harness(), "held_out": ["mrpc"], "max_held_out": 10})
    )
    real_train = adapterfuse.train.expert.train_expert
    trained: list[tuple[str, int, bool, int]] = []

    def counting_train(base, task, config, **kwargs):
        trained.append((task, config.seed, config.bootstrap, config.snapshots))
        return real_train(base, task, config, **kwargs)

    monkeypatch.setattr(adapterfuse.train.expert, "train_expert", counting_train)
    out = tmp_path / "out"
    summary = run_recipe(recipe, out, base=tiny_base, log=lambda _: None)
    assert [t for t in trained if t[0] == "sst2"] == [
        ("sst2", 0, False, 1),  # the recipe's expert, also the seeds family's first member
        ("sst2", 1, False, 1),  # seeds
        ("sst2", 0, True, 1),  # bagging
        ("sst2", 1, True, 1),
        ("sst2", 0, False, 2),  # one run, two snapshots
    ], trained
    (grid,) = (out / "families" / "sst2").glob("grid-*")  # the grid's two points, trained by train_grid
    assert sorted(p.name for p in grid.iterdir() if (p / "adapterfuse.json").is_file()) == ["lr0.005", "lr0.01"]
    rows = {r["predictor"]: r for r in summary["results"]}
    assert all(rows[f["name"]]["needs_task_id"] for f in FAMILIES)

    # The seeds family is the ensemble of the recipe's experts of seeds 0 and 1, task by task.
    # With learned weights, the same members weighed (and log-linear, tempered) on the task's validation split.
    data, validation = load_data(recipe)
    for task in ("sst2", "rte"):
        members = ExpertLibrary([Expert.load(out / "experts" / f"{task}-lora-r4-s{s}") for s in (0, 1)])
        direct = evaluate(ensemble(members, tiny_base, pooling="linear"), [data[task]])["tasks"][task]
        assert rows["seeds"]["tasks"][task]["score"] == pytest.approx(direct["score"], abs=1e-9)
        assert rows["seeds"]["tasks"][task]["nll"] == pytest.approx(direct["nll"], abs=1e-6)
        fitted = ensemble(members, tiny_base, pooling="log_linear", weights="learned", validation=[validation[task]])
        learned = evaluate(fitted, [data[task]])["tasks"][task]
        assert rows["seeds learned"]["tasks"][task]["nll"] == pytest.approx(learned["nll"], abs=1e-6)
        assert rows["seeds learned"]["tasks"][task]["nll"] != pytest.approx(direct["nll"], abs=1e-6)
        # MC-dropout at p = 0 is the expert; temperature scaling keeps its ranking, so its accuracy.
        for metric in ("score", "nll", "brier"):
            assert rows["mc p0"]["tasks"][task][metric] == pytest.approx(
                rows["oracle"]["tasks"][task][metric], abs=1e-6
            )
        assert rows["temperature"]["tasks"][task]["score"] == pytest.approx(rows["oracle"]["tasks"][task]["score"])
    assert Expert.load(next((out / "families" / "sst2").glob("bagging-s1-*"))).meta["training"]["bootstrap"] is True

    # Told the task, a family has no answer for the held-out task; its AUROC is the mean of each task's.
    held = load_held_out("mrpc", 10, DATA_SEED)
    experts = {t: Expert.load(out / "experts" / f"{t}-lora-r4-s0") for t in ("sst2", "rte")}
    expected = statistics.fmean(
        out_of_task_auroc(ExpertPredictor(tiny_base, experts[t]), [data[t]], [held])["entropy"] for t in experts
    )
    assert rows["oracle"]["out_of_task_auroc"] == pytest.approx(expected, abs=1e-9)
    # Ensembles are also scored by their members' disagreement; a single expert has none.
    expected_mi = statistics.fmean(
        out_of_task_auroc(
            ensemble(ExpertLibrary([Expert.load(out / "experts" / f"{t}-lora-r4-s{s}") for s in (0, 1)]), tiny_base),
            [data[t]],
            [held],
        )["mutual_information"]
        for t in experts
    )
    assert rows["seeds"]["out_of_task_auroc_mi"] == pytest.approx(expected_mi, abs=1e-9)
    assert "out_of_task_auroc_mi" not in rows["oracle"] and "out_of_task_auroc_mi" not in rows["temperature"]
    assert "disagreement" in (out / "results.md").read_text()
    # Each row keeps the reliability diagram behind its ECE (classification tasks only).
    curve = rows["seeds"]["reliability"]["sst2"]
    assert sum(curve["count"]) == rows["seeds"]["tasks"]["sst2"]["n"] and set(rows["seeds"]["reliability"]) == {
        "sst2",
        "rte",
    }
    assert all("held_out" not in r and 0 <= r["out_of_task_auroc"] <= 1 for r in summary["results"])

    trained.clear()
    lines: list[str] = []
    run_recipe(recipe, out, base=tiny_base, log=lines.append)
    assert not trained and sum("reused result" in x for x in lines) == len(FAMILIES) + 1


def _harness() -> dict:
    return {"validation_size": 8, "validation_per_task": 8, "max_test": 10, "baselines": ["oracle"]}


def test_a_seeds_member_trained_otherwise_is_refused(tmp_path, glue_dir, tiny_base):
    combiner = {"backend": "task_ensemble", "name": "seeds", "options": {"family": "seeds", "members": 2}}
    recipe = load_recipe(write_tiny_recipe(tmp_path, [combiner]))
    out = tmp_path / "out"
    other = recipe.train_config("sst2", 1).model_copy(update={"lr": 1e-2})
    adapterfuse.train.expert.train_expert(tiny_base, "sst2", other, out=out / "experts" / "sst2-lora-r4-s1")
    with pytest.raises(
        ConfigError, match=r"expert 'sst2-lora-r4-s1' at .* was trained with lr=0.01, the recipe asks lr=0.005"
    ):
        run_recipe(recipe, out, base=tiny_base, log=lambda _: None)


@pytest.mark.parametrize(
    ("backend", "given", "spelled_out", "changed"),
    [
        (
            "pe_ensemble",
            {"kind": "camero"},
            {"kind": "camero", "camero_perturbation": "none"},
            {"kind": "camero", "camero_perturbation": "dropout"},
        ),
        ("task_ensemble", {"family": "seeds"}, {"family": "seeds", "members": 3}, {"family": "seeds", "members": 2}),
        (
            "task_ensemble",
            {"family": "seeds"},
            {"family": "seeds", "weights": "uniform"},
            {"family": "seeds", "weights": "learned"},
        ),
    ],
)
def test_a_result_is_keyed_by_every_option_so_a_changed_default_is_not_reused(backend, given, spelled_out, changed):
    def config(options):
        return combiner_setting(CombinerEntry(backend=backend, name="x", options=options))["config"]

    assert config(given) == config(spelled_out) != config(changed)
