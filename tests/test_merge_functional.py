"""The pure tensor functions of adapterfuse.backends.merge.functional, against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from adapterfuse.backends.merge.functional import (
    dare_drop,
    disjoint_mean,
    elect_sign,
    kept_count,
    kth_smallest,
    trim_by_magnitude,
)
from adapterfuse.delta import LowRank
from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.lowrank import stack_factors


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- trim_by_magnitude


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.99])
def test_trim_keeps_exactly_the_largest_entries(density: float) -> None:
    x = _randn(16, 12)
    out = trim_by_magnitude(x, density)
    kept = out != 0
    n_keep = math.floor(density * x.numel())
    assert int(kept.sum()) == n_keep
    assert torch.equal(out[kept], x[kept])  # kept entries are untouched
    assert float(x.abs()[kept].min()) >= float(x.abs()[~kept].max())
    assert out.shape == x.shape and out.dtype == x.dtype


def test_trim_breaks_ties_at_the_threshold_by_flat_index() -> None:
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, -2.0, 0.0, 5.0])
    # keep 4: 5 and 3 lie above the threshold |x| = 2; of the four tied entries the first two win.
    expected = torch.tensor([3.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 5.0])
    assert torch.equal(trim_by_magnitude(x, 0.5), expected)
    # The same rule in two dimensions uses row-major order.
    m = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    assert torch.equal(trim_by_magnitude(m, 0.5), torch.tensor([[1.0, -1.0], [0.0, 0.0]]))


def test_trim_keeps_the_floor_count_as_peft_and_mergekit_do() -> None:
    # 0.2 * 100 == 20.000000000000004 in binary floating point; a ceil would keep 21.
    x = torch.arange(1.0, 101.0)
    assert int((trim_by_magnitude(x, 0.2) != 0).sum()) == 20
    assert kept_count(100, 0.2) == 20
    # PEFT's magnitude_based_pruning and mergekit's magnitude keep int(density * n): 204 of 1024 at 0.2
    # (rounding half up would keep 205).
    assert kept_count(1024, 0.2) == int(0.2 * 1024) == 204
    assert int((trim_by_magnitude(torch.arange(1.0, 1025.0), 0.2) != 0).sum()) == 204
    assert kept_count(10, 0.001) == 1  # any positive density keeps at least one entry
    assert kept_count(7, 1.0) == 7


def test_trim_density_one_returns_the_input_itself() -> None:
    x = _randn(4, 5)
    assert trim_by_magnitude(x, 1.0) is x


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_trim_rejects_density_outside_unit_interval(density: float) -> None:
    with pytest.raises(ConfigError, match="density"):
        trim_by_magnitude(_randn(3, 3), density)


# ---------------------------------------------------------------- elect_sign / disjoint_mean


def test_elect_sign_uses_total_mass_and_plus_one_on_zero() -> None:
    deltas = torch.tensor([[1.0, -1.0, 2.0, 1.0], [-3.0, 1.0, -1.0, 1.0], [0.0, 0.0, 0.0, -5.0]])
    # sums: -2, 0, 1, -3. The last column has two positive voters but more negative mass: mass wins.
    assert torch.equal(elect_sign(deltas), torch.tensor([-1.0, 1.0, 1.0, -1.0]))


def _disjoint_mean_ref(deltas: torch.Tensor, sign: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Entry by entry, in float64: sum of agreeing w_i x_i over the number of agreeing experts."""
    d, s, w = deltas.double(), sign.double(), weights.double()
    out = torch.zeros(d.shape[1:], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in d.shape[1:]]):
        idx = tuple(idx.tolist())
        agreeing = [
            float(w[i] * d[i][idx])
            for i in range(d.shape[0])
            if float(w[i] * d[i][idx]) != 0 and math.copysign(1.0, float(w[i] * d[i][idx])) == s[idx]
        ]
        out[idx] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


