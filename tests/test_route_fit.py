"""Fitting routers: learned routing accuracy, deterministic clustering, MBC, greedy subsets, features."""

from __future__ import annotations

import math

import pytest
import torch

from adapterfuse.backends.route.api import quality_curve, route, routing_accuracy
from adapterfuse.backends.route.data import RoutingData
from adapterfuse.backends.route.features import (
    SHAPE_DIM,
    SHAPE_VERSION,
    FeatureExtractor,
    resolve_layer,
    routing_texts,
    shape_version,
    text_shape,
)
from adapterfuse.backends.route.routers.cluster import ClusterRouter
from adapterfuse.backends.route.routers.learned import FitOptions, LearnedRouter, routing_loss, target_labels
from adapterfuse.backends.route.routers.mbc import cluster_experts, cosine_matrix
from adapterfuse.backends.route.subset import greedy_subset, subset_score
from adapterfuse.delta import LowRank, peft_from_deltas
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.head import Scoring
from adapterfuse.tasks.glue import load_task
from tests.helpers import random_expert, write_glue_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("route-fit") / "glue", n_train=80, n_dev=16)
    return [load_task(t, validation_size=30, glue_dir=root) for t in ("sst2", "stsb")]


@pytest.fixture(scope="module")
def experts(tiny_base):
    return [
        random_expert(tiny_base, f"t{i}", rank=2, seed=i, scale=2.0, task=t) for i, t in enumerate(("sst2", "stsb"))
    ]


