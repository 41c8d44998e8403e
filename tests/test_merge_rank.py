"""The rank policy of a merge: rank="auto" (a share of the update's energy), a fixed rank, rank="exact"."""

from __future__ import annotations

import math

import pytest
import torch

from adapterfuse.backends.merge.registry import merge_deltas
from adapterfuse.delta import Deltas, LowRank
from adapterfuse.errors import ConfigError
from adapterfuse.lowrank import dense_energy_truncation, dense_factors, energy_rank


def _lr(seed: int, rank: int, shape: tuple[int, int]) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g))


def _optimal_rank(d: torch.Tensor, energy: float) -> int:
    s2 = torch.linalg.svdvals(d.double()) ** 2
    return int((torch.cumsum(s2, 0) < energy * s2.sum()).sum()) + 1


def _decaying(out_dim: int, in_dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_dim, in_dim, generator=g)).Q
    v = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=g)).Q
    return (u * 0.93 ** torch.arange(in_dim, dtype=torch.float32)) @ v.T


def test_energy_rank_is_the_smallest_rank_keeping_the_share() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # squares 9, 4, 1, 0.25 of 14.25
    assert [energy_rank(s, e) for e in (0.5, 0.9, 0.95, 0.99, 1.0)] == [1, 2, 3, 4, 4]
    assert energy_rank(torch.zeros(3), 0.9) == 1  # a zero update still keeps one (zero) direction


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("exact", [False, True])
def test_dense_auto_keeps_the_share_with_the_smallest_rank(energy: float, exact: bool) -> None:
    d = _decaying(160, 120)
    t = dense_energy_truncation(d, energy, exact=exact, seed=3, start=4)
    best = _optimal_rank(d, energy)
    # The randomized sketch's singular values are slightly below the exact ones, so it may need one more.
    assert best <= t.delta.rank <= best + (0 if exact else 1)
    err = float(torch.linalg.norm(d.double() - t.delta.dense(torch.float64)) / torch.linalg.norm(d.double()))
    assert t.error == pytest.approx(err, abs=1e-5) and err <= math.sqrt(1 - energy) + 1e-6
    assert t.norm == pytest.approx(float(torch.linalg.norm(d.double())), rel=1e-6)


def test_dense_exact_keeps_everything_without_an_svd() -> None:
    for shape in ((7, 5), (5, 7)):
        d = torch.randn(*shape)
        t = dense_factors(d)
        assert t.delta.rank == 5 and t.error == 0.0 and torch.equal(t.delta.dense(), d)


def _experts(shape: tuple[int, int] = (96, 80)) -> list[Deltas]:
    return [{"m": _lr(s, 4, shape)} for s in (1, 2, 3)]


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_sparse_merges_default_to_auto_and_report_rank_and_error(method: str) -> None:
    experts = _experts()
    auto = merge_deltas(experts, method, seed=1)
    exact = merge_deltas(experts, method, seed=1, rank="exact")
    full = exact.deltas["m"].dense(torch.float64)
    assert exact.per_module_error["m"] == 0.0 and exact.deltas["m"].rank == 80
    got = auto.deltas["m"]
    err = float(torch.linalg.norm(full - got.dense(torch.float64)) / torch.linalg.norm(full))
    assert auto.params.rank is None and auto.per_module_error["m"] == pytest.approx(err, abs=1e-5)
    assert err <= math.sqrt(0.1) + 1e-6
    best = _optimal_rank(full.float(), 0.9)
    assert best <= got.rank <= best + 1
    # The old default, the largest expert rank, kept far less of a sparse merge.
    assert merge_deltas(experts, method, seed=1, rank=4).per_module_error["m"] > 2 * err
    more = merge_deltas(experts, method, seed=1, energy=0.99)
    assert more.deltas["m"].rank > got.rank and more.per_module_error["m"] <= 0.1 + 1e-6


@pytest.mark.parametrize("method", ["uniform", "task_arithmetic"])
def test_linear_auto_truncates_the_stacked_factors_without_a_full_size_svd(method, monkeypatch) -> None:
    experts = _experts((300, 200))
    exact = merge_deltas(experts, method)
    assert exact.deltas["m"].rank == 12 and exact.overall_error == 0.0  # the default stays exact
    shapes: list[tuple[int, ...]] = []
    svd = torch.linalg.svd

    def recording_svd(a, *args, **kwargs):
        shapes.append(tuple(a.shape))
        return svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    auto = merge_deltas(experts, method, rank="auto", energy=0.8)
    assert shapes and max(max(s) for s in shapes) <= 12  # only the stacked-rank core is decomposed
    full = exact.deltas["m"].dense(torch.float64)
    assert auto.deltas["m"].rank == _optimal_rank(full.float(), 0.8)
    err = float(torch.linalg.norm(full - auto.deltas["m"].dense(torch.float64)) / torch.linalg.norm(full))
    assert auto.per_module_error["m"] == pytest.approx(err, abs=1e-5) and err <= math.sqrt(0.2)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"energy": 0.0}, r"energy: Input should be greater than 0"),
        ({"energy": 1.5}, r"energy: Input should be less than or equal to 1"),
        ({"rank": "full"}, r"rank: Value error, expected a whole number greater than or equal to 1, 'auto' or 'exact'"),
        ({"rank": 2.5}, r"rank: Value error, expected a whole number"),
    ],
)
def test_bad_rank_or_energy_is_refused(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        merge_deltas(_experts(), "ties", **kwargs)


def test_the_merge_command_takes_auto_and_exact_ranks():
    from adapterfuse.cli.main import build_parser

    parser = build_parser()
    base = ["merge", "--experts", "a", "b", "--out", "o"]
    assert parser.parse_args([*base, "--rank", "auto"]).rank == "auto"
    assert parser.parse_args([*base, "--rank", "exact"]).rank == "exact"
    assert parser.parse_args([*base, "--rank", "16"]).rank == 16
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--rank", "0"])
