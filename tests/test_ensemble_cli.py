"""``adapterfuse ensemble`` through a parser built here (cli.py wires ``register`` in separately)."""

from __future__ import annotations

import argparse
import json

import pytest

from adapterfuse.backends.ensemble.predictor import EnsemblePredictor
from adapterfuse.base import load_base
from adapterfuse.cli.ensemble import register, run
from adapterfuse.errors import CompatibilityError, ConfigError, OutputExistsError
from tests.helpers import make_tiny_model, random_expert


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("ens-cli")
    folder = root / "tiny"
    make_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base = load_base(str(folder))
    paths = []
    for i in range(3):
        expert = random_expert(base, f"e{i}", rank=2 + i, seed=i, scale=2.0, task="sst2")
        paths.append(expert.save(root / "experts" / f"e{i}"))
    return folder, paths, base


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterfuse")
    register(p.add_subparsers(dest="command", required=True))
    return p


def argv(setup, out, *extra: str) -> list[str]:
    folder, paths, _ = setup
    return [
        "ensemble",
        "--experts",
        *map(str, paths),
        "--tasks",
        "sst2,stsb",
        "--out",
        str(out),
        "--base",
        str(folder),
        "--validation-size",
        "10",
        "--max-eval-examples",
        "6",
        "--no-autocast",
        *extra,
    ]


def test_fits_evaluates_prints_the_table_and_saves(setup, tmp_path, glue_dir, capsys):
    out = tmp_path / "ens"
    args = parser().parse_args(argv(setup, out, "--pooling", "linear", "--weights", "learned", "--select", "top2"))
    assert args.handler is run and run(args) == 0
    printed = capsys.readouterr().out
    assert "| ensemble linear K=2 top2+learned |" in printed and "sst2 accuracy" in printed
    assert "stsb pearson" in printed and f"saved {out}" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["tasks"]["sst2"]["n"] == 6 and result["cost"]["forward_passes"] == 2.0
    loaded = EnsemblePredictor.load(out, setup[2])
    assert loaded.pooling == "linear" and len(loaded.names) == 2
    assert loaded.info["selection"]["method"] == "top2"


def test_given_weights_and_overwrite(setup, tmp_path, glue_dir, capsys):
    out = tmp_path / "ens"
    assert run(parser().parse_args(argv(setup, out, "--weights", "0.5,0.25,0.25"))) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["weights"] == [0.5, 0.25, 0.25]
    with pytest.raises(OutputExistsError, match="already exists"):
        run(parser().parse_args(argv(setup, out)))
    assert run(parser().parse_args(argv(setup, out, "--overwrite", "--select", "greedy"))) == 0
    assert "greedy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,error,fragment",
    [
        (["--weights", "0.5,0.5"], ConfigError, "got 2 weights for 3 members"),
        (["--weights", "heavy"], ConfigError, "comma-separated numbers"),
        (["--select", "top0"], ConfigError, "expected 'greedy' or 'topK'"),
        (["--weights", "1,nan,1"], ConfigError, "'e1' is nan"),
    ],
)
def test_bad_arguments_fail_before_the_base_is_loaded(setup, tmp_path, glue_dir, monkeypatch, extra, error, fragment):
    monkeypatch.setattr("adapterfuse.base.load_base", lambda *a, **k: pytest.fail("base loaded before validation"))
    with pytest.raises(error, match=fragment):
        run(parser().parse_args(argv(setup, tmp_path / "ens", *extra)))
    assert not (tmp_path / "ens").exists()


def test_experts_of_another_base_are_refused(setup, tmp_path, glue_dir, other_base):
    stranger = random_expert(other_base, "stranger", rank=2).save(tmp_path / "stranger")
    args = parser().parse_args(argv(setup, tmp_path / "ens"))
    args.experts.append(stranger)
    with pytest.raises(CompatibilityError, match="stranger"):
        run(args)


def test_a_bad_option_is_refused_by_the_config_model(setup, tmp_path):
    with pytest.raises(ConfigError, match="pooling 'mean': unknown; expected one of linear, log_linear"):
        run(parser().parse_args(argv(setup, tmp_path / "x", "--pooling", "mean")))
    assert not (tmp_path / "x").exists()