def test_features_stop_early_and_match_the_full_hidden_states(tiny_base):
    texts = ["a short one .", "a somewhat longer text with more words in it ."]
    ids = tiny_base.tokenizer(texts[1:], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = tiny_base.model.get_decoder()(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (0, 1, 2, -1):
        got = FeatureExtractor(tiny_base, layer, autocast=False).encode(texts)
        torch.testing.assert_close(got[1], hidden[resolve_layer(tiny_base.model, layer)][0].mean(0), rtol=0, atol=1e-5)
    single = FeatureExtractor(tiny_base, 1, autocast=False).encode(texts[:1])
    torch.testing.assert_close(
        single[0], FeatureExtractor(tiny_base, 1, autocast=False).encode(texts)[0], rtol=0, atol=1e-5
    )  # padding in a batch changes nothing


def test_mean_last_readout_appends_the_last_tokens_state(tiny_base):
    texts = ["a short one .", "a somewhat longer text with more words in it ."]
    got = FeatureExtractor(tiny_base, 1, autocast=False, readout="mean_last").encode(texts)
    d = tiny_base.model.config.hidden_size
    assert got.shape == (2, 2 * d)
    for row, text in enumerate(texts):  # the short text is right-padded in the batch: its last real token counts
        ids = tiny_base.tokenizer([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = tiny_base.model.get_decoder()(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
        torch.testing.assert_close(got[row, :d], hidden.mean(0), rtol=0, atol=1e-5)
        torch.testing.assert_close(got[row, d:], hidden[-1], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="readout 'max': unknown; expected one of mean, mean_last"):
        FeatureExtractor(tiny_base, 1, readout="max")


def test_routing_on_fields_drops_the_template(data):
    stsb = data[1]
    assert routing_texts(stsb.task, stsb.test[:1], "fields")[0] == "\n".join(stsb.test[0].fields)
    assert "Sentence 1:" in routing_texts(stsb.task, stsb.test[:1], "prompt")[0]


def test_fields_features_carry_the_text_shape(tiny_base, experts, data):
    counts = [math.log1p(4), math.log1p(3), math.log1p(1), math.log1p(3)]
    assert text_shape("one two three\nfour\nfive six\nseven", version=1) == pytest.approx(counts)
    # Version 2 adds the length asymmetry of the first two fields: |log1p(3) - log1p(1)|.
    assert text_shape("one two three\nfour\nfive six\nseven") == pytest.approx([*counts, math.log1p(3) - math.log1p(1)])
    assert text_shape("a b c\nd e f")[-1] == 0.0 and text_shape("d\na b c")[-1] == pytest.approx(math.log(2))
    assert text_shape("just one line") == pytest.approx([math.log1p(1), math.log1p(3), 0.0, 0.0, 0.0])
    assert (shape_version(True), shape_version(False), shape_version(1)) == (SHAPE_VERSION, 0, 1)
    with pytest.raises(ConfigError, match=r"shape: 3 is not a shape version; expected True, False or one of 0 .. 2"):
        shape_version(3)
    texts = ["a b c\nd e", "a single longer line of words"]
    plain = FeatureExtractor(tiny_base, 1, autocast=False).encode(texts)
    shaped = FeatureExtractor(tiny_base, 1, autocast=False, shape=True)
    got = shaped.encode(texts)
    assert got.shape == (2, plain.shape[1] + SHAPE_DIM) and shaped.dim == got.shape[1]
    torch.testing.assert_close(got[:, :-SHAPE_DIM], plain, rtol=0, atol=0)
    torch.testing.assert_close(got[:, -SHAPE_DIM:], torch.tensor([text_shape(t) for t in texts]), rtol=0, atol=0)
    # Only the raw fields get the shape by default; a RoutingData built otherwise is refused by name.
    fp32 = Scoring(autocast=False)
    assert RoutingData(tiny_base, data, "fields", scoring=fp32).features.shape[1] == plain.shape[1] + SHAPE_DIM
    prompt = RoutingData(tiny_base, data, "prompt", scoring=fp32)
    assert prompt.features.shape[1] == plain.shape[1]
    with pytest.raises(ConfigError, match=r"'shape': 0.*'shape': 2"):
        route(experts, tiny_base, router="learned", validation=data, shape=True, data=prompt, autocast=False)


@pytest.mark.slow
def test_learned_router_routes_tasks_apart(tiny_base, experts, data):
    predictor = route(experts, tiny_base, router="learned", validation=data, target="task", autocast=False)
    assert predictor.info["validation"]["oracle"] == 1.0
    accuracy = routing_accuracy(predictor, data, "test", against_best=True)
    assert accuracy["oracle"] >= 0.9 and accuracy["tasks"]["stsb"]["oracle"] >= 0.9
    assert 0.0 <= accuracy["best"] <= 1.0
    best = route(experts, tiny_base, router="learned", validation=data, target="best_expert", hidden=16, autocast=False)
    report = best.info["validation"]
    assert report["best"] >= 0.8 and report["best_score"] >= report["oracle_score"] - 1e-9


def test_clustering_is_deterministic_for_a_seed(tiny_base, experts, data):
    rd = RoutingData(tiny_base, data, scoring=Scoring(autocast=False))
    scores = rd.scores(experts)
    a = ClusterRouter.fit(rd.features, scores.quality, clusters=4, seed=3)
    b = ClusterRouter.fit(rd.features, scores.quality, clusters=4, seed=3)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.table, b.table)
    assert torch.equal(a.assign(rd.features), b.assign(rd.features))
    one = route(experts, tiny_base, router="clustered", validation=data, clusters=2, seed=3, data=rd, autocast=False)
    two = route(experts, tiny_base, router="clustered", validation=data, clusters=2, seed=3, data=rd, autocast=False)
    assert torch.equal(one.router.centroids, two.router.centroids)
    assert rd.scores(experts) is scores  # the experts' answers were computed once
    curve = quality_curve(
        [1, 2],
        lambda c: route(experts, tiny_base, router="clustered", clusters=c, data=rd, autocast=False),
        data,
        max_examples=4,
    )
    assert [p["value"] for p in curve] == [1, 2] and all(-1 <= p["average"] <= 1 for p in curve)


def _scaled(expert: Expert, factor: float, name: str, base) -> Expert:
    deltas = {m: LowRank(d.A, d.B * factor) for m, d in expert.deltas.items()}
    state, config = peft_from_deltas(deltas, base.spec)
    return Expert(name=name, config=config, state_dict=state, meta={**expert.meta, "task": None})


def test_mbc_groups_experts_by_delta_similarity(tiny_base, experts):
    near = _scaled(experts[0], 3.0, "near", tiny_base)  # same direction as t0: cosine 1
    pool = [experts[0], experts[1], near]
    cos = cosine_matrix([e.deltas for e in pool])
    assert cos[0, 2] == pytest.approx(1.0, abs=1e-9) and abs(float(cos[0, 1])) < 0.5
    dense = [torch.cat([e.deltas[m].dense().flatten() for m in sorted(e.deltas)]) for e in pool]
    assert float(cos[0, 1]) == pytest.approx(
        float(torch.nn.functional.cosine_similarity(dense[0], dense[1], 0)), abs=1e-5
    )
    sketched = cosine_matrix([e.deltas for e in pool], sketch_size=24, seed=0)
    assert float(sketched[0, 2]) == pytest.approx(1.0, abs=1e-9) and abs(float(sketched[0, 1])) < 0.5
    assert cluster_experts(cos, 2) == [0, 1, 0] and cluster_experts(cos, 3) == [0, 1, 2]
    assert cluster_experts(cos, 1) == [0, 0, 0]


def test_mbc_merges_within_groups_and_routes_across_them(tiny_base, experts, data):
    near = _scaled(experts[0], 1.0, "near", tiny_base)
    predictor = route(
        [*experts, near], tiny_base, router="mbc", mbc_clusters=2, validation=data, target="task", autocast=False
    )
    assert predictor.names == ["cluster-0", "cluster-1"]
    assert predictor.info["mbc"]["groups"] == {"cluster-0": ["t0", "near"], "cluster-1": ["t1"]}
    assert predictor.info["validation"]["oracle"] == 1.0
    zero_shot = route([*experts, near], tiny_base, router="mbc", mbc_clusters=2)
    assert type(zero_shot).__name__ == "ArrowPredictor" and len(zero_shot.experts) == 2


def test_greedy_subset_curve_under_a_budget(tiny_base, experts, data):
    extra = random_expert(tiny_base, "t2", rank=2, seed=7, scale=0.01, task="sst2")  # nearly the base
    rd = RoutingData(tiny_base, data, scoring=Scoring(autocast=False))
    scores = rd.scores([*experts, extra])
    subset = greedy_subset(scores, 3)
    singles = [subset_score(scores, [i]) for i in range(3)]
    assert subset.curve[0]["score"] == max(singles) and subset.members[0] == singles.index(max(singles))
    assert subset.curve[1]["score"] == max(
        subset_score(scores, [subset.members[0], i]) for i in range(3) if i != subset.members[0]
    )
    assert [p["budget"] for p in subset.curve] == [1, 2, 3]
    assert sorted(subset.members) == [0, 1, 2] and subset.curve[-1]["members"] == subset.names
    predictor = route([*experts, extra], tiny_base, router="learned", budget=2, data=rd, autocast=False)
    assert len(predictor.experts) == 2 and predictor.info["subset"]["members"] == predictor.names


def test_likelihood_loss_is_cross_entropy_for_a_one_hot_quality():
    # With log-likelihood 0 for one expert and -inf for the others, the mixture likelihood is the router's
    # probability of that expert: the loss must be exactly the cross-entropy on that label.
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    quality = torch.full((6, 3), float("-inf")).scatter(1, labels[:, None], 0.0)
    assert torch.allclose(routing_loss(logits, quality), torch.nn.functional.cross_entropy(logits, labels))


def test_likelihood_router_prefers_the_expert_that_is_good_on_average():
    # Expert 1 is nearly as good as expert 0 on most rows and far better on a few; the best-expert label
    # is mostly 0, but the likelihood target must learn expert 1, whose mixture likelihood is higher.
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(200, 4, generator=gen)
    quality = torch.stack([torch.full((200,), -0.10), torch.full((200,), -0.11)], dim=1)
    quality[:20, 0] = -5.0
    assert target_labels("best_expert", quality, torch.zeros(200, dtype=torch.long)).eq(0).sum() == 180
    router = LearnedRouter.fit(
        features,
        target_labels("likelihood", quality, torch.zeros(200, dtype=torch.long)),
        2,
        FitOptions(target="likelihood", epochs=200, lr=0.05),
    )
    assert bool((router.probs(features).argmax(dim=1) == 1).all())
    assert router.config()["target"] == "likelihood"
