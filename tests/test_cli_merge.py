"""``adapterfuse merge`` through cli_merge.register/run: end to end on a tiny base saved to a folder."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapterfuse import base as base_module
from adapterfuse.backends.merge.api import merge
from adapterfuse.base import load_base
from adapterfuse.cli.merge import register, run
from adapterfuse.errors import ConfigError, OutputExistsError
from adapterfuse.head import predict_proba
from adapterfuse.tasks.glue import get_task
from adapterfuse.train.expert import train_expert
from tests.helpers import make_tiny_model, plain_peft_model, tiny_config, tiny_data

TASK = get_task("sst2")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterfuse")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    return run(_parser().parse_args(["merge", "--json", *argv]))


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    """A tiny base saved as a model folder, and two experts trained on it as loaded from there."""
    root = tmp_path_factory.mktemp("cli_merge")
    folder = root / "tiny-base"
    make_tiny_model(tokenizer, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base = load_base(str(folder))
    data = tiny_data(root / "glue")
    experts = [
        train_expert(base, "sst2", tiny_config(rank=r, seed=r), out=root / f"e{r}", data=data, progress=False)
        for r in (2, 4)
    ]
    return base, folder, experts, data


def test_end_to_end_merge_with_lambda_search(setup, glue_dir, tmp_path, capsys):
    base, folder, experts, data = setup
    out = tmp_path / "merged"
    assert (
        _run(
            "--experts",
            *[str(e.path) for e in experts],
            "--method",
            "task_arithmetic",
            "--out",
            str(out),
            "--base",
            str(folder),
            "--tasks",
            "sst2",
            "--validation-size",
            "8",
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "task_arithmetic" and printed["out"] == str(out)
    assert printed["lambda"]["chosen"] in printed["lambda"]["grid"] and "truncation_error" in printed
    lam = printed["params"]["lambda"]
    assert lam == printed["lambda"]["chosen"]
    expected = merge(experts, method="task_arithmetic", lam=lam).predictor(base, autocast=False)
    p_saved = predict_proba(plain_peft_model(base.model, out), base.tokenizer, TASK, data.test, autocast=False)
    assert float((p_saved - expected.predict_proba(TASK, data.test)).abs().max()) <= 1e-5
    meta = json.loads((out / "adapterfuse.json").read_text())
    assert meta["search"]["lambda_search"]["tasks"] == ["sst2"] and len(meta["sources"]) == 2


def test_eval_puts_the_harness_table_in_the_card_and_metadata(setup, glue_dir, tmp_path, capsys):
    _, folder, experts, _ = setup
    out = tmp_path / "evaluated"
    assert (
        _run(
            "--experts",
            *[str(e.path) for e in experts],
            "--method",
            "uniform",
            "--out",
            str(out),
            "--base",
            str(folder),
            "--tasks",
            "sst2",
            "--validation-size",
            "8",
            "--eval",
            "--max-eval-examples",
            "6",
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    meta = json.loads((out / "adapterfuse.json").read_text())
    assert meta["evaluation"][0]["tasks"]["sst2"]["n"] == 6
    assert printed["average"] == pytest.approx(meta["evaluation"][0]["average"])
    assert "## Harness results" in (out / "README.md").read_text()
    with pytest.raises(ConfigError, match="--eval"):
        _run(
            "--experts", *[str(e.path) for e in experts], "--method", "uniform", "--out", str(tmp_path / "x"), "--eval"
        )
    assert not (tmp_path / "x").exists()


def test_full_model_with_weights_and_rank(setup, tmp_path, capsys):
    base, folder, experts, data = setup
    out = tmp_path / "full"
    assert (
        _run(
            "--experts",
            *[str(e.path) for e in experts],
            "--method",
            "ties",
            "--weights",
            "1,0.5",
            "--density",
            "0.5",
            "--lambda",
            "1.2",
            "--rank",
            "3",
            "--full",
            "--base",
            str(folder),
            "--out",
            str(out),
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["params"]["rank"] == 3 and printed["truncation_error"] > 0
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    merged = merge(experts, method="ties", weights=[1, 0.5], density=0.5, lam=1.2, rank=3)
    expected = merged.predictor(base, autocast=False)
    p_full = predict_proba(model, base.tokenizer, TASK, data.test, autocast=False)
    assert float((p_full - expected.predict_proba(TASK, data.test)).abs().max()) <= 1e-5


def test_learned_through_params(setup, glue_dir, tmp_path, capsys):
    _, folder, experts, _ = setup
    out = tmp_path / "learned"
    assert (
        _run(
            "--experts",
            *[str(e.path) for e in experts],
            "--method",
            "learned",
            "--param",
            "mode=gradient_free",
            "--param",
            "steps=5",
            "--base",
            str(folder),
            "--tasks",
            "sst2",
            "--validation-size",
            "8",
            "--out",
            str(out),
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["learned"]["weights"]) == {"e2", "e4"} and printed["params"]["mode"] == "gradient_free"
    assert printed["learned"]["loss"] <= printed["learned"]["loss_uniform"]


BAD = [
    (ConfigError, "2 weights for 3", ["--weights", "1,2"], 3),
    (ConfigError, "--weights", ["--weights", "1,x"], 2),
    (ConfigError, "weights", ["--method", "uniform", "--weights", "1,nan"], 2),
    (ConfigError, "density", ["--density", "1.5"], 2),
    (ConfigError, "unknown merge method", ["--method", "average"], 2),
    (ConfigError, "KEY=VALUE", ["--param", "exact_svd"], 2),
    (ConfigError, "densty", ["--param", "densty=0.1"], 2),
    (ConfigError, "--tasks", ["--method", "greedy_soup", "--base", "x"], 2),
]


@pytest.mark.parametrize(("error", "match", "extra", "n"), BAD, ids=[b[1] for b in BAD])
def test_bad_arguments_fail_before_loading_anything(setup, tmp_path, monkeypatch, error, match, extra, n):
    _, _, experts, _ = setup

    def no_base(*args, **kwargs):
        raise AssertionError("the base must not be loaded for bad arguments")

    monkeypatch.setattr(base_module, "load_base", no_base)
    paths = [str(experts[i % 2].path) for i in range(n)]
    with pytest.raises(error, match=match):
        _run("--experts", *paths, "--out", str(tmp_path / "out"), *extra)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(setup, tmp_path):
    _, _, experts, _ = setup
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="overwrite"):
        _run("--experts", str(experts[0].path), "--method", "uniform", "--out", str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []
    assert (
        _run("--experts", str(experts[0].path), "--method", "uniform", "--out", str(tmp_path / "out"), "--overwrite")
        == 0
    )
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
