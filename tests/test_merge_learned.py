"""Greedy soup and learned merge weights on a tiny learnable task: a good expert and a label-flipped one."""

from __future__ import annotations

import math
import random

import pytest
import torch

from adapterfuse.backends.merge.api import merge
from adapterfuse.backends.merge.learned import LearnedParams, RankWeightedModel, final_merge, layer_key
from adapterfuse.backends.merge.soup import greedy_select
from adapterfuse.errors import ConfigError
from adapterfuse.harness import evaluate
from adapterfuse.head import label_logits, label_token_ids, pad, predict_proba
from adapterfuse.tasks.glue import get_task
from adapterfuse.tasks.spec import Example, TaskData
from adapterfuse.train.expert import train_expert
from tests.helpers import tiny_config

TASK = get_task("sst2")
_FILLER = "the a movie film was plot actors story fine dull".split()


def _examples(n: int, seed: int) -> list[Example]:
    """Sentences whose label is carried by one word, so a tiny model learns it in a few steps."""
    rng = random.Random(seed)
    return [
        Example((" ".join(rng.choice(_FILLER) for _ in range(4)) + (" great ." if i % 2 else " awful ."),), i % 2, i)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def pair(tiny_base, tmp_path_factory):
    """(good, flipped, validation TaskData): one expert learns the labels, the other their opposite."""
    root = tmp_path_factory.mktemp("learned")
    train, val = _examples(48, 0), _examples(16, 1)
    flipped = [Example(e.fields, 1 - e.label, e.idx) for e in train]
    cfg = tiny_config(epochs=3.0, lr=1e-2, validation_size=16)
    good = train_expert(tiny_base, TASK, cfg, out=root / "good", data=TaskData(TASK, train, val, val), progress=False)
    bad = train_expert(
        tiny_base, TASK, cfg, out=root / "flipped", data=TaskData(TASK, flipped, val, val), progress=False
    )
    return good, bad, TaskData(TASK, train, val, _examples(16, 2))  # a test split apart from validation


def _loss(predictor, data: TaskData) -> float:
    """Mean cross-entropy of the validation labels under a predictor (computed independently)."""
    probs = predictor.predict_proba(TASK, data.validation)
    labels = torch.tensor([e.label for e in data.validation])
    return float(-probs[torch.arange(len(labels)), labels].log().mean())


def test_greedy_select_keeps_only_strict_improvements():
    scores = {("a", "b"): 0.8, ("a", "c"): 0.85, ("a", "c", "d"): 0.9}
    kept, records, final = greedy_select(
        ["a", "b", "c", "d"], {"a": 0.8, "b": 0.7, "c": 0.6, "d": 0.5}, lambda names: scores[tuple(names)]
    )
    assert kept == ["a", "c", "d"] and final == 0.9
    assert [r["kept"] for r in records] == [True, False, True, True]  # b ties the soup: not kept
    assert records[1] == {"name": "b", "alone": 0.7, "with": 0.8, "kept": False}


def test_greedy_soup_leaves_out_the_flipped_expert(pair, tiny_base):
    good, bad, data = pair
    soup = merge([bad, good], method="greedy_soup", base=tiny_base, validation=[data], autocast=False)
    record = soup.search["soup"]
    assert record["order"] == ["good", "flipped"]  # sorted by score alone, not by the given order
    assert record["kept"] == ["good"] and [c["kept"] for c in record["candidates"]] == [True, False]
    alone = {c["name"]: c["alone"] for c in record["candidates"]}
    assert alone["good"] > alone["flipped"]
    assert record["candidates"][1]["with"] <= alone["good"]
    assert [s["name"] for s in soup.sources] == ["good"] and soup.method == "greedy_soup"
    p_soup = soup.predictor(tiny_base, autocast=False).predict_proba(TASK, data.validation)
    p_good = predict_proba(good.attach(tiny_base.model), tiny_base.tokenizer, TASK, data.validation, autocast=False)
    assert float((p_soup - p_good).abs().max()) <= 1e-5


def test_lambda_search_picks_the_best_grid_point(pair, tiny_base):
    good, bad, data = pair
    merged = merge(
        [good, bad], method="task_arithmetic", weights=[1.0, 0.6], base=tiny_base, validation=[data], autocast=False
    )
    record = merged.search["lambda_search"]
    assert len(set(record["scores"])) > 1  # otherwise the test could not tell a good choice from a bad one
    chosen = record["grid"].index(record["chosen"])
    assert record["scores"][chosen] == max(record["scores"]) and merged.params["lambda"] == record["chosen"]
    score = evaluate(merged.predictor(tiny_base, autocast=False), [data], split="validation")["average"]
    assert score == pytest.approx(record["scores"][chosen])


def test_weighted_model_is_exactly_the_weighted_merge(pair, tiny_base):
    """The rank-space hook model at any weights computes the task_arithmetic merge at those weights."""
    good, bad, data = pair
    experts = [good.deltas, bad.deltas]
    wm = RankWeightedModel(tiny_base, experts, per_layer=True)
    assert wm.groups == ["0", "1"] and layer_key("model.layers.1.mlp.up_proj") == "1"
    weights = torch.tensor([[0.7, -0.3], [1.2, 0.4]])
    wm.set(weights)
    merged = final_merge(experts, weights, wm.groups, LearnedParams(per_layer=True))
    ids, mask = pad(
        tiny_base.tokenizer([TASK.prompt(e.fields) for e in data.validation[:4]])["input_ids"],
        tiny_base.tokenizer.pad_token_id,
    )
    labels = label_token_ids(TASK, tiny_base.tokenizer)
    from adapterfuse.backends.merge.adapter import MergedAdapter

    adapter = MergedAdapter.build(merged, [good, bad], tiny_base)
    with torch.no_grad():
        got = label_logits(wm.model, ids, mask, labels)
        want = label_logits(adapter.attach(tiny_base.model), ids, mask, labels)
    wm.close()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_layer", [False, True])
def test_gradient_learned_weights_reduce_the_validation_loss(pair, tiny_base, per_layer):
    good, bad, data = pair
    learned = merge(
        [good, bad],
        method="learned",
        base=tiny_base,
        validation=[data],
        autocast=False,
        per_layer=per_layer,
        epochs=4,
        lr=0.1,
    )
    record = learned.search["learned"]
    uniform = merge([good, bad], method="uniform")
    loss_uniform = _loss(uniform.predictor(tiny_base, autocast=False), data)
    loss_learned = _loss(learned.predictor(tiny_base, autocast=False), data)
    assert record["loss_uniform"] == pytest.approx(loss_uniform, rel=1e-4)
    assert record["loss"] == pytest.approx(loss_learned, rel=1e-4)  # the saved merge is what was fitted
    assert loss_learned < loss_uniform - 1e-3
    assert record["mean_weights"]["good"] > record["mean_weights"]["flipped"]
    if per_layer:
        assert set(record["weights"]["good"]) == {"0", "1"}
    assert learned.method == "learned" and learned.result.method == "task_arithmetic"


def test_gradient_free_search_is_finite_bounded_seeded_and_no_worse(pair, tiny_base):
    good, bad, data = pair
    kwargs = dict(base=tiny_base, validation=[data], autocast=False, mode="gradient_free", steps=13, seed=4)
    first = merge([good, bad], method="learned", **kwargs)
    again = merge([good, bad], method="learned", **kwargs)
    record = first.search["learned"]
    weights = list(record["weights"].values())
    assert all(math.isfinite(w) and abs(w) <= 1.5 for w in weights)
    assert record["evaluations"] == 13 and record["loss"] <= record["loss_uniform"]
    assert weights == list(again.search["learned"]["weights"].values())
    loss_uniform = _loss(merge([good, bad], method="uniform").predictor(tiny_base, autocast=False), data)
    assert _loss(first.predictor(tiny_base, autocast=False), data) <= loss_uniform + 1e-6


def test_learned_and_soup_need_validation_data(pair, tiny_base):
    good, bad, data = pair
    with pytest.raises(ConfigError, match=r"learned.*validation"):
        merge([good, bad], method="learned", base=tiny_base)
    with pytest.raises(ConfigError, match="base"):
        merge([good, bad], method="learned", validation=[data])
    with pytest.raises(ConfigError, match="mode"):
        merge([good, bad], method="learned", base=tiny_base, validation=[data], mode="newton")
    with pytest.raises(ConfigError, match="combine"):
        merge([good, bad], method="greedy_soup", base=tiny_base, validation=[data], combine="average")
