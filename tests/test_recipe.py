"""Recipes: validation before anything loads, resume after an interruption, results as measured."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import adapterfuse.base
import adapterfuse.train.expert
from adapterfuse import cli
from adapterfuse.backends.merge.api import MergeCombiner
from adapterfuse.backends.merge.config import MergeConfig
from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.harness import evaluate
from adapterfuse.library import ExpertLibrary
from adapterfuse.progress import set_verbosity
from adapterfuse.recipe.checks import check_expert_headers
from adapterfuse.recipe.plan import plan
from adapterfuse.recipe.report import pareto_front
from adapterfuse.recipe.runner import DATA_SEED, run_recipe
from adapterfuse.recipe.schema import load_recipe
from adapterfuse.tasks.glue import load_task
from adapterfuse.tasks.spec import TaskData

TINY_TRAIN = {"batch_size": 4, "lr": 5e-3, "checkpoint_every": 4, "max_eval_examples": 8, "autocast": False}


def _recipe(tmp_path: Path, **changes) -> Path:
    raw = {
        "name": "tiny",
        "tasks": {"sst2": {}, "rte": {"max_train": 16}},
        "experts": {"rank": 4, "max_train": 24, "epochs": 1.0, "train": TINY_TRAIN},
        "harness": {"validation_size": 8, "validation_per_task": 8, "max_test": 12},
        "combiners": [
            {"backend": "merge", "options": {"method": "uniform"}},
            {"backend": "ensemble", "name": "ens", "options": {"pooling": "log_linear"}},
            {"backend": "route", "name": "arrow", "options": {"router": "arrow", "top_k": 1}},
            {"backend": "pe_ensemble", "name": "be", "options": {"kind": "batchensemble", "members": 2}},
        ],
        "outputs": {"save": ["merge uniform"], "plots": True},
    }
    if "combiners" in changes:
        raw["outputs"] = {}
    raw.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"expertz": {}}, "expertz: Extra inputs are not permitted"),
        ({"tasks": {"sst-2": {}}}, "unknown task(s) ['sst-2']"),
        ({"harness": {"max_tset": 3}}, "harness.max_tset"),
        ({"combiners": [{"backend": "merg"}]}, "combiners.0.backend"),
        ({"experts": {"train": {"learning_rate": 1}}}, "learning_rate"),
        ({"outputs": {"save": ["nothing"]}}, "outputs.save: predictor 'nothing' is not a savable combiner"),
        ({"outputs": {"save": ["be"]}}, "outputs.save: predictor 'be' is not a savable combiner"),
        (
            {"outputs": {"push": [{"predictor": "ens", "repo_id": "a/b"}]}},
            "outputs.push: predictor 'ens' is not a merge combiner",
        ),
        ({"experts": {"train": {"snapshots": 3}}}, "experts.train.snapshots: a recipe expert is one adapter"),
    ],
)
def test_bad_recipe_keys_fail_on_load(tmp_path, no_loading, changes, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(_recipe(tmp_path, **changes))
    assert message in str(e.value)
    assert "tiny.yaml" in str(e.value)


@pytest.mark.parametrize(
    "combiner, message",
    [
        ({"backend": "merge", "options": {"method": "tie"}}, "unknown merge method 'tie'"),
        ({"backend": "merge", "options": {"method": "ties", "density": 0}}, "density"),
        ({"backend": "merge", "options": {"method": "uniform", "weights": [1, 2, 3]}}, "got 3 weights for 2 experts"),
        ({"backend": "ensemble", "options": {"poolin": "linear"}}, "poolin: unknown ensemble option"),
        ({"backend": "ensemble", "options": {"pooling": "geometric"}}, "pooling 'geometric'"),
        ({"backend": "route", "options": {"router": "arow"}}, "router 'arow'"),
        ({"backend": "route", "options": {"top_k": 3}}, "top_k"),
        (
            {"backend": "route", "options": {"target": "task_prior", "cv_folds": 1}},
            "cv_folds: expected an integer >= 2",
        ),
        (
            {"backend": "route", "options": {"decision": "utility", "target": "best_expert"}},
            "decision 'utility': needs router='learned' with",
        ),
        ({"backend": "ensemble", "members": ["cola-lora-r4-s0"]}, "members ['cola-lora-r4-s0'] are not experts"),
        ({"backend": "pe_ensemble", "options": {"kind": "mimo", "be_jitter": 0.1}}, "another kind"),
    ],
)
def test_bad_combiner_fails_in_dry_run_before_loading(tmp_path, no_loading, capsys, combiner, message):
    path = _recipe(tmp_path, combiners=[combiner])
    with pytest.raises(ConfigError) as e:
        plan(load_recipe(path), tmp_path / "out")
    assert message in str(e.value)
    assert cli.main(["run", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("adapterfuse run: error:") and "\n" not in err and message in err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, no_loading, capsys):
    path = _recipe(tmp_path)
    assert cli.main(["run", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "expert sst2-lora-r4-s0: train (24 examples" in out and "expert rte-lora-r4-s0: train (16 examples" in out
    assert "predictor ens: fit and evaluate" in out
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_one_row_per_expert_for_the_experts_baseline(tmp_path, no_loading):
    lines = plan(load_recipe(_recipe(tmp_path, harness={"baselines": ["zero_shot", "experts"]})), tmp_path / "out")
    rows = [line for line in lines if line.startswith("predictor ")]
    assert rows[:3] == [
        "predictor base zero-shot: fit and evaluate",
        "predictor expert sst2-lora-r4-s0: fit and evaluate",
        "predictor expert rte-lora-r4-s0: fit and evaluate",
    ]


def _text(line: str) -> str:
    """A run's log line without its ``[i/n]`` step number."""
    return re.sub(r"^\[\d+/\d+\] ", "", line)


