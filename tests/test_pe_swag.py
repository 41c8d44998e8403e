"""SWAG over the adapter: the moments, the samples, and rank 0 with zero variance giving the mean."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.errors import ConfigError
from adapterfuse.train.pe.layers import member_deltas
from adapterfuse.train.pe.options import PESpec
from adapterfuse.train.pe.swag import SwagPosterior, flatten, lr_factor, snapshot_steps, unflatten
from adapterfuse.train.pe.train import train_pe_ensemble
from tests.helpers import tiny_config, tiny_data


def test_moments_and_deviations_match_a_direct_computation():
    thetas = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    post = SwagPosterior.empty(7, rank=3)
    for t in thetas:
        post.collect(t)
    torch.testing.assert_close(post.mean, thetas.mean(dim=0))
    torch.testing.assert_close(post.variance, thetas.var(dim=0, unbiased=False), rtol=1e-4, atol=1e-6)
    running = torch.cumsum(thetas, dim=0) / torch.arange(1, 6)[:, None]
    torch.testing.assert_close(post.deviations, (thetas - running)[-3:])
    assert post.count == 5


def test_rank_zero_and_zero_variance_sample_the_mean_exactly():
    theta = torch.randn(11, generator=torch.Generator().manual_seed(1))
    post = SwagPosterior.empty(11, rank=0)
    post.collect(theta)
    post.collect(theta)  # the same point twice: σ² = 0
    assert post.deviations.shape == (0, 11) and not post.variance.any()
    samples = post.sample(4, scale=1.0, seed=0)
    assert torch.equal(samples, theta.expand(4, -1))
    # and the check can fail: with spread, samples leave the mean, reproducibly by seed
    post.collect(theta + 1.0)
    spread = post.sample(4, scale=1.0, seed=0)
    assert not torch.equal(spread[0], post.mean) and not torch.equal(spread[0], spread[1])
    assert torch.equal(spread, post.sample(4, scale=1.0, seed=0))
    with pytest.raises(ConfigError, match="no snapshot"):
        SwagPosterior.empty(3, 1).sample(1, 1.0, 0)


def test_trained_swag_with_rank_zero_and_one_snapshot_returns_the_mean_adapter(tiny_base, tmp_path):
    config = tiny_config()
    data = tiny_data(tmp_path / "glue", config=config)
    ens = train_pe_ensemble(
        tiny_base,
        "sst2",
        PESpec("swag", 3, config, {"swag_rank": 0, "swag_start": 0.99}),
        out=tmp_path / "swag",
        data=data,
        progress=False,
    )
    m = ens.manifest
    assert m["swag"]["count"] == 1 and ens.tensors["swag.deviations"].shape[0] == 0
    like = {n: torch.empty(s) for n, s in m["shapes"].items()}
    mean = member_deltas(m["layout"], unflatten(ens.tensors["swag.mean"], like), 1, m["scale"])[0]
    swa = ens.merged("swa").deltas  # the SWA mean, as a plain LoRA adapter
    assert all(torch.allclose(swa[k].dense(), d.dense(), rtol=0, atol=1e-7) for k, d in mean.items())
    members = ens.member_deltas()
    assert len(members) == 3
    for member in members:
        for module, d in mean.items():
            assert torch.equal(member[module].A, d.A) and torch.equal(member[module].B, d.B)
    assert any(d.B.abs().max() > 0 for d in mean.values())  # trained: not the zero adapter


def test_default_swag_collects_several_snapshots_and_samples_differ(tiny_base, tmp_path):
    config = tiny_config()
    data = tiny_data(tmp_path / "glue", config=config)
    ens = train_pe_ensemble(
        tiny_base, "sst2", PESpec("swag", 2, config, {"swag_rank": 4}), out=tmp_path / "swag", data=data, progress=False
    )
    assert ens.manifest["swag"]["count"] == 6 and ens.tensors["swag.deviations"].shape[0] == 4
    a, b = ens.member_deltas()
    assert any(not torch.equal(a[m].B, b[m].B) for m in a)
    with pytest.raises(ConfigError, match="only a SWAG ensemble"):
        train_pe_ensemble(
            tiny_base, "sst2", PESpec("mimo", 2, config), out=tmp_path / "mimo", data=data, progress=False
        ).merged("swa")


def test_flatten_roundtrip_and_schedule():
    t = {"b": torch.randn(2, 3), "a": torch.randn(4)}
    back = unflatten(flatten(t), t)
    assert all(torch.equal(back[k], t[k]) for k in t)
    with pytest.raises(ConfigError, match="equal sizes"):
        unflatten(torch.zeros(5), t)
    assert snapshot_steps(12, 0.5, 2) == {7, 9, 11, 12}
    assert lr_factor(0, 100, 10, 50, 0.5) == pytest.approx(0.1)
    assert lr_factor(60, 100, 10, 50, 0.5) == 0.5 and lr_factor(30, 100, 10, 50, 0.5) == pytest.approx(0.75)
