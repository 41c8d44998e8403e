"""Arrow: prototypes by power iteration on the factors, the fused rank-space form, save/load."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.backends.route.api import route
from adapterfuse.backends.route.predictor import ArrowPredictor, RoutePredictor
from adapterfuse.backends.route.routers.arrow import (
    ArrowLinear,
    ArrowModel,
    arrow_prototypes,
    mean_subtracted,
    power_prototypes,
    routing_weights,
)
from adapterfuse.delta import LowRank
from adapterfuse.errors import ConfigError
from adapterfuse.tasks.glue import get_task
from adapterfuse.tasks.spec import Example
from tests.helpers import random_expert

SST2 = get_task("sst2")
BATCH = [
    Example((f"the film was {w} and the plot was {v} .",), 0, i)
    for i, (w, v) in enumerate(
        [("great", "dull"), ("bad", "fine"), ("a long and boring", "awful"), ("wonderful", "good")]
    )
]


@pytest.fixture(scope="module")
def experts(tiny_base):
    """Eight experts of different ranks (1 .. 8), some on fewer modules."""
    out = []
    for i in range(8):
        modules = None if i % 3 else [m for m, _ in tiny_base.model.named_modules() if m.endswith(("q_proj", "v_proj"))]
        out.append(random_expert(tiny_base, f"a{i}", rank=1 + i, modules=modules, seed=10 + i, scale=1.5))
    return out


def test_prototypes_are_the_top_right_singular_vectors_of_the_dense_delta():
    gen = torch.Generator().manual_seed(0)
    factors = [LowRank(torch.randn(r, 24, generator=gen), torch.randn(16, r, generator=gen)) for r in (1, 3, 6)]
    protos = power_prototypes(factors)
    for f, p in zip(factors, protos, strict=True):
        v = torch.linalg.svd(f.dense().double())[2][0].float()
        assert abs(float(p @ v)) == pytest.approx(1.0, abs=1e-6)  # equal up to sign
        assert float(p.norm()) == pytest.approx(1.0, abs=1e-6)


def test_routing_weights_keep_top_k_by_absolute_cosine():
    protos = torch.eye(3, 4)
    x = torch.tensor([[0.1, -5.0, 1.0, 0.0], [3.0, 0.0, 0.0, 9.0]])
    w = routing_weights(x, protos, top_k=2, temperature=0.5)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert w[0, 1] > w[0, 2] > 0 and w[0, 0] == 0  # |-5| wins: the sign of a prototype is arbitrary
    assert w[1, 0] > w[1, 1] > 0 and w[1, 2] == 0  # zero cosines tie: the lower index is kept
    assert torch.equal(routing_weights(x, protos, 1, 1.0), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_fused_layer_equals_the_per_expert_reference():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16)
    factors = [LowRank(torch.randn(r, 24), torch.randn(16, r)) for r in (2, 5, 3)]
    layer = ArrowLinear(
        base,
        [factors[0], None, *factors[1:]],
        torch.cat([power_prototypes(factors)[:1], torch.zeros(1, 24), power_prototypes(factors)[1:]]),
        top_k=2,
        temperature=0.3,
    )
    x = torch.randn(3, 7, 24)
    fused = layer(x)
    layer.fused = False
    reference = layer(x)
    dense = base(x)
    w = routing_weights(x.reshape(-1, 24), layer.prototypes, 2, 0.3)
    for e, f in zip((0, 2, 3), factors, strict=True):
        dense = dense + (w[:, e : e + 1] * (x.reshape(-1, 24) @ f.dense().T)).view(3, 7, 16)
    assert w[:, 1].abs().sum() == 0  # the expert without this module is never chosen
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused, dense, rtol=0, atol=1e-5)


def test_fused_model_equals_the_reference_with_eight_experts_of_different_ranks(tiny_base, experts):
    arrow = ArrowModel(tiny_base.model, [e.deltas for e in experts], top_k=3, temperature=0.2)
    from adapterfuse.head import predict_proba

    fused = predict_proba(arrow.model, tiny_base.tokenizer, SST2, BATCH, autocast=False)
    arrow.set_fused(False)
    reference = predict_proba(arrow.model, tiny_base.tokenizer, SST2, BATCH, autocast=False)
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    plain = predict_proba(tiny_base.model, tiny_base.tokenizer, SST2, BATCH, autocast=False)
    assert (fused - plain).abs().max() > 1e-3  # the experts do change the answers
    assert all(isinstance(m, ArrowLinear) for m in arrow.layers.values()) and len(arrow.layers) == 14
    assert not any(isinstance(m, ArrowLinear) for m in tiny_base.model.modules())  # the base is untouched


def test_one_expert_with_top_1_is_that_expert(tiny_base, experts):
    predictor = route(experts[1:2], tiny_base, router="arrow", autocast=False)
    alone = (
        BatchedEnsemble(tiny_base.model, experts[1:2])
        .member_log_probs(tiny_base.tokenizer, SST2, BATCH, autocast=False)[0]
        .exp()
    )
    torch.testing.assert_close(predictor.predict_proba(SST2, BATCH), alone, rtol=0, atol=1e-6)
    assert predictor.cost().forward_passes == 1.0


def test_save_load_round_trip_and_errors(tiny_base, other_base, experts, tmp_path):
    predictor = route(experts[:4], tiny_base, router="arrow", top_k=2, temperature={"default": 0.5}, autocast=False)
    assert isinstance(predictor, ArrowPredictor)
    predictor.save(tmp_path / "arrow")
    loaded = RoutePredictor.load(tmp_path / "arrow", tiny_base)
    assert isinstance(loaded, ArrowPredictor) and loaded.top_k == 2 and loaded.names == predictor.names
    assert torch.equal(loaded.predict_proba(SST2, BATCH), predictor.predict_proba(SST2, BATCH))
    with pytest.raises(ConfigError, match="top_k: 5 is larger than the number of experts"):
        route(experts[:4], tiny_base, router="arrow", top_k=5)
    with pytest.raises(ConfigError, match=r"at least one expert|non-empty list"):
        route([], tiny_base, router="arrow")


def test_mean_subtracted_factors_are_each_update_minus_the_mean_exactly():
    gen = torch.Generator().manual_seed(1)
    pool = [
        {"m": LowRank(torch.randn(r, 12, generator=gen).double(), torch.randn(10, r, generator=gen).double())}
        for r in (2, 4, 3)
    ]
    pool[0]["only"] = LowRank(torch.randn(2, 5, generator=gen).double(), torch.randn(6, 2, generator=gen).double())
    residual = mean_subtracted(pool)
    mean = sum(d["m"].dense(torch.float64) for d in pool) / 3
    for d, r in zip(pool, residual, strict=True):
        torch.testing.assert_close(r["m"].dense(torch.float64), d["m"].dense(torch.float64) - mean, rtol=0, atol=1e-12)
    assert residual[0]["only"] is pool[0]["only"] and "only" not in residual[1]  # nothing to subtract it from
    # The prototypes are the top right singular vectors of the dense residuals.
    protos = arrow_prototypes(residual)["m"]
    for d, p in zip(pool, protos, strict=True):
        v = torch.linalg.svd(d["m"].dense(torch.float64) - mean)[2][0].float()
        assert abs(float(p @ v)) == pytest.approx(1.0, abs=1e-5)


def test_subtracting_the_mean_changes_the_routing_not_the_update(tiny_base, experts, tmp_path):
    # The prototypes move (they are those of the residuals); the update a token gets does not.
    plain = route(experts[:3], tiny_base, router="arrow", autocast=False)
    sub = route(experts[:3], tiny_base, router="arrow", subtract_mean=True, autocast=False)
    module = next(iter(sub.arrow.prototypes))
    assert not torch.allclose(plain.arrow.prototypes[module], sub.arrow.prototypes[module])
    for one in (0, 2):  # with one expert, top-1 routing applies that expert's update either way
        alone = route(experts[one : one + 1], tiny_base, router="arrow", subtract_mean=True, autocast=False)
        reference = route(experts[one : one + 1], tiny_base, router="arrow", autocast=False)
        torch.testing.assert_close(alone.predict_proba(SST2, BATCH), reference.predict_proba(SST2, BATCH))
    sub.save(tmp_path / "sub")
    loaded = RoutePredictor.load(tmp_path / "sub", tiny_base)
    assert loaded.subtract_mean and torch.equal(loaded.predict_proba(SST2, BATCH), sub.predict_proba(SST2, BATCH))
    with pytest.raises(ConfigError, match="subtract_mean: an option of router 'arrow'"):
        route(experts[:3], tiny_base, router="learned", subtract_mean=True, validation=[])
