"""RoutePredictor: a fixed choice is exactly that expert; batches are routed input by input; save/load; errors."""

from __future__ import annotations

import json

import pytest
import torch

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.backends.merge.registry import merge_deltas
from adapterfuse.backends.route.api import route
from adapterfuse.backends.route.features import SHAPE_VERSION, routing_texts
from adapterfuse.backends.route.predictor import Choice, RoutePredictor
from adapterfuse.backends.route.routers.base import FixedRouter, keep_top_k
from adapterfuse.errors import CompatibilityError, ConfigError, ExpertError, OutputExistsError
from adapterfuse.harness import evaluate, results_table
from adapterfuse.head import Scoring, predict_proba
from adapterfuse.predictor import Predictor
from adapterfuse.tasks.glue import load_task
from tests.helpers import random_expert, write_glue_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("route-pred") / "glue", n_dev=8)
    return [load_task(t, validation_size=16, glue_dir=root) for t in ("sst2", "rte", "stsb")]


@pytest.fixture(scope="module")
def experts(tiny_base):
    tasks = ("sst2", "rte", "stsb")
    return [random_expert(tiny_base, f"x{i}", rank=2 + i, seed=i, scale=2.0, task=t) for i, t in enumerate(tasks)]


def alone(tiny_base, expert, task, examples):
    return (
        BatchedEnsemble(tiny_base.model, [expert])
        .member_log_probs(tiny_base.tokenizer, task, examples, autocast=False)[0]
        .exp()
    )


@pytest.mark.parametrize("then", ["ensemble", "merge"])
def test_a_router_that_always_picks_expert_j_gives_exactly_its_probabilities(tiny_base, experts, data, then):
    for j in (0, 2):
        fp32 = Scoring(autocast=False)
        predictor = RoutePredictor(tiny_base, experts, FixedRouter(3, j), Choice(then=then), scoring=fp32)
        for td in data:
            got = predictor.predict_proba(td.task, td.test)
            assert torch.equal(got, alone(tiny_base, experts[j], td.task, td.test))
            peft = predict_proba(
                experts[j].attach(tiny_base.model), tiny_base.tokenizer, td.task, td.test, autocast=False
            )
            torch.testing.assert_close(got, peft, rtol=0, atol=1e-5)


def test_top_k_keeps_the_largest_and_renormalises():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    idx, w = keep_top_k(probs, 2)
    assert idx.tolist() == [[1, 2], [2, 0]]  # a tie goes to the lower index
    torch.testing.assert_close(w, torch.tensor([[2 / 3, 1 / 3], [0.75, 0.25]]))
    with pytest.raises(ConfigError, match="top_k: 4 is larger than the number of experts"):
        keep_top_k(probs, 4)


@pytest.mark.parametrize("then", ["ensemble", "merge"])
def test_a_batch_of_mixed_tasks_is_routed_as_one_input_at_a_time(tiny_base, experts, data, then):
    predictor = route(
        experts, tiny_base, router="learned", top_k=2, then=then, validation=data, autocast=False, batch_size=5
    )
    items = [
        (td.task, e)
        for pair in zip(*(td.test[:4] for td in data), strict=True)
        for td, e in zip(data, pair, strict=True)
    ]
    together = predictor.predict_mixed(items)
    for (task, example), got in zip(items, together, strict=True):
        one = predictor.predict_proba(task, [example])[0]
        torch.testing.assert_close(got, one, rtol=0, atol=1e-5)
    choices = {tuple(predictor.choose(td.task, td.test)[0].tolist()[0]) for td in data}
    assert len(choices) > 1  # the batch really did mix different expert choices
    for td in data:
        batch = predictor.predict_proba(td.task, td.test)
        single = torch.cat([predictor.predict_proba(td.task, [e]) for e in td.test])
        torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)


def test_merge_is_the_linear_merge_of_the_chosen_experts_at_each_inputs_weights(tiny_base, experts, data):
    predictor = route(experts, tiny_base, router="learned", top_k=2, then="merge", validation=data, autocast=False)
    td = data[0]
    indices, weights = predictor.choose(td.task, td.test)
    got = predictor.predict_proba(td.task, td.test)
    for i in (0, 3):
        merged = merge_deltas(
            [experts[j].deltas for j in indices[i].tolist()], "uniform", weights=weights[i].tolist()
        ).deltas
        want = (
            BatchedEnsemble(tiny_base.model, [merged])
            .member_log_probs(tiny_base.tokenizer, td.task, td.test[i : i + 1], autocast=False)[0, 0]
            .exp()
        )
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)


ROUTER_OPTIONS = {"learned": {"hidden": 8}, "clustered": {"clusters": 3}, "mbc": {"mbc_clusters": 2, "hidden": 8}}


