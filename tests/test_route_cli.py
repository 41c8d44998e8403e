"""``adapterfuse route`` through a parser built here (cli.py wires ``register`` in separately)."""

from __future__ import annotations

import argparse
import json

import pytest

from adapterfuse.backends.route.predictor import ArrowPredictor, RoutePredictor
from adapterfuse.base import load_base
from adapterfuse.cli.route import register, run
from adapterfuse.errors import CompatibilityError, ConfigError, OutputExistsError
from tests.helpers import make_tiny_model, random_expert


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory, other_base):
    root = tmp_path_factory.mktemp("route-cli")
    folder = root / "tiny"
    make_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base = load_base(str(folder))
    paths = [
        random_expert(base, f"e{i}", rank=2 + i, seed=i, scale=2.0, task=t).save(root / "experts" / f"e{i}")
        for i, t in enumerate(("sst2", "stsb", "rte"))
    ]
    stranger = random_expert(other_base, "stranger", rank=2, task="sst2").save(root / "stranger")
    return folder, paths, base, stranger


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterfuse")
    register(p.add_subparsers(dest="command", required=True))
    return p


def argv(setup, out, *extra: str) -> list[str]:
    folder, paths, _, _ = setup
    return [
        "route",
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


@pytest.mark.slow
def test_fits_evaluates_prints_and_saves(setup, tmp_path, glue_dir, capsys):
    out = tmp_path / "r"
    args = parser().parse_args(
        argv(
            setup,
            out,
            "--router",
            "learned",
            "--top-k",
            "2",
            "--on",
            "fields",
            "--eval-tasks",
            "rte",
            "--layer",
            "1",
            "--readout",
            "mean_last",
        )
    )
    assert args.handler is run and run(args) == 0
    printed = capsys.readouterr().out
    assert "| route learned top2 ensemble (fields) |" in printed and "rte accuracy" in printed
    assert "routing accuracy against the oracle (test):" in printed and f"saved {out}" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["tasks"]["rte"]["n"] == 6 and result["routing_accuracy"]["tasks"]["rte"]["oracle"] is not None
    loaded = RoutePredictor.load(out, setup[2])
    assert isinstance(loaded, RoutePredictor) and loaded.top_k == 2 and loaded.on == "fields"
    assert loaded.extractor.readout == "mean_last"


def test_arrow_and_overwrite(setup, tmp_path, glue_dir, capsys):
    out = tmp_path / "r"
    assert run(parser().parse_args(argv(setup, out, "--router", "arrow", "--top-k", "2"))) == 0
    assert isinstance(RoutePredictor.load(out, setup[2]), ArrowPredictor)
    with pytest.raises(OutputExistsError, match="already exists"):
        run(parser().parse_args(argv(setup, out, "--router", "arrow")))
    assert run(parser().parse_args(argv(setup, out, "--router", "clustered", "--clusters", "2", "--overwrite"))) == 0


def test_clear_errors(setup, tmp_path, glue_dir):
    with pytest.raises(ConfigError, match="top_k: 4 is larger"):
        run(parser().parse_args(argv(setup, tmp_path / "r", "--top-k", "4")))
    with pytest.raises(ConfigError, match="mbc_clusters"):
        run(parser().parse_args(argv(setup, tmp_path / "r", "--router", "mbc")))
    with pytest.raises(ConfigError, match="prior_weight: expected a number >= 0"):
        run(parser().parse_args(argv(setup, tmp_path / "r", "--target", "task_prior", "--prior-weight", "-1")))
    with pytest.raises(ConfigError, match="decision 'utility': needs router='learned' with target='task'"):
        run(parser().parse_args(argv(setup, tmp_path / "r", "--decision", "utility", "--target", "best_expert")))
    folder, paths, _, stranger = setup
    args = parser().parse_args(
        [
            "route",
            "--experts",
            str(paths[0]),
            str(stranger),
            "--tasks",
            "sst2",
            "--out",
            str(tmp_path / "r"),
            "--base",
            str(folder),
        ]
    )
    with pytest.raises(CompatibilityError, match="base fingerprint"):
        run(args)
    assert not (tmp_path / "r").exists()
