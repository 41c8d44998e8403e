"""Linear and log-linear pooling: the pure functions, and the predictor against members run alone."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.backends.ensemble.pooling import linear, log_linear, pool, pooled_log_probs
from adapterfuse.backends.ensemble.predictor import EnsemblePredictor
from adapterfuse.head import Scoring, predict_proba
from adapterfuse.tasks.glue import load_task
from tests.helpers import random_expert, write_glue_dir


def member_log_probs(k: int = 3, n: int = 5, labels: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(3 * torch.randn(k, n, labels, generator=gen), dim=-1)


def test_linear_is_the_weighted_mean_of_probabilities():
    lp = member_log_probs()
    p = lp.exp()
    want = 0.5 * p[0] + 0.3 * p[1] + 0.2 * p[2]
    torch.testing.assert_close(linear(p, [0.5, 0.3, 0.2]), want)
    torch.testing.assert_close(linear(p, [5, 3, 2]), want)  # normalised by the total weight
    torch.testing.assert_close(pool("linear", lp, [0.5, 0.3, 0.2]), want)
    torch.testing.assert_close(pool("linear", lp, [0.0, 1.0, 0.0]), p[1])


def test_log_linear_is_the_renormalised_weighted_product():
    lp = member_log_probs()
    want = torch.softmax((0.7 * lp[0] - 0.4 * lp[1] + 0.1 * lp[2]) / 0.5, dim=-1)
    torch.testing.assert_close(log_linear(lp, [0.7, -0.4, 0.1], temperature=0.5), want)
    torch.testing.assert_close(log_linear(lp, [1.0, 0.0, 0.0]), lp[0].exp())
    torch.testing.assert_close(pooled_log_probs("log_linear", lp, [0.7, -0.4, 0.1], 0.5), want.log())
    assert torch.allclose(log_linear(lp, [1 / 3] * 3).sum(-1), torch.ones(5))


def test_a_zero_weight_member_is_ignored_even_when_it_is_certain():
    lp = member_log_probs(k=2)
    lp[1, :, 0] = float("-inf")  # member 1 rules label 0 out completely
    out = log_linear(lp, [1.0, 0.0])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, lp[0].exp())


def test_temperature_sharpens_and_flattens():
    lp = member_log_probs(k=2)
    sharp, flat = pool("log_linear", lp, [0.5, 0.5], 0.25), pool("log_linear", lp, [0.5, 0.5], 4.0)
    assert (sharp.max(-1).values >= flat.max(-1).values).all()
    mixed = pool("linear", lp, [0.5, 0.5])
    torch.testing.assert_close(pool("linear", lp, [0.5, 0.5], 2.0), torch.softmax(mixed.log() / 2, -1))


@pytest.fixture(scope="module")
def setting(tiny_base, tmp_path_factory):
    td = load_task("sst2", validation_size=8, glue_dir=write_glue_dir(tmp_path_factory.mktemp("pool") / "g"))
    experts = [random_expert(tiny_base, f"m{i}", rank=4, seed=10 + i, scale=2.0) for i in range(3)]
    alone = [
        predict_proba(e.attach(tiny_base.model), tiny_base.tokenizer, td.task, td.test, autocast=False) for e in experts
    ]
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # the members disagree, so the checks below can fail
    return td, experts, alone


@pytest.mark.parametrize("pooling", ["linear", "log_linear"])
def test_one_member_with_weight_one_is_that_expert(tiny_base, setting, pooling):
    td, experts, alone = setting
    predictor = EnsemblePredictor(tiny_base, experts[1:2], pooling, [1.0], scoring=Scoring(autocast=False))
    torch.testing.assert_close(predictor.predict_proba(td.task, td.test), alone[1], rtol=0, atol=1e-5)


def test_log_linear_with_weights_one_zero_is_the_first_member(tiny_base, setting):
    td, experts, alone = setting
    predictor = EnsemblePredictor(tiny_base, experts[:2], "log_linear", [1.0, 0.0], scoring=Scoring(autocast=False))
    torch.testing.assert_close(predictor.predict_proba(td.task, td.test), alone[0], rtol=0, atol=1e-5)


def test_linear_pooling_with_given_weights_is_the_hand_computed_mixture(tiny_base, setting):
    td, experts, alone = setting
    weights = [0.6, 0.3, 0.1]
    predictor = EnsemblePredictor(tiny_base, experts, "linear", weights, scoring=Scoring(batch_size=4, autocast=False))
    want = sum(w * p for w, p in zip(weights, alone, strict=True))
    torch.testing.assert_close(predictor.predict_proba(td.task, td.test), want, rtol=0, atol=1e-5)
    uniform = EnsemblePredictor(tiny_base, experts, "linear", scoring=Scoring(autocast=False))
    torch.testing.assert_close(uniform.predict_proba(td.task, td.test), sum(alone) / 3, rtol=0, atol=1e-5)
