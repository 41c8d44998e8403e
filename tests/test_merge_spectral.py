"""The spectral merges (Iso-C, TSV) in low-rank form against dense float64 references written here."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.backends.merge.registry import merge_deltas
from adapterfuse.backends.merge.tsv import polar
from adapterfuse.delta import LowRank
from adapterfuse.lowrank import stack_factors, thin_svd
from tests.test_merge_methods import _dense, _experts, _lr

MODULES = ("k", "q", "v")


def _svd(d: torch.Tensor, tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = int((s > tol * s.max()).sum())
    return u[:, :k], s[:k], vh[:k]


def _iso_ref(ds: list[torch.Tensor], weights: list[float], lam: float) -> torch.Tensor:
    u, s, vh = _svd(sum(w * d for w, d in zip(weights, ds, strict=True)))
    return lam * s.mean() * u @ vh


def _tsv_ref(ds: list[torch.Tensor], weights: list[float], lam: float) -> torch.Tensor:
    parts = [_svd(w * d) for w, d in zip(weights, ds, strict=True) if float(d.abs().max()) > 0]
    u = torch.cat([p[0] for p in parts], dim=1)
    s = torch.cat([p[1] for p in parts])
    v = torch.cat([p[2].T for p in parts], dim=1)
    pu, _, qu = torch.linalg.svd(u, full_matrices=False)
    pv, _, qv = torch.linalg.svd(v, full_matrices=False)
    return lam * (pu @ qu) @ torch.diag(s) @ (pv @ qv).T


def test_thin_svd_is_the_exact_svd_of_the_stacked_update():
    stacked = stack_factors([(1.0, _lr(1, 3)), (-0.5, _lr(2, 4))])
    u, s, vh = thin_svd(stacked)
    dense = stacked.dense(torch.float64)
    torch.testing.assert_close((u * s) @ vh, dense.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(s.double(), torch.linalg.svdvals(dense)[: s.numel()], rtol=1e-5, atol=1e-6)
    assert torch.allclose(u.T @ u, torch.eye(s.numel()), atol=1e-5)


@pytest.mark.parametrize(("method", "ref"), [("iso_c", _iso_ref), ("tsv", _tsv_ref)])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.0]])
def test_spectral_merges_match_their_dense_float64_references(method, ref, weights):
    experts = _experts()
    result = merge_deltas(experts, method, weights=weights, lam=0.7)
    for module in MODULES:
        present = [i for i, e in enumerate(experts) if module in e]
        want = ref([_dense(experts[i], module) for i in present], [weights[i] for i in present], 0.7)
        got = result.deltas[module].dense(torch.float64)
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
        assert result.per_module_error[module] == 0.0  # exact: no rank asked


def test_iso_c_flattens_the_spectrum_and_tsv_keeps_one_expert_unchanged():
    experts = _experts()
    s = torch.linalg.svdvals(merge_deltas(experts, "iso_c").deltas["q"].dense(torch.float64))
    kept = s[s > 1e-6 * s.max()]
    assert float(kept.max() - kept.min()) < 1e-5 * float(kept.max())  # every direction the same weight
    one = {"q": _lr(9, 3)}
    torch.testing.assert_close(
        merge_deltas([one], "tsv").deltas["q"].dense(torch.float64), one["q"].dense(torch.float64), rtol=0, atol=1e-5
    )


def test_tsv_decorrelates_the_tasks_and_a_rank_truncates_with_its_error():
    experts = _experts()
    merged = merge_deltas(experts, "tsv").deltas["q"]
    u, _, _ = thin_svd(merged)
    assert torch.allclose(polar(u), u, atol=1e-4)
    truncated = merge_deltas(experts, "tsv", rank=2)
    assert truncated.deltas["q"].rank == 2 and 0.0 < truncated.per_module_error["q"] < 1.0
    half = merge_deltas(experts, "tsv", keep=0.5).deltas["q"]
    assert half.rank == sum(-(-e["q"].rank // 2) for e in experts)  # ceil(r_i / 2) directions per task


def test_an_all_zero_module_merges_to_rank_zero():
    zero = {"q": LowRank(torch.zeros(2, 12), torch.zeros(16, 2))}
    for method in ("iso_c", "tsv"):
        out = merge_deltas([zero, zero], method).deltas["q"]
        assert out.rank == 0 and out.shape == (16, 12)


def _knots_ref(ds: list[torch.Tensor], weights: list[float], lam: float, density: float) -> torch.Tensor:
    from tests.test_merge_methods import _sign_mean_ref, _trim_ref

    side = torch.cat([w * d for w, d in zip(weights, ds, strict=True)], dim=1)
    u, s, vh = _svd(side)
    n_in = ds[0].shape[1]
    vts = [_trim_ref(vh[:, i * n_in : (i + 1) * n_in], density) for i in range(len(ds))]
    return lam * (u * s) @ _sign_mean_ref(vts, [1.0] * len(ds))


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_knots_matches_its_dense_float64_reference(density):
    experts, weights = _experts(), [0.5, 2.0, 1.0]
    result = merge_deltas(experts, "knots", weights=weights, lam=0.8, density=density)
    for module in MODULES:
        present = [i for i, e in enumerate(experts) if module in e]
        dense = [_dense(experts[i], module) for i in present]
        want = _knots_ref(dense, [weights[i] for i in present], 0.8, density)
        got = result.deltas[module].dense(torch.float64)
        assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_knots_of_one_expert_at_density_1_is_that_expert():
    one = {"q": _lr(9, 3)}
    got = merge_deltas([one], "knots", density=1.0).deltas["q"].dense(torch.float64)
    torch.testing.assert_close(got, one["q"].dense(torch.float64), rtol=0, atol=1e-5)
