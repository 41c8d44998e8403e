"""One config model per backend: the API, the CLI and a recipe (--dry-run) refuse a bad option alike.

Each backend's options are declared once (RouteConfig, EnsembleConfig, MergeConfig); the three entry
points build that model, so the same bad option fails everywhere with the same message, before any
expert, base or data is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adapterfuse import cli
from adapterfuse.backends.base import BACKENDS, backend_config, make_combiner
from adapterfuse.backends.ensemble.config import EnsembleConfig
from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.backends.merge.api import MergeCombiner, merge
from adapterfuse.backends.merge.common import TiesParams
from adapterfuse.backends.merge.config import MergeConfig
from adapterfuse.backends.route.api import RouteCombiner, route
from adapterfuse.backends.route.config import RouteConfig
from adapterfuse.errors import ConfigError
from adapterfuse.recipe.checks import check_recipe
from adapterfuse.recipe.schema import load_recipe

# backend -> (the bad option as an API keyword, the same as CLI flags, the message all three give)
CASES = {
    "route": ({"top_k": 0}, ["--top-k", "0"], "top_k: expected an integer >= 1, got 0"),
    "ensemble": (
        {"pooling": "mean"},
        ["--pooling", "mean"],
        "pooling 'mean': unknown; expected one of linear, log_linear",
    ),
    "merge": (
        {"method": "ties", "density": 2.0},
        ["--method", "ties", "--density", "2"],
        "merge method 'ties': invalid parameters: density: Input should be less than or equal to 1 (got 2.0). "
        "Accepted parameters: convention, density, divide, energy, exact_svd, lambda, rank, seed, sign_on, weights",
    ),
}


def _api(backend: str, experts: list[Path], base, options: dict) -> None:
    if backend == "route":
        route(experts, base, validation=None, **options)
    elif backend == "ensemble":
        ensemble(experts, base, **options)
    else:
        merge(experts, base=base, **options)


def _recipe(tmp_path: Path, experts: list[Path], backend: str, options: dict) -> Path:
    raw = {
        "name": "bad",
        "tasks": {"sst2": {}, "rte": {}},
        "experts": {"paths": [str(p) for p in experts]},
        "combiners": [{"backend": backend, "options": options}],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("backend", list(CASES))
def test_api_cli_and_recipe_refuse_a_bad_option_with_one_message(backend, tmp_path, tiny_base, no_loading, capsys):
    options, flags, message = CASES[backend]
    experts = [tmp_path / "sst2-expert", tmp_path / "rte-expert"]  # never read: the options fail first
    with pytest.raises(ConfigError) as api:
        _api(backend, experts, tiny_base, options)
    assert str(api.value) == message

    argv = [backend, "--experts", *map(str, experts), "--out", str(tmp_path / "out"), *flags]
    argv += [] if backend == "merge" else ["--tasks", "sst2,rte"]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip() == f"adapterfuse {backend}: error: {message}"

    path = _recipe(tmp_path, experts, backend, options)
    with pytest.raises(ConfigError) as recipe:
        check_recipe(load_recipe(path))
    assert str(recipe.value).endswith(f"combiners.0.options: {message}")
    assert cli.main(["run", str(path), "--dry-run", "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip().endswith(message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_checks_that_need_the_expert_count_agree_too(tmp_path, tiny_base, capsys):
    experts = [tmp_path / "a", tmp_path / "b"]
    message = "top_k: 3 is larger than the number of experts to route to (2); expected 1 .. 2"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        route(experts, tiny_base, router="arrow", top_k=3)
    with pytest.raises(ConfigError) as recipe:
        check_recipe(load_recipe(_recipe(tmp_path, experts, "route", {"router": "arrow", "top_k": 3})))
    assert str(recipe.value) == f"combiner 'route arrow': {message}"


def test_the_defaults_live_in_the_models():
    route_config = RouteConfig()
    assert route_config.router == "learned" and route_config.target == "task" and route_config.top_k == 1
    assert RouteConfig(target="best_expert").target == "best_expert"  # the older choice is still accepted
    # MBC takes the options of the router it routes across groups with (learned with data, Arrow without).
    assert RouteConfig(router="mbc", mbc_clusters=2, hidden=4, temperature=2.0).hidden == 4
    assert EnsembleConfig().pooling == "log_linear" and EnsembleConfig(weights="0.5,0.5").weights == [0.5, 0.5]
    merge_config = MergeConfig(method="ties", density=0.5, **{"lambda": 1.2})
    assert isinstance(merge_config.params, TiesParams) and merge_config.params.lam == 1.2
    assert merge_config.params.density == 0.5 and not merge_config.lambda_search
    assert MergeConfig(method="ties").lambda_search and MergeConfig().method == "ties"
    assert MergeConfig(method="uniform", params={"weights": [1, 2]}).params.weights == (1.0, 2.0)


@pytest.mark.parametrize(
    ("model", "options", "match"),
    [
        (RouteConfig, {"router": "mbc"}, "mbc_clusters: router 'mbc' needs the number of expert groups"),
        (RouteConfig, {"topk": 1}, "topk: unknown route option; expected one of"),
        (RouteConfig, {"hidden": -1}, "hidden: expected an integer >= 0, got -1"),
        (RouteConfig, {"lr": float("nan")}, "lr: expected a finite number, got nan"),
        (RouteConfig, {"temperature": 0}, r"temperature: expected numbers > 0"),
        (RouteConfig, {"router": "arrow", "hidden": 8}, "hidden: an option of router 'learned', but router is 'arrow'"),
        (RouteConfig, {"clusters": 3}, "clusters: an option of router 'clustered', but router is 'learned'"),
        (RouteConfig, {"router": "clustered", "temperature": 2.0}, "temperature: an option of router 'arrow'"),
        (
            RouteConfig,
            {"router": "mbc", "mbc_clusters": 2, "mbc_router": "arrow", "epochs": 5},
            r"epochs: an option of router 'learned', but router is 'mbc' across \['arrow'\]",
        ),
        (EnsembleConfig, {"weights": [1.0, 2.0], "select": "top2"}, "cannot be combined with select"),
        (EnsembleConfig, {"metric": "auc"}, "metric 'auc': unknown; expected one of score, nll"),
        (MergeConfig, {"method": "mean"}, "unknown merge method 'mean'; known methods: uniform"),
        (MergeConfig, {"method": "ties", "densty": 0.1}, "densty.*Accepted parameters"),
        (MergeConfig, {"lambda_grid": []}, "lambda_grid: expected a non-empty list"),
        (MergeConfig, {"batch_size": 0}, "batch_size: expected an integer >= 1, got 0"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_option(model, options, match):
    backend = {RouteConfig: "route", EnsembleConfig: "ensemble", MergeConfig: "merge"}[model]
    with pytest.raises(ConfigError, match=match) as e:
        backend_config(backend, options)
    assert "\n" not in str(e.value)


def test_a_config_and_loose_options_do_not_mix(tmp_path, tiny_base):
    with pytest.raises(ConfigError, match=r"got a config and the options \['top_k'\]"):
        route([tmp_path / "a"], tiny_base, RouteConfig(router="arrow"), top_k=2)
    with pytest.raises(ConfigError, match="expected a MergeConfig or None, got 'ties'; give the options as keywords"):
        merge([tmp_path / "a"], "ties")


def test_the_registry_builds_each_backend_from_its_options(tiny_base):
    assert set(BACKENDS) == {"merge", "ensemble", "route"}
    combiner = make_combiner("route", tiny_base, {"router": "arrow", "top_k": 1}, members=["a"])
    assert isinstance(combiner, RouteCombiner) and combiner.config == RouteConfig(router="arrow")
    assert combiner.members == ["a"]
    merger = make_combiner("merge", tiny_base, {"method": "uniform"})
    assert isinstance(merger, MergeCombiner) and merger.name == "merge:uniform"
    with pytest.raises(ConfigError, match="backend 'mix': unknown"):
        backend_config("mix", {})