@pytest.mark.slow
def test_run_writes_results_that_match_the_harness_and_resumes(tmp_path, glue_dir, tiny_base, monkeypatch):
    recipe = load_recipe(_recipe(tmp_path))
    out = tmp_path / "out"
    real_train = adapterfuse.train.expert.train_expert
    trained: list[str] = []

    def counting_train(base, task, config, **kwargs):
        trained.append(task)
        return real_train(base, task, config, **kwargs)

    monkeypatch.setattr(adapterfuse.train.expert, "train_expert", counting_train)

    def interrupt(line: str) -> None:  # stop the first run right after its first predictor is measured
        if _text(line).startswith("predictor base zero-shot: average"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, base=tiny_base, log=interrupt)
    assert trained == ["sst2", "rte"]
    assert not (out / "results.json").exists()

    lines: list[str] = []
    summary = run_recipe(recipe, out, base=tiny_base, log=lines.append)
    assert trained == ["sst2", "rte"], "finished experts must be reused, not retrained"
    assert "expert sst2-lora-r4-s0: reused" in map(_text, lines)
    assert any("base zero-shot: reused result" in x for x in lines)
    names = [r["predictor"] for r in summary["results"]]
    assert names == ["base zero-shot", "oracle", "merge uniform", "ens", "arrow", "be"]
    assert summary["results"][-1]["cost"]["forward_passes"] == 2  # K=2 members, one per task
    assert len(list((out / "pe").iterdir())) == 2

    # The written numbers are the harness's: recompute the merge on the same data and compare.
    written = json.loads((out / "results.json").read_text())["results"]
    library = ExpertLibrary.load(sorted((out / "experts").iterdir()), tiny_base.fingerprint)
    data = [load_task(t, 8, DATA_SEED, cap, 12) for t, cap in (("sst2", 24), ("rte", 16))]
    validation = {d.task.name: TaskData(d.task, [], d.validation[:8], []) for d in data}
    again = evaluate(MergeCombiner(tiny_base, MergeConfig(method="uniform")).fit(library, validation), data)
    mine = next(r for r in written if r["predictor"] == "merge uniform")
    for task in ("sst2", "rte"):
        assert mine["tasks"][task]["score"] == pytest.approx(again["tasks"][task]["score"], abs=1e-9)
    assert mine["average"] == pytest.approx(again["average"], abs=1e-9)
    md = (out / "results.md").read_text()
    assert f"{mine['average']:.3f}" in md and ("| ens |" in md or "| **ens** |" in md)
    for png in ("accuracy_vs_cost.png", "scores_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "predictors" / "merge_uniform" / "adapter_model.safetensors").is_file()

    # A third run measures nothing again; a changed combiner is re-measured alone.
    lines.clear()
    run_recipe(recipe, out, base=tiny_base, log=lines.append)
    assert sum("reused result" in x for x in lines) == 6
    changed = load_recipe(
        _recipe(tmp_path, combiners=[{"backend": "merge", "options": {"method": "task_arithmetic", "lam": 0.5}}])
    )
    lines.clear()
    run_recipe(changed, out, base=tiny_base, log=lines.append)
    texts = [_text(x) for x in lines]
    assert [x for x in texts if "reused result" not in x and x.startswith("predictor")] == [
        x for x in texts if x.startswith("predictor merge task_arithmetic")
    ]


def test_a_run_numbers_its_steps_on_stderr_and_says_nothing_when_quiet(tmp_path, glue_dir, tiny_base, capsys):
    recipe = load_recipe(_recipe(tmp_path, combiners=[{"backend": "merge", "options": {"method": "uniform"}}]))
    run_recipe(recipe, tmp_path / "normal", base=tiny_base)
    normal = capsys.readouterr()
    # tqdm clears its bars with carriage returns: a step line may follow one on the same line
    steps = re.findall(r"^\[(\d)/(\d)\] (.*)$", normal.err.replace("\r", "\n"), flags=re.M)
    # two experts, zero-shot, the oracle, one merge, the report: six steps, begun in order
    assert {total for _, total, _ in steps} == {"6"}
    assert sorted({int(i) for i, _, _ in steps}) == [1, 2, 3, 4, 5, 6]
    texts = [text for _, _, text in steps]
    assert "expert sst2-lora-r4-s0: training (24 examples, 1 epoch(s)) ..." in texts
    assert "predictor merge uniform: fitting ..." in texts
    assert any(t.startswith("predictor merge uniform: average") for t in texts)
    assert "train sst2" in normal.err  # the training bar
    assert normal.out == ""

    set_verbosity("quiet")
    try:
        run_recipe(recipe, tmp_path / "quiet", base=tiny_base)
    finally:
        set_verbosity("normal")
    quiet = capsys.readouterr()
    assert (quiet.out, quiet.err) == ("", "")
    assert (tmp_path / "quiet" / "results.json").is_file()


def test_a_reused_expert_trained_differently_is_refused(tmp_path, glue_dir, tiny_base):
    out = tmp_path / "out"
    run_recipe(load_recipe(_recipe(tmp_path, combiners=[], outputs={})), out, base=tiny_base, log=lambda _: None)
    other = _recipe(
        tmp_path, experts={"rank": 4, "max_train": 24, "epochs": 2.0, "train": TINY_TRAIN}, combiners=[], outputs={}
    )
    with pytest.raises(ConfigError, match=r"sst2-lora-r4-s0.*epochs=1.0, the recipe asks epochs=2.0"):
        run_recipe(load_recipe(other), out, base=tiny_base, log=lambda _: None)


def test_a_reused_expert_recording_another_task_is_refused(tmp_path, glue_dir, tiny_base):
    out = tmp_path / "out"
    recipe = load_recipe(_recipe(tmp_path, combiners=[], outputs={}))
    run_recipe(recipe, out, base=tiny_base, log=lambda _: None)
    folder = out / "experts" / "sst2-lora-r4-s0"
    meta = json.loads((folder / "adapterfuse.json").read_text())
    (folder / "adapterfuse.json").write_text(json.dumps({**meta, "task": "rte"}))
    (folder / "manifest.json").unlink()  # past the file hashes, to reach the task check
    with pytest.raises(ConfigError, match=r"sst2-lora-r4-s0.*records task 'rte', the recipe uses it for task 'sst2'"):
        run_recipe(recipe, out, base=tiny_base, log=lambda _: None)


def test_headers_tell_experts_of_different_bases_apart(tmp_path, glue_dir, tiny_base):
    out = tmp_path / "out"
    run_recipe(load_recipe(_recipe(tmp_path, combiners=[], outputs={})), out, base=tiny_base, log=lambda _: None)
    a, b = sorted((out / "experts").iterdir())
    copy = tmp_path / "copy"
    shutil.copytree(b, copy)
    meta = json.loads((copy / "adapterfuse.json").read_text())
    meta["base"]["fingerprint"] = "weights-sha256:" + "0" * 64
    (copy / "adapterfuse.json").write_text(json.dumps(meta))
    assert len(check_expert_headers([a, b])) == 2
    with pytest.raises(CompatibilityError, match="trained on different bases"):
        check_expert_headers([a, copy])


def test_pareto_front_keeps_points_nothing_beats():
    points = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (5.0, 0.7), (9.0, 0.9), (0.5, 0.1)]
    assert pareto_front(points) == [5, 0, 2, 4]


