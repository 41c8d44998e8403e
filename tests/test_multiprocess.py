"""Evaluation and fitting split over two CPU processes (``accelerate launch``, as docs/cli.md gives it) answer
as one process does: the same scores, one printed result, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adapterfuse.base import load_base
from adapterfuse.cli.main import main
from adapterfuse.recipe.runner import run_recipe
from adapterfuse.recipe.schema import load_recipe
from adapterfuse.train.expert import train_expert
from tests.helpers import make_tiny_model, tiny_config, tiny_data

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# The CPU command of docs/cli.md ("Several processes"): --multi_gpu is what starts N processes, GPUs or not.
LAUNCH = ["-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2"]
QUIET = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # accelerate's defaults
TASKS = ("sst2", "stsb")  # STS-B's correlations change if any row is lost or out of order


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    make_tiny_model(tokenizer, seed=0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = load_base(str(root / "base"), device="cpu")
    config = tiny_config(max_train_examples=24)
    for task in TASKS:
        data = tiny_data(root / "glue", task, config)
        train_expert(base, task, config, out=root / task, data=data, progress=False)
    return root


def _launch(args: list[str], glue: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLUE_DIR": str(glue), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *LAUNCH, *QUIET, "-m", "adapterfuse.cli", *args]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _scores(result: dict) -> dict[str, float]:
    timing = ("seconds", "examples_per_s")
    return {f"{t} {k}": v for t, m in result["tasks"].items() for k, v in m.items() if k not in timing}


def test_eval_on_two_processes_scores_as_one_and_prints_once(setup, monkeypatch, capsys):
    root = setup
    args = ["eval", "--base", str(root / "base"), "--experts", *(str(root / t) for t in TASKS), "--tasks", "sst2,stsb"]
    args += ["--validation-size", "8", "--device", "cpu", "--out"]
    done = _launch([*args, str(root / "two.json")], root / "glue", root)
    assert done.stdout.count("| oracle |") == 1  # the table, once
    monkeypatch.setenv("GLUE_DIR", str(root / "glue"))
    assert main([*args, str(root / "one.json")]) == 0
    one, two = (json.loads((root / f"{n}.json").read_text()) for n in ("one", "two"))
    assert _scores(two) == pytest.approx(_scores(one), abs=1e-6)
    assert two["tasks"]["stsb"]["n"] == 20 and capsys.readouterr().out.count("| oracle |") == 1


def test_recipe_fits_and_evaluates_on_two_processes_as_on_one(setup, monkeypatch):
    root = setup
    raw = {
        "name": "mp",
        "base": str(root / "base"),
        "device": "cpu",
        "tasks": {t: {} for t in TASKS},
        "experts": {"paths": [str(root / t) for t in TASKS]},
        "harness": {"validation_size": 8, "validation_per_task": 8, "baselines": ["zero_shot"]},
        "combiners": [
            {"backend": "merge", "options": {"method": "ties"}},  # λ searched on validation
            {"backend": "ensemble", "options": {"pooling": "linear", "weights": "learned"}},
            {"backend": "route", "options": {"router": "learned", "top_k": 1}},
        ],
        "outputs": {"plots": False},
    }
    (root / "mp.yaml").write_text(yaml.safe_dump(raw))
    _launch(["run", str(root / "mp.yaml"), "--out", str(root / "run-two")], root / "glue", root)
    monkeypatch.setenv("GLUE_DIR", str(root / "glue"))
    one = run_recipe(load_recipe(root / "mp.yaml"), root / "run-one", log=lambda line: None)
    two = json.loads((root / "run-two" / "results.json").read_text())
    assert [r["predictor"] for r in two["results"]] == [r["predictor"] for r in one["results"]]
    for a, b in zip(one["results"], two["results"], strict=True):
        # Each process scores its share in batches of other shapes, so fp32 sums differ in the last bits;
        # a fit on them (the learned ensemble weights) can carry that to the 6th decimal of a correlation.
        assert _scores(b) == pytest.approx(_scores(a), abs=1e-5), a["predictor"]
    lines = (root / "run-two" / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(one["results"])  # one writer: each predictor's line once
