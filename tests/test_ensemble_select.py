"""Greedy forward selection (with replacement) and top-K, on cached validation outputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from adapterfuse.backends.ensemble.cache import MemberCache, pooled_score
from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.backends.ensemble.select import greedy, parse_select, single_scores, top_k
from adapterfuse.errors import ConfigError
from adapterfuse.harness import adapter_params
from adapterfuse.tasks.glue import get_task, load_task
from tests.helpers import random_expert, write_glue_dir


def caches(k: int = 6, n: int = 60, seed: int = 0) -> list[MemberCache]:
    """K noisy members of varying quality on two classification tasks."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for task in (get_task("sst2"), get_task("mnli")):
        labels = torch.randint(0, task.n_labels, (n,), generator=gen)
        signal = torch.nn.functional.one_hot(labels, task.n_labels).float()
        quality = torch.rand(k, 1, 1, generator=gen) * 2
        logits = quality * signal + torch.randn(k, n, task.n_labels, generator=gen)
        out.append(MemberCache(task, torch.log_softmax(logits, -1), labels.tolist()))
    return out


NAMES = ["delta", "alpha", "echo", "bravo", "foxtrot", "charlie"]


@pytest.mark.parametrize("pooling", ["linear", "log_linear"])
@pytest.mark.parametrize("metric", ["score", "nll"])
def test_greedy_is_never_worse_than_the_best_single_member(pooling, metric):
    for seed in range(5):
        cached = caches(seed=seed)
        best_single = max(single_scores(cached, NAMES, metric))
        chosen = greedy(cached, NAMES, pooling, metric)
        assert chosen.score >= best_single
        full = torch.zeros(len(NAMES))
        full[chosen.members] = torch.tensor(chosen.weights)
        assert pooled_score(pooling, cached, full, metric=metric) == pytest.approx(chosen.score)
        assert sum(chosen.weights) == pytest.approx(1.0) and chosen.history[0]["score"] == best_single


def test_greedy_is_deterministic_and_ties_go_to_the_first_name():
    cached = caches(seed=1)
    first, again = greedy(cached, NAMES), greedy(cached, NAMES)
    assert first == again
    order = [3, 0, 5, 2, 4, 1]  # the same members listed in another order: the same choice
    shuffled = greedy([c.subset(order) for c in cached], [NAMES[i] for i in order])
    assert shuffled.names == first.names and shuffled.weights == first.weights
    twins = [MemberCache(c.task, torch.stack([c.log_probs[0], c.log_probs[0]]), c.labels) for c in cached]
    assert greedy(twins, ["zulu", "yankee"]).names == ["yankee"]  # identical members: the first name wins


def test_greedy_adds_with_replacement_and_stops_when_nothing_improves():
    cached = caches(k=6, seed=2)
    chosen = greedy(cached, NAMES, "linear", metric="nll")
    picks = [h["added"] for h in chosen.history]
    assert len(picks) > len(set(picks))  # some member was added more than once: weights are its share
    for name, weight in zip(chosen.names, chosen.weights, strict=True):
        assert weight == pytest.approx(picks.count(name) / len(picks))
    scores = [h["score"] for h in chosen.history]
    assert all(b > a for a, b in itertools.pairwise(scores))


def test_top_k_takes_the_best_single_members():
    cached = caches(seed=3)
    singles = single_scores(cached, NAMES)
    chosen = top_k(cached, NAMES, 3)
    want = sorted(range(len(NAMES)), key=lambda i: (-singles[i], NAMES[i]))[:3]
    assert chosen.members == want and chosen.weights == [1 / 3] * 3 and chosen.method == "top3"


def test_select_specs():
    assert parse_select(None) is None and parse_select("greedy") == ("greedy", 0)
    assert parse_select("top3") == ("top", 3) and parse_select("TOP-2") == ("top", 2)
    for bad in ("top0", "best", "top"):
        with pytest.raises(ConfigError, match="expected 'greedy' or 'topK'"):
            parse_select(bad)


def test_selected_ensemble_reports_its_cost(tiny_base, tmp_path):
    td = load_task("sst2", validation_size=16, glue_dir=write_glue_dir(tmp_path / "glue"))
    experts = [random_expert(tiny_base, f"m{i}", rank=2 + i, seed=i, scale=3.0) for i in range(4)]
    for select in ("greedy", "top2"):
        predictor = ensemble(
            experts, tiny_base, pooling="log_linear", weights="uniform", select=select, validation=[td], autocast=False
        )
        chosen = [e for e in experts if e.name in predictor.names]
        cost = predictor.cost()
        assert cost.forward_passes == len(chosen) == len(predictor.info["selection"]["members"])
        assert cost.stored_params == adapter_params(chosen) and cost.memory_bytes == 4 * cost.stored_params
        again = ensemble(
            experts, tiny_base, pooling="log_linear", weights="uniform", select=select, validation=[td], autocast=False
        )
        assert again.names == predictor.names and again.weights == predictor.weights