def test_merge_and_push_recipe_pushes_what_it_saved(tmp_path, glue_dir, tiny_base, monkeypatch, hub_online):
    from tests.fake_hub_server import FakeHub

    run_recipe(
        load_recipe(_recipe(tmp_path, combiners=[], outputs={})), tmp_path / "train", base=tiny_base, log=lambda _: None
    )
    experts = [str(p) for p in sorted((tmp_path / "train" / "experts").iterdir())]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_recipeTOKEN")
    with FakeHub(require_token="hf_recipeTOKEN") as hub:
        path = _recipe(
            tmp_path,
            experts={"paths": experts},
            harness={"validation_size": 8, "max_test": 12, "baselines": ["oracle"]},
            combiners=[{"backend": "merge", "name": "ties", "options": {"method": "ties", "lam": 1.0}}],
            outputs={
                "save": ["ties"],
                "push": [{"predictor": "ties", "repo_id": "alice/ties", "endpoint": hub.endpoint}],
            },
        )
        lines: list[str] = []
        summary = run_recipe(load_recipe(path), tmp_path / "push", base=tiny_base, log=lines.append)
        pushed = hub.files("alice/ties")
    saved = tmp_path / "push" / "predictors" / "ties"
    assert pushed["adapter_model.safetensors"] == (saved / "adapter_model.safetensors").read_bytes()
    assert any(_text(line).startswith("pushed ties to alice/ties") for line in lines)
    assert [r["predictor"] for r in summary["results"]] == ["oracle", "ties"]
    assert not (tmp_path / "push" / "experts").exists()  # given experts are used in place, none trained


