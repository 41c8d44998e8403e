"""Merge faults: overflow, NaN validation scores, validation overlapping the test split, expert order.

Each case asserts a one-line error (or the right behaviour) and that nothing was written.
"""

from __future__ import annotations

import argparse
import math
import shutil

import pytest
import torch
import yaml

import adapterfuse.recipe.runner as runner
import adapterfuse.train.expert
from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.backends.merge.api import merge
from adapterfuse.backends.merge.lambda_search import choose_lambda, edge_note
from adapterfuse.backends.merge.soup import greedy_select, soup_order
from adapterfuse.backends.route.api import route
from adapterfuse.base import wrap_base
from adapterfuse.cli.merge import register, run
from adapterfuse.errors import ConfigError
from adapterfuse.recipe.schema import load_recipe
from adapterfuse.tasks.spec import TaskData, check_disjoint
from tests.helpers import make_tiny_model, random_expert, tiny_data


@pytest.fixture(scope="module")
def experts(tiny_base):
    """Three synthetic experts on tiny_base (no training needed), of ranks 4, 2 and 3."""
    return [random_expert(tiny_base, f"e{i}", rank=r, seed=i, task="sst2") for i, r in enumerate((4, 2, 3))]


@pytest.fixture(scope="module")
def big(tiny_base):
    """Two synthetic experts whose ΔW entries reach about 100: weights near 3e38 overflow float32."""
    return [random_expert(tiny_base, f"big{i}", rank=4, seed=10 + i, scale=1e3) for i in range(2)]


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory):
    """sst2 data whose validation holds 3 copies of test inputs (under other indices and labels)."""
    data = tiny_data(tmp_path_factory.mktemp("overlap") / "glue")
    leaked = [type(e)(e.fields, 1 - e.label, 10_000 + i) for i, e in enumerate(data.test[:3])]
    return TaskData(data.task, [], [*data.validation, *leaked], data.test)


def _no_debris(parent) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], "a temp folder was left"


def test_overflowing_weights_are_refused_per_module_and_nothing_is_written(big):
    with pytest.raises(ConfigError, match=r"module 'model\.layers\.0\..*NaN/inf.*float32.*smaller weights"):
        merge(big, method="task_arithmetic", weights=[3e38, 3e38])
    with pytest.raises(ConfigError, match=r"module .*NaN/inf.*smaller weights or lambda") as err:
        merge(big, method="ties", lam=1e38, density=0.5)  # before the SVD (a LinAlgError before)
    assert "\n" not in str(err.value)


