"""EMR-Merging against a float64 reference written entry by entry, its single-expert identity, and routing to it."""

from __future__ import annotations

import itertools

import pytest
import torch

from adapterfuse.backends.merge.emr import elect_unified, emr_experts, emr_scales, emr_updates, task_masks
from adapterfuse.backends.route.api import route
from adapterfuse.backends.route.predictor import RoutePredictor
from adapterfuse.delta import LowRank
from adapterfuse.errors import ConfigError
from adapterfuse.tasks.glue import load_task
from tests.helpers import random_expert, write_glue_dir


def _members(seed: int = 0, k: int = 3) -> list[dict[str, LowRank]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a": (6, 5), "b": (4, 7)}
    return [
        {
            m: LowRank(torch.randn(2 + i, n, generator=gen), torch.randn(o, 2 + i, generator=gen))
            for m, (o, n) in shapes.items()
        }
        for i in range(k)
    ]


def _reference(members):
    """λ_k M_k ⊙ τ_uni in float64, one entry at a time, as the paper writes it."""
    modules = sorted(members[0])
    dense = {m: [d[m].dense(torch.float64) for d in members] for m in modules}
    unified, masks = {}, {}
    for m in modules:
        out, n = dense[m][0].shape
        u = torch.zeros(out, n, dtype=torch.float64)
        for i, j in itertools.product(range(out), range(n)):
            values = [t[i, j].item() for t in dense[m]]
            sign = (sum(values) > 0) - (sum(values) < 0)
            agree = [abs(v) for v in values if (v > 0) - (v < 0) == sign]
            u[i, j] = sign * max(agree, default=0.0)
        unified[m] = u
        masks[m] = [(t * u) > 0 for t in dense[m]]
    scales = []
    for k in range(len(members)):
        own = sum(float(dense[m][k].abs().sum()) for m in modules)
        kept = sum(float((masks[m][k] * unified[m].abs()).sum()) for m in modules)
        scales.append(own / kept)
    updates = [{m: scales[k] * masks[m][k] * unified[m] for m in modules} for k in range(len(members))]
    return scales, updates


def test_emr_equals_the_entrywise_float64_reference():
    members = _members()
    scales, updates = _reference(members)
    assert emr_scales(members) == pytest.approx(scales, rel=1e-5)
    got, report = emr_updates(members, energy=1.0)
    assert report["scales"] == pytest.approx(scales, rel=1e-5)
    for mine, want in zip(got, updates, strict=True):
        for module, dense in want.items():
            torch.testing.assert_close(mine[module].dense(torch.float64), dense, rtol=0, atol=1e-4)
    tau = torch.stack([d["a"].dense() for d in members])
    unified = elect_unified(tau)
    assert torch.equal(task_masks(tau, unified), tau * unified > 0)


def test_one_expert_is_itself_and_energy_bounds_the_truncation():
    (one,) = _members(k=1)
    (got,), report = emr_updates([one], energy=1.0)
    assert report["scales"] == [pytest.approx(1.0)]
    for module, lr in one.items():
        torch.testing.assert_close(got[module].dense(), lr.dense(), rtol=0, atol=1e-5)
    members = _members(seed=3)
    kept, _ = emr_updates(members, energy=0.5)
    _, exact = _reference(members)
    for mine, want in zip(kept, exact, strict=True):
        for module, dense in want.items():
            error = float((mine[module].dense(torch.float64) - dense).norm() / dense.norm())
            assert error <= 0.5**0.5 + 1e-6  # at most sqrt(1 - energy) of the update is lost
    with pytest.raises(ConfigError, match=r"emr energy: expected a share in \(0, 1\], got 0"):
        emr_updates(members, energy=0)


def test_a_router_chooses_among_the_tasks_emr_updates(tiny_base, tmp_path):
    root = write_glue_dir(tmp_path / "glue", n_dev=6)
    data = [load_task(t, validation_size=12, glue_dir=root) for t in ("sst2", "rte")]
    experts = [
        random_expert(tiny_base, f"e{i}", rank=2, seed=i, scale=2.0, task=t) for i, t in enumerate(("sst2", "rte"))
    ]
    pool, report = emr_experts(experts, tiny_base, energy=1.0)
    assert [e.name for e in pool] == ["e0-emr", "e1-emr"] and [e.task for e in pool] == ["sst2", "rte"]
    updates, _ = emr_updates([e.deltas for e in experts], energy=1.0)
    assert report["scales"] == emr_scales([e.deltas for e in experts])
    for expert, want in zip(pool, updates, strict=True):  # the in-memory experts carry the EMR updates
        for module, lr in want.items():
            torch.testing.assert_close(expert.deltas[module].dense(), lr.dense(), rtol=0, atol=1e-6)
    predictor = route(experts, tiny_base, router="learned", emr=True, validation=data, autocast=False)
    assert predictor.names == ["e0-emr", "e1-emr"] and predictor.info["emr"]["paper"].endswith("2405.17461")
    predictor.save(tmp_path / "emr")
    loaded = RoutePredictor.load(tmp_path / "emr", tiny_base)
    for td in data:
        assert torch.equal(loaded.predict_proba(td.task, td.test), predictor.predict_proba(td.task, td.test))
    with pytest.raises(ConfigError, match="emr: MBC merges its own groups"):
        route(experts, tiny_base, router="mbc", mbc_clusters=1, emr=True, validation=data)