def test_push_command_uploads_a_folder_and_refuses_a_missing_one(tmp_path, monkeypatch, capsys, hub_online):
    from tests.fake_hub_server import FakeHub

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_cliTOKEN")
    with FakeHub(require_token="hf_cliTOKEN") as hub:
        assert cli.main(["push", str(folder), "alice/x", "--endpoint", hub.endpoint, "--json"]) == 0
        assert hub.files("alice/x") == {"adapter_config.json": b'{"peft_type": "LORA"}'}
    assert json.loads(capsys.readouterr().out)["repo_id"] == "alice/x"
    assert cli.main(["push", str(tmp_path / "nope"), "alice/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "folder" in err and "nope" in err and "hf_cliTOKEN" not in err


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("recipes/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)  # the schema and every combiner's options, before any weight is read
    assert recipe.combiners and recipe.tasks
    assert set(recipe.outputs.save) <= {entry.label for entry in recipe.combiners}


def test_yaml_reads_on_as_a_key_and_only_true_false_as_booleans(tmp_path, no_loading):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\ntasks: {sst2: {}}\n"
        "combiners:\n  - {backend: route, options: {router: learned, on: fields, shape: true}}\n"
        "outputs: {plots: False}\n"
    )
    recipe = load_recipe(path)
    assert recipe.combiners[0].options == {"router": "learned", "on": "fields", "shape": True}
    assert recipe.outputs.plots is False