def test_disjoint_mean_matches_entrywise_reference() -> None:
    deltas = _randn(4, 5, 6, seed=1)
    deltas[1, 0, :] = 0.0  # trimmed entries never count as agreeing
    deltas[:, 2, 3] = 0.0  # an entry where nobody has mass -> 0
    weights = torch.tensor([1.0, 0.5, -2.0, 3.0])  # a negative weight flips that expert's vote
    sign = elect_sign(deltas * weights.reshape(-1, 1, 1))
    out = disjoint_mean(deltas, sign, weights)
    ref = _disjoint_mean_ref(deltas, sign, weights)
    assert float((out.double() - ref).abs().max()) < 1e-6
    assert float(out[2, 3]) == 0.0


def test_disjoint_mean_divides_by_count_not_by_weight_sum() -> None:
    deltas = torch.tensor([[2.0], [4.0]])
    out = disjoint_mean(deltas, torch.tensor([1.0]), torch.tensor([1.0, 3.0]))
    assert float(out[0]) == pytest.approx((2.0 + 12.0) / 2)


def test_disjoint_mean_rejects_wrong_weight_count() -> None:
    with pytest.raises(CompatibilityError, match=r"\(3,\)"):
        disjoint_mean(_randn(3, 2, 2), torch.ones(2, 2), torch.ones(2))


# ---------------------------------------------------------------- dare_drop


def test_dare_drop_same_seed_same_bytes_and_different_seed_differs() -> None:
    x = _randn(16, 12)
    a = dare_drop(x, 0.5, torch.Generator().manual_seed(7))
    b = dare_drop(x, 0.5, torch.Generator().manual_seed(7))
    c = dare_drop(x, 0.5, torch.Generator().manual_seed(8))
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, c)


def test_dare_drop_rescales_kept_entries_and_keeps_about_density() -> None:
    x = _randn(100, 100, seed=3)
    out = dare_drop(x, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.equal(out[kept], x[kept] / 0.3)
    assert abs(float(kept.double().mean()) - 0.3) < 0.03
    # The mask is exactly the documented draw.
    draws = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept, draws < 0.3)


def test_dare_drop_mask_does_not_depend_on_dtype() -> None:
    x = _randn(8, 8)
    a = dare_drop(x, 0.4, torch.Generator().manual_seed(1))
    b = dare_drop(x.double(), 0.4, torch.Generator().manual_seed(1))
    assert torch.equal(a != 0, b != 0)


def test_dare_drop_density_one_is_identity_and_bad_density_rejected() -> None:
    x = _randn(3, 4)
    assert dare_drop(x, 1.0, torch.Generator()) is x
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="density"):
            dare_drop(x, bad, torch.Generator())


# ---------------------------------------------------------------- stack_factors


def test_stack_factors_is_the_exact_weighted_sum() -> None:
    items = [
        (0.5, LowRank(_randn(2, 12, seed=1), _randn(16, 2, seed=2))),
        (-1.5, LowRank(_randn(4, 12, seed=3), _randn(16, 4, seed=4))),
        (2.0, LowRank(_randn(3, 12, seed=5), _randn(16, 3, seed=6))),
    ]
    out = stack_factors(items)
    ref = sum(w * lr.B.double() @ lr.A.double() for w, lr in items)
    assert out.rank == 9 and out.shape == (16, 12)
    assert float((out.dense(torch.float64) - ref).abs().max()) < 1e-5


def test_stack_factors_rejects_empty_and_mismatched_shapes() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        stack_factors([])
    bad = [(1.0, LowRank(_randn(2, 12), _randn(16, 2))), (1.0, LowRank(_randn(2, 10), _randn(16, 2)))]
    with pytest.raises(CompatibilityError, match=r"item 1 has ΔW shape \(16, 10\), expected \(16, 12\)"):
        stack_factors(bad)


@pytest.mark.parametrize("seed", range(4))
def test_kth_smallest_equals_kthvalue_on_low_rank_and_tied_inputs(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    low_rank = (torch.randn(700, 4, generator=gen) @ torch.randn(4, 300, generator=gen)).abs().reshape(-1)
    tied = torch.randint(0, 7, (90_000,), generator=gen).float()
    spiky = torch.cat([torch.zeros(80_000), torch.randn(1_000, generator=gen).abs()])
    for values in (low_rank, tied, spiky):
        n = values.numel()
        for k in (1, 2, n // 5, n // 2, n - n // 5, n - 1, n):
            assert kth_smallest(values, k) == values.kthvalue(k).values