def test_cli_overflow_with_full_writes_nothing(tokenizer, big, tmp_path):
    folder = tmp_path / "base"
    make_tiny_model(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    paths = [e.save(tmp_path / e.name) for e in big]
    parser = argparse.ArgumentParser(prog="adapterfuse")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "outs" / "merged"
    argv = ["merge", "--experts", *map(str, paths), "--method", "task_arithmetic", "--weights", "3e38,3e38"]
    with pytest.raises(ConfigError, match="NaN/inf"):
        run(parser.parse_args([*argv, "--out", str(out), "--full", "--base", str(folder)]))
    assert not out.exists() and not out.parent.exists()


def test_full_model_overflowing_a_half_precision_base_is_refused(tokenizer, tmp_path):
    half = wrap_base(make_tiny_model(tokenizer, seed=0).half(), tokenizer, "tiny-half")
    expert = random_expert(half, "big", rank=2, modules=["model.layers.0.self_attn.q_proj"], seed=0)
    scale = 1e6 / float(expert.deltas["model.layers.0.self_attn.q_proj"].dense().abs().max())
    merged = merge([expert], method="task_arithmetic", weights=[scale])  # finite in float32, inf in float16
    out = tmp_path / "full"
    with pytest.raises(ConfigError, match=r"weight 'model\.layers\.0\.self_attn\.q_proj\.weight' \(torch\.float16\)"):
        merged.save_pretrained(out, full=True, base=half)
    assert not out.exists()
    _no_debris(tmp_path)
    merged.save_pretrained(out)  # the adapter itself is finite, in float32
    assert out.is_dir()


def test_lambda_grid_that_overflows_is_refused(tiny_base, big, tmp_path):
    data = tiny_data(tmp_path / "glue")
    with pytest.raises(ConfigError, match=r"at lambda 1e\+38 has \d+ NaN/inf"):
        merge(big, method="task_arithmetic", base=tiny_base, validation=[data], lambda_grid=[1.0, 1e38])


def test_a_nan_score_never_wins_the_lambda_search():
    nan = math.nan
    assert choose_lambda([0.5, 1.0, 1.5], [nan, 0.2, 0.1]) == 1
    assert choose_lambda([0.5, 1.0, 1.5], [0.3, nan, 0.3]) == 0  # the tie goes to the smaller λ, NaN skipped
    with pytest.raises(ConfigError, match=r"every grid point \[0\.5, 1\.0\] scored NaN"):
        choose_lambda([0.5, 1.0], [nan, nan])


def test_a_lambda_chosen_at_the_grid_end_while_still_improving_is_noted():
    grid = [0.25, 0.5, 1.0, 1.5]
    note = edge_note(grid, [0.38, 0.40, 0.50, 0.54], 3)
    assert "chose λ = 1.5, the largest" in note and "0.5000 -> 0.5400" in note and "reaching above 1.5" in note
    falling = edge_note(grid, [0.6, 0.5, 0.4, 0.3], 0)
    assert "the smallest" in falling and "below 0.25" in falling
    assert edge_note(grid, [0.38, 0.55, 0.50, 0.54], 1) is None  # inside the grid
    assert edge_note(grid, [0.38, 0.40, 0.54, 0.54], 3) is None  # tied with its neighbour: no trend
    assert edge_note([1.0], [0.5], 0) is None
    assert "the largest" in edge_note([1.5, 0.5, 1.0], [0.6, 0.4, 0.5], 0)  # grid order does not matter


def test_a_nan_candidate_never_wins_the_greedy_soup():
    alone = {"nan": math.nan, "b": 0.4, "a": 0.6}
    order = soup_order(alone)
    assert order == ["a", "b", "nan"]
    tried = []

    def score_with(names):
        tried.append(names)
        return 0.7

    kept, records, final = greedy_select(order, alone, score_with)
    assert kept == ["a", "b"] and final == 0.7 and tried == [["a", "b"]]
    assert records[-1] == {"name": "nan", "alone": alone["nan"], "with": None, "kept": False}
    with pytest.raises(ConfigError, match=r"every candidate .* scored NaN alone"):
        greedy_select(soup_order({"x": math.nan, "y": math.nan}), {"x": math.nan, "y": math.nan}, score_with)


def test_validation_overlapping_the_test_split_is_refused_everywhere(tiny_base, experts, overlapping, tmp_path):
    line = r"validation: 3 of \d+ validation examples of task sst2 also appear in its test split"
    with pytest.raises(ConfigError, match=line):
        check_disjoint([overlapping])
    for method in ("task_arithmetic", "greedy_soup", "learned"):  # the λ search, the soup, learned weights
        with pytest.raises(ConfigError, match=line):
            merge(experts, method=method, base=tiny_base, validation=[overlapping])
    with pytest.raises(ConfigError, match=line):
        ensemble(experts, tiny_base, weights="learned", validation=[overlapping])
    with pytest.raises(ConfigError, match=line):
        route(experts, tiny_base, router="learned", validation=[overlapping])
    clean = TaskData(overlapping.task, [], overlapping.validation[:-3], overlapping.test)
    check_disjoint([clean])  # the same data without the copies passes


def _folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _saved_bytes(adapter, folder) -> dict[str, bytes]:
    """The bytes of ``adapter`` saved to ``folder``, which is then removed (the card names its folder, so
    outputs compared byte for byte are saved to the same path)."""
    found = _folder_bytes(adapter.save_pretrained(folder))
    shutil.rmtree(folder)
    return found


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "uniform"])
def test_merge_bytes_do_not_depend_on_the_order_of_the_experts(experts, method, tmp_path):
    weights = [1.0, 0.5, 2.0]
    a = merge(experts, method=method, weights=weights, seed=1)
    b = merge(experts[::-1], method=method, weights=weights[::-1], seed=1)
    assert [s["name"] for s in a.sources] == [s["name"] for s in b.sources]
    for module in a.deltas:
        assert torch.equal(a.deltas[module].A, b.deltas[module].A) and torch.equal(
            a.deltas[module].B, b.deltas[module].B
        )
    assert _saved_bytes(a, tmp_path / "out") == _saved_bytes(b, tmp_path / "out")


def test_expert_folders_in_two_orders_give_the_same_bytes(experts, tmp_path):
    paths = [e.save(tmp_path / "experts" / e.name) for e in experts]
    one = _saved_bytes(merge(paths, method="ties", density=0.5), tmp_path / "out")
    two = _saved_bytes(merge([paths[2], paths[0], paths[1]], method="ties", density=0.5), tmp_path / "out")
    assert one == two


def test_a_recipe_whose_validation_overlaps_the_test_split_stops_before_training(
    tmp_path, glue_dir, tiny_base, monkeypatch
):
    real_load = runner.load_task

    def leaky_load(*args, **kwargs):  # a carve that put two test rows into validation
        data = real_load(*args, **kwargs)
        return TaskData(data.task, data.train, [*data.test[:2], *data.validation], data.test)

    def refuse(*args, **kwargs):
        raise AssertionError("an expert was trained")

    monkeypatch.setattr(runner, "load_task", leaky_load)
    monkeypatch.setattr(adapterfuse.train.expert, "train_expert", refuse)
    raw = {
        "name": "leak",
        "tasks": {"sst2": {}},
        "experts": {"rank": 4, "max_train": 16, "epochs": 1.0},
        "harness": {"validation_size": 8, "validation_per_task": 8, "max_test": 12},
        "combiners": [{"backend": "merge", "options": {"method": "uniform"}}],
    }
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"validation: 2 of 8 validation examples of task sst2 also appear"):
        runner.run_recipe(load_recipe(path), tmp_path / "out", base=tiny_base, log=lambda line: None)
