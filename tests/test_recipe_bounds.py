"""Nonsense recipe values fail in ``--dry-run``, with the bounds the API uses, and a recipe name cannot leave runs/."""

from __future__ import annotations

from pathlib import Path

import pytest

import adapterfuse.base
import adapterfuse.train.expert
from adapterfuse import cli
from adapterfuse.backends.options import MAX_SEED, validate_options
from adapterfuse.backends.route.config import RouteConfig
from adapterfuse.errors import ConfigError
from adapterfuse.recipe.runner import run_recipe
from adapterfuse.recipe.schema import load_recipe
from adapterfuse.train.config import TrainConfig
from adapterfuse.train.pe.options import check_kind
from tests.helpers import make_tiny_model

HEAD = "tasks: {sst2: {}, rte: {}}\nexperts: {rank: 4}\n"


@pytest.fixture(scope="module")
def base_folder(tokenizer, tmp_path_factory) -> Path:
    """A 2-block base saved as a model folder: its config is readable without loading it."""
    folder = tmp_path_factory.mktemp("bounds") / "tiny-base"
    make_tiny_model(tokenizer).save_pretrained(folder)
    return folder


def _combiner(backend: str, options: str) -> str:
    return f"name: tiny\n{HEAD}combiners: [{{backend: {backend}, options: {{{options}}}}}]\n"


CASES = {
    "route clusters 0": (
        _combiner("route", "router: clustered, clusters: 0"),
        "clusters: expected an integer >= 1, got 0",
    ),
    "route temperature nan": (
        _combiner("route", "router: arrow, temperature: .nan"),
        "temperature: expected a finite number, got nan",
    ),
    "merge batch_size 0": (
        _combiner("merge", "method: uniform, batch_size: 0"),
        "batch_size: expected an integer >= 1",
    ),
    "train batch_size 0": (
        "name: tiny\ntasks: {sst2: {}}\nexperts: {train: {batch_size: 0}}\n",
        "experts.train.batch_size: Input should be greater than or equal to 1 (got 0)",
    ),
    "lambda_grid nan": (
        _combiner("merge", "method: ties, lambda_grid: [.nan]"),
        "lambda_grid: expected a finite number, got nan",
    ),
    "members 100000": (
        _combiner("pe_ensemble", "kind: batchensemble, members: 100000"),
        "combiner 'pe_ensemble batchensemble': members: expected an integer <= 64, got 100000",
    ),
    "seeds 1e23": ("name: tiny\ntasks: {sst2: {}}\nexperts: {seeds: [1e23]}\n", "experts.seeds.0: Input should be"),
    "seeds 10**23": (
        "name: tiny\ntasks: {sst2: {}}\nexperts: {seeds: [100000000000000000000000]}\n",
        f"experts.seeds: expected distinct seeds in 0 .. {MAX_SEED}",
    ),
    "route seed -1": (_combiner("route", "seed: -1"), "seed: expected an integer >= 0, got -1"),
    "ensemble seed 2**40": (_combiner("ensemble", f"seed: {2**40}"), f"seed: expected an integer <= {MAX_SEED}"),
    "train weight_decay inf": (
        "name: tiny\ntasks: {sst2: {}}\nexperts: {train: {weight_decay: .inf}}\n",
        "experts.train.weight_decay: Input should be a finite number (got inf)",
    ),
    "task epochs nan": ("name: tiny\ntasks: {sst2: {epochs: .nan}}\n", "tasks.sst2.epochs: Input should be a finite"),
    "name ../../escape": (
        f"name: ../../escape\n{HEAD}",
        "name: a recipe's name is its run folder under runs/, so it must be a plain file name",
    ),
    "name /abs": (f"name: /tmp/abs\n{HEAD}", "must be a plain file name"),
    "combiner name ..": (
        f"name: tiny\n{HEAD}combiners: [{{backend: merge, name: '..', options: {{method: uniform}}}}]\n",
        "a combiner's name must not start with '.'",
    ),
}


@pytest.mark.parametrize("text, message", list(CASES.values()), ids=list(CASES))
def test_nonsense_recipe_values_fail_in_dry_run(tmp_path, no_loading, capsys, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)  # the default run folder is runs/NAME under the working directory
    (tmp_path / "work").mkdir()
    path = tmp_path / "work" / "recipe.yaml"
    path.write_text(text)
    assert cli.main(["run", str(path), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("adapterfuse run: error:") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["recipe.yaml", "work"]  # nothing written anywhere


def test_a_route_layer_beyond_a_local_base_fails_in_dry_run(tmp_path, no_loading, capsys, base_folder):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"name: tiny\nbase: {base_folder}\n{HEAD}combiners: [{{backend: route, options: {{layer: 1000}}}}]\n"
    )
    assert cli.main(["run", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    expected = "combiner 'route': layer 1000: out of range for a base with 2 blocks; expected -3 .. 2"
    assert expected in err and err.count("\n") == 1
    path.write_text(f"name: tiny\nbase: {base_folder}\n{HEAD}combiners: [{{backend: route, options: {{layer: -3}}}}]\n")
    assert cli.main(["run", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out").exists()


def test_a_route_layer_beyond_the_loaded_base_fails_before_any_training(tmp_path, tiny_base, monkeypatch):
    """Without a readable base config the layer is checked as soon as the base is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("an expert was trained before the recipe was checked")

    monkeypatch.setattr(adapterfuse.train.expert, "train_expert", refuse)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: tiny\n{HEAD}combiners: [{{backend: route, options: {{layer: 1000}}}}]\n")
    with pytest.raises(ConfigError, match=r"combiner 'route': layer 1000: out of range for a base with 2 blocks"):
        run_recipe(load_recipe(path), tmp_path / "out", base=tiny_base)
    assert not (tmp_path / "out" / "experts").exists()


def test_the_api_refuses_the_same_values():
    with pytest.raises(ConfigError, match="clusters: expected an integer >= 1, got 0"):
        validate_options(RouteConfig, {"router": "clustered", "clusters": 0}, "route")
    with pytest.raises(ConfigError, match="seed: expected an integer >= 0, got -1"):
        validate_options(RouteConfig, {"seed": -1}, "route")
    with pytest.raises(ConfigError, match="members: expected an integer <= 64, got 100000"):
        check_kind("batchensemble", 100000)
    with pytest.raises(ValueError, match="less than or equal to 4294967295"):
        TrainConfig(seed=MAX_SEED + 1)
    with pytest.raises(ValueError, match="finite number"):
        TrainConfig(grad_clip=float("inf"))
