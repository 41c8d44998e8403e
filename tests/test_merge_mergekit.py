"""mergekit YAML configs naming LoRA adapters: the same adapter as the equivalent merge, and clear refusals."""

from __future__ import annotations

import argparse
import shutil

import pytest
import yaml

from adapterfuse.backends.merge.api import merge
from adapterfuse.backends.merge.mergekit_yaml import merge_mergekit, read_mergekit
from adapterfuse.cli.merge import register, run
from adapterfuse.errors import ConfigError
from tests.helpers import random_expert

BASE = "tiny-llama-0"


@pytest.fixture(scope="module")
def paths(tiny_base, tmp_path_factory):
    """Three synthetic LoRA adapters on tiny_base, saved as folders (ranks 4, 2, 3)."""
    root = tmp_path_factory.mktemp("mergekit")
    experts = [random_expert(tiny_base, f"a{i}", rank=r, seed=i) for i, r in enumerate((4, 2, 3))]
    return [str(e.save(root / e.name)) for e in experts]


def _write(tmp_path, content: dict, name: str = "merge.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def _models(paths, *params: dict) -> list[dict]:
    return [{"model": p, "parameters": q} for p, q in zip(paths, params, strict=True)]


def _bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


CASES = {
    "linear": (
        {"merge_method": "linear", "dtype": "float16"},
        [{"weight": 1.0}, {"weight": 3.0}],
        dict(method="uniform", weights=[1.0, 3.0]),
    ),
    "task_arithmetic": (
        {"merge_method": "task_arithmetic", "base_model": BASE, "parameters": {"lambda": 0.8}},
        [{"weight": 1.0}, {"weight": -0.5}],
        dict(method="task_arithmetic", weights=[1.0, -0.5], lam=0.8),
    ),
    "task_arithmetic_normalized": (
        {"merge_method": "task_arithmetic", "parameters": {"normalize": True}},
        [{"weight": 1.0}, {"weight": 3.0}],
        dict(method="task_arithmetic", weights=[0.25, 0.75]),
    ),
    "ties": (
        {"merge_method": "ties", "base_model": BASE, "parameters": {"density": 0.5, "int8_mask": True, "rank": 6}},
        [{"weight": 0.7}, {"weight": 0.7}],
        dict(method="ties", density=0.5, rank=6),
    ),
    "dare_ties": (
        {"merge_method": "dare_ties", "parameters": {"normalize": True, "seed": 2}},
        [{"weight": 1.0, "density": 0.6}, {"weight": 1.0, "density": 0.6}],
        dict(method="dare_ties", density=0.6, seed=2),
    ),
    "dare_linear": (
        {"merge_method": "dare_linear", "parameters": {"weight": 0.5, "density": 0.8}},
        [{"weight": 1.0}, {}],
        dict(method="dare_linear", weights=[1.0, 0.5], density=0.8),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mergekit_yaml_gives_the_same_adapter_as_the_equivalent_merge(paths, tmp_path, case):
    top, params, equivalent = CASES[case]
    path = _write(tmp_path, {**top, "models": _models(paths[:2], *params)})
    plan = read_mergekit(path)
    assert plan.experts == paths[:2] and plan.config.method == equivalent["method"]
    ours = _bytes(merge_mergekit(path).save_pretrained(tmp_path / "out"))  # one path: the card names it
    shutil.rmtree(tmp_path / "out")
    theirs = _bytes(merge(paths[:2], **equivalent).save_pretrained(tmp_path / "out"))
    assert ours == theirs


def test_density_defaults_to_one_as_in_mergekit_and_the_base_entry_is_skipped(paths, tmp_path):
    models = [{"model": BASE}, {"model": f"{BASE}+{paths[0]}", "parameters": {"weight": 2.0}}]
    plan = read_mergekit({"merge_method": "ties", "base_model": BASE, "models": models})
    assert plan.experts == [paths[0]] and plan.base_model == BASE
    assert plan.config.params.density == 1.0 and plan.config.params.weights == (1.0,)


def test_cli_config_gives_the_same_bytes_as_the_flags(paths, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="adapterfuse")
    register(parser.add_subparsers(dest="command", required=True))
    models = _models(paths, {"weight": 1.0}, {"weight": 1.0}, {"weight": 1.0})
    path = _write(
        tmp_path, {"merge_method": "ties", "parameters": {"density": 0.3, "exact_svd": True}, "models": models}
    )
    assert run(parser.parse_args(["merge", "--config", str(path), "--out", str(tmp_path / "a")])) == 0
    from_yaml = _bytes(tmp_path / "a")  # compared at one path: the card names the folder
    flags = ["--experts", *paths, "--method", "ties", "--density", "0.3", "--param", "exact_svd=true"]
    assert run(parser.parse_args(["merge", *flags, "--out", str(tmp_path / "a"), "--overwrite"])) == 0
    assert from_yaml == _bytes(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"--config: .*drop --density"):
        run(parser.parse_args(["merge", "--config", str(path), "--density", "0.5", "--out", str(tmp_path / "c")]))
    assert not (tmp_path / "c").exists()


MISSING = ["no/such/adapter-1", "no/such/adapter-2"]  # refusals come before any adapter is looked at
REFUSED = {
    "unknown top-level key": (
        {"merge_method": "ties", "mergemethod": "ties"},
        r"mergemethod: unknown key; expected one of merge_method, models",
    ),
    "unknown model key": (
        {"merge_method": "ties", "models": [{"model": "x", "paramters": {}}]},
        r"models\[0\]\.paramters",
    ),
    "unknown parameter": (
        {"merge_method": "ties", "parameters": {"densty": 0.5}},
        r"parameters\.densty: not a parameter",
    ),
    "method we do not have": ({"merge_method": "slerp"}, r"'slerp' is a mergekit method adapterfuse does not have"),
    "unknown method": ({"merge_method": "sloop"}, r"merge_method 'sloop': unknown; expected one of linear"),
    "ties with unequal weights": ({"merge_method": "ties", "weights": [1.0, 2.0]}, r"divides the agreeing entries"),
    "dare_ties with mergekit's default normalize": ({"merge_method": "dare_ties"}, r"normalize: false"),
    "a weight gradient": ({"merge_method": "linear", "weights": [[0.0, 1.0], 1.0]}, r"gradient or filtered value"),
    "no weight": (
        {"merge_method": "task_arithmetic", "weights": [None, 1.0]},
        r"no weight for \['no/such/adapter-1'\]",
    ),
    "different densities": ({"merge_method": "ties", "densities": [0.5, 0.3]}, r"densities \[0\.3, 0\.5\] differ"),
    "slices": ({"merge_method": "ties", "slices": [{"sources": []}]}, r"'slices' builds or edits a full model"),
    "bad dtype": ({"merge_method": "ties", "dtype": "int8"}, r"dtype: expected 'float32', 'float16' or 'bfloat16'"),
    "linear not normalized": ({"merge_method": "linear", "parameters": {"normalize": False}}, r"sum\(weight\) = 2"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_mergekit_configs_are_refused_in_one_line(tmp_path, case):
    given, message = REFUSED[case]
    content = {k: v for k, v in given.items() if k not in ("weights", "densities")}
    if "models" not in content:
        weights = given.get("weights", [1.0, 1.0])
        densities = given.get("densities", [None, None])
        content["models"] = [
            {"model": m, "parameters": {k: v for k, v in (("weight", w), ("density", d)) if v is not None}}
            for m, w, d in zip(MISSING, weights, densities, strict=True)
        ]
    with pytest.raises(ConfigError, match=message) as err:
        merge_mergekit(_write(tmp_path, content))
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_yaml_or_missing_is_one_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_mergekit(bad)
    with pytest.raises(ConfigError, match="no such file"):
        read_mergekit(tmp_path / "absent.yml")