@pytest.mark.parametrize("router", ["learned", "clustered", "mbc"])
def test_save_load_round_trip_gives_identical_probabilities(tiny_base, experts, data, tmp_path, router):
    options = {"top_k": 2, "on": "fields", "autocast": False, "readout": "mean_last", **ROUTER_OPTIONS[router]}
    predictor = route(experts, tiny_base, router=router, validation=data, **options)
    assert isinstance(predictor, Predictor)
    predictor.save(tmp_path / "r")
    written = json.loads((tmp_path / "r" / "manifest.json").read_text())
    manifest = written["settings"]
    assert manifest["on"] == "fields" and manifest["top_k"] == 2 and manifest["features"]["shape"] == SHAPE_VERSION
    assert manifest["features"]["readout"] == "mean_last"
    loaded = RoutePredictor.load(tmp_path / "r", tiny_base)
    assert loaded.extractor.shape == SHAPE_VERSION and loaded.extractor.readout == "mean_last"
    assert type(loaded.router) is type(predictor.router) and loaded.names == predictor.names
    for td in data:
        assert torch.equal(loaded.predict_proba(td.task, td.test), predictor.predict_proba(td.task, td.test))
    with pytest.raises(OutputExistsError, match="already exists"):
        predictor.save(tmp_path / "r")
    manifest["features"]["shape"] = True  # saved before shape versions: the four counts of version 1
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(written))
    old = RoutePredictor.load(tmp_path / "r", tiny_base).extractor
    assert old.shape == 1 and old.shape_dim == 4 and old.dim == loaded.extractor.dim - 1
    del manifest["features"]["shape"], manifest["features"]["readout"]  # saved before either existed
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(written))
    old = RoutePredictor.load(tmp_path / "r", tiny_base).extractor
    assert old.shape == 0 and old.readout == "mean"
    with pytest.raises(CompatibilityError, match="base fingerprint"):
        RoutePredictor.load(tmp_path / "r", tiny_base.__class__(**{**tiny_base.__dict__, "fingerprint": "f" * 64}))
    (tmp_path / "r" / "manifest.json").write_text(json.dumps({**written, "kind": "ensemble"}))
    with pytest.raises(ExpertError, match="holds a predictor of kind 'ensemble', expected one of"):
        RoutePredictor.load(tmp_path / "r", tiny_base)


def test_the_harness_measures_it(tiny_base, experts, data):
    predictor = route(
        experts, tiny_base, router="clustered", top_k=2, validation=data, clusters=2, autocast=False, layer=1
    )
    result = evaluate(predictor, data)
    assert set(result["tasks"]) == {"sst2", "rte", "stsb"}
    assert result["cost"]["forward_passes"] == 2.5  # two members plus a feature pass through 1 of 2 blocks
    assert f"| {predictor.name} |" in results_table([result])
    report = predictor.info["validation"]
    assert set(report) >= {"oracle", "best", "score", "best_score", "oracle_score", "tasks"}


def test_clear_errors_before_any_work(tiny_base, other_base, experts, data):
    with pytest.raises(ConfigError, match="non-empty list"):
        route([], tiny_base, router="learned", validation=data)
    with pytest.raises(ConfigError, match=r"top_k: 4 is larger than the number of experts to route to \(3\)"):
        route(experts, tiny_base, router="learned", top_k=4, validation=data)
    with pytest.raises(ConfigError, match=r"top_k: 3 is larger .* \(2\)"):
        route(experts, tiny_base, router="mbc", top_k=3, mbc_clusters=2, validation=data)
    with pytest.raises(ConfigError, match="top_k: expected an integer >= 1"):
        route(experts, tiny_base, router="learned", top_k=0, validation=data)
    with pytest.raises(ConfigError, match="fits on the validation split"):
        route(experts, tiny_base, router="clustered")
    with pytest.raises(ConfigError, match="router 'random'"):
        route(experts, tiny_base, router="random")
    with pytest.raises(ConfigError, match="then 'sum'"):
        route(experts, tiny_base, then="sum", validation=data)
    with pytest.raises(ConfigError, match="on 'label'"):
        route(experts, tiny_base, on="label", validation=data)
    stranger = random_expert(other_base, "stranger", rank=2, task="sst2")
    with pytest.raises(CompatibilityError, match="base fingerprint"):
        route([*experts, stranger], tiny_base, router="arrow")
    with pytest.raises(CompatibilityError, match="base fingerprint"):
        route([stranger], tiny_base, router="learned", validation=data)


@pytest.mark.parametrize("fallback", ["mix", "base"])
def test_an_abstaining_router_gives_unsure_inputs_the_fallback_and_routes_the_rest(
    tiny_base, experts, data, tmp_path, fallback
):
    predictor = route(
        experts, tiny_base, router="learned", validation=data, abstain=0.5, fallback=fallback, autocast=False
    )
    always = route(experts, tiny_base, router="learned", validation=data, autocast=False)
    below = predictor.info["abstain"]["below"]
    mixed = BatchedEnsemble(tiny_base.model, [merge_deltas([e.deltas for e in experts], "uniform").deltas])

    def reference(task, rows):  # the base alone, or the uniform merge of every expert
        if fallback == "base":
            return predict_proba(tiny_base.model, tiny_base.tokenizer, task, rows, autocast=False)
        return mixed.member_log_probs(tiny_base.tokenizer, task, rows, autocast=False)[0].exp()

    seen = torch.zeros(2, dtype=torch.long)
    for td in data:
        got = predictor.predict_proba(td.task, td.test)
        routed = always.predict_proba(td.task, td.test)
        probs = predictor.router.probs(predictor.extractor.encode(routing_texts(td.task, td.test, predictor.on)))
        unsure = probs.max(dim=1).values < below
        for i, example in enumerate(td.test):
            want = reference(td.task, [example])[0] if unsure[i] else routed[i]
            torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)
        seen += torch.bincount(unsure.long(), minlength=2)
    assert seen.min() > 0, "some inputs must be routed and some abstained on for the test to say anything"
    predictor.save(tmp_path / fallback)
    loaded = RoutePredictor.load(tmp_path / fallback, tiny_base)
    assert (loaded.abstain_below, loaded.fallback) == (below, fallback)
    assert torch.equal(
        loaded.predict_proba(data[0].task, data[0].test), predictor.predict_proba(data[0].task, data[0].test)
    )
    with pytest.raises(ConfigError, match="abstain: Arrow routes each token"):
        route(experts, tiny_base, router="arrow", abstain=0.1)
    with pytest.raises(ConfigError, match="fallback: what an abstained input gets, but abstain is not set"):
        route(experts, tiny_base, router="learned", validation=data, fallback="base")
