"""The registered merge methods and merge_deltas, against dense float64 references written here."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from pydantic import ValidationError

from adapterfuse.backends.merge import registry
from adapterfuse.backends.merge.dare_linear import mask_generator
from adapterfuse.backends.merge.registry import METHODS, available_methods, merge_deltas
from adapterfuse.delta import Deltas, LowRank
from adapterfuse.errors import CompatibilityError, ConfigError

MODULES = ("k", "q", "v")


def _lr(seed: int, rank: int, shape: tuple[int, int] = (16, 12)) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(rank, shape[1], generator=g), 0.5 * torch.randn(shape[0], rank, generator=g))


def _experts() -> list[Deltas]:
    """Three experts with ranks 2-4; expert 1 lacks module v."""
    return [
        {"q": _lr(1, 2), "k": _lr(2, 3), "v": _lr(3, 4)},
        {"q": _lr(4, 4), "k": _lr(5, 2)},
        {"q": _lr(6, 3), "k": _lr(7, 4), "v": _lr(8, 2)},
    ]


def _dense(expert: Deltas, module: str) -> torch.Tensor:
    if module not in expert:
        return torch.zeros(16, 12, dtype=torch.float64)  # a missing module is a zero update
    return expert[module].dense(torch.float64)


def _max_diff(lr: LowRank, ref: torch.Tensor) -> float:
    return float((lr.dense(torch.float64) - ref).abs().max())


def _trim_ref(x: torch.Tensor, density: float) -> torch.Tensor:
    """Top-k by magnitude with a full sort (a different algorithm from the kthvalue one)."""
    n = max(1, math.floor(density * x.numel()))  # PEFT's and mergekit's count: int(density * n)
    order = torch.argsort(x.abs().flatten(), descending=True, stable=True)[:n]
    out = torch.zeros(x.numel(), dtype=x.dtype)
    out[order] = x.flatten()[order]
    return out.view_as(x)


def _sign_mean_ref(
    xs: list[torch.Tensor], weights: list[float], sign_on: str = "weighted", divide: str = "weight"
) -> torch.Tensor:
    """TIES elect + merge in float64: majority by mass of the weighted (or unweighted) values; the agreeing
    weighted entries summed and divided by their count, their experts' |weights|, or nothing."""
    ys = torch.stack([w * x for w, x in zip(weights, xs, strict=True)])
    votes = ys if sign_on == "weighted" else torch.stack(xs)
    sign = torch.where(votes.sum(0) >= 0, 1.0, -1.0).double()
    agree = (votes != 0) & (torch.sign(votes) == sign)
    total = (ys * agree).sum(0)
    if divide == "none":
        return total
    w = torch.tensor(weights, dtype=torch.float64).abs().reshape(-1, 1, 1)
    denom = agree.sum(0).double() if divide == "count" else (w * agree).sum(0)
    return torch.where(denom > 0, total / torch.where(denom > 0, denom, 1.0), 0.0)


def _dropped_ref(expert: Deltas, module: str, density: float, seed: int) -> torch.Tensor:
    """DARE drop in float64 with the documented mask: rand(shape, mask_generator(...)) < density."""
    draws = torch.rand(16, 12, generator=mask_generator(seed, module, expert[module]))
    return torch.where(draws < density, _dense(expert, module) / density, 0.0)


def _reference(method: str, experts: list[Deltas], weights: list[float], module: str, **p: float) -> torch.Tensor:
    """The merged ΔW of one module, untruncated, in float64."""
    lam, density, seed = p.get("lam", 1.0), p.get("density", 1.0), int(p.get("seed", 0))
    present = [i for i, e in enumerate(experts) if module in e]
    if method == "uniform":
        return sum(w * _dense(e, module) for w, e in zip(weights, experts, strict=True)) / sum(weights)
    if method == "task_arithmetic":
        return lam * sum(w * _dense(e, module) for w, e in zip(weights, experts, strict=True))
    if method == "ties":
        xs = [_trim_ref(_dense(experts[i], module), density) for i in present]
    else:
        xs = [_dropped_ref(experts[i], module, density, seed) for i in present]
    ws = [weights[i] for i in present]
    if method == "dare_linear":
        return lam * sum(w * x for w, x in zip(ws, xs, strict=True))
    return lam * _sign_mean_ref(xs, ws)


CASES = [
    ("uniform", {}, [1.0, 1.0, 1.0]),
    ("uniform", {}, [1.0, 2.0, 3.0]),
    ("task_arithmetic", {"lam": 0.7}, [0.5, -1.0, 2.0]),
    ("ties", {"lam": 1.2, "density": 0.3}, [1.0, 0.5, -0.8]),
    ("dare_linear", {"lam": 0.9, "density": 0.6, "seed": 5}, [1.0, 2.0, 0.5]),
    ("dare_ties", {"lam": 1.1, "density": 0.4, "seed": 2}, [1.0, -0.5, 1.5]),
]


def _call(method: str, experts: list[Deltas], weights: list[float] | None, p: dict, **kw: object):
    params = {("lambda" if k == "lam" else k): v for k, v in p.items() if k != "seed"}
    return merge_deltas(experts, method, weights=weights, seed=int(p.get("seed", 0)), **params, **kw)


@pytest.mark.parametrize(("method", "p", "weights"), CASES)
def test_method_matches_dense_reference(method: str, p: dict, weights: list[float]) -> None:
    experts = _experts()
    # rank 12 = min(16, 12): nothing is truncated, so the output must equal the reference.
    res = _call(method, experts, weights, p, rank=12)
    assert sorted(res.deltas) == list(MODULES)
    for module in MODULES:
        ref = _reference(method, experts, weights, module, **p)
        # fp32 maths on entries up to ~13: the summation order (thread count) moves the last bits, so the
        # bound scales with the entries (2e-6 relative; a wrong mask or sign would be off by O(1)).
        assert _max_diff(res.deltas[module], ref) < 2e-6 * max(1.0, float(ref.abs().max())), module
        assert res.per_module_error[module] < 1e-5
    assert res.coverage == {"k": [0, 1, 2], "q": [0, 1, 2], "v": [0, 2]}
    assert list(res.coverage) == list(res.deltas) == list(MODULES)  # sorted, though experts list q first


@pytest.mark.parametrize("method", ["uniform", "task_arithmetic"])
def test_linear_methods_are_exact_with_rank_sum(method: str) -> None:
    experts = _experts()
    res = merge_deltas(experts, method)
    assert {m: d.rank for m, d in res.deltas.items()} == {"k": 9, "q": 9, "v": 6}
    assert res.overall_error == 0.0 and set(res.per_module_error.values()) == {0.0}


@pytest.mark.parametrize(("method", "p", "weights"), CASES)
def test_default_and_given_rank_truncate_by_svd(method: str, p: dict, weights: list[float]) -> None:
    experts = _experts()
    rank = None if method in ("ties", "dare_linear", "dare_ties") else 3
    res = _call(method, experts, weights, p, rank=rank)
    num = den = 0.0
    for module in MODULES:
        full = _reference(method, experts, weights, module, **p)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        # default: the smallest rank keeping 90% of ||ΔW||_F^2, from the float64 singular values
        k = 3 if rank else int((torch.cumsum(s**2, 0) < 0.9 * (s**2).sum()).sum()) + 1
        best = (u[:, :k] * s[:k]) @ vh[:k]
        err = float(torch.linalg.norm(full - best))
        assert res.deltas[module].rank == k
        assert _max_diff(res.deltas[module], best) < 1e-4, module
        assert res.per_module_error[module] == pytest.approx(err / float(torch.linalg.norm(full)), abs=1e-5)
        num, den = num + err**2, den + float(torch.linalg.norm(full)) ** 2
    assert res.overall_error == pytest.approx(math.sqrt(num / den), abs=1e-5)


@pytest.mark.parametrize(("method", "params"), [("uniform", {}), ("task_arithmetic", {"lambda": 1.0})])
def test_single_expert_weight_one_returns_itself_exactly(method: str, params: dict) -> None:
    expert = _experts()[0]
    res = merge_deltas([expert], method, weights=[1.0], **params)
    for module, d in expert.items():
        assert torch.equal(res.deltas[module].A, d.A) and torch.equal(res.deltas[module].B, d.B)
    assert res.overall_error == 0.0


@pytest.mark.parametrize(("method", "p", "weights"), CASES)
def test_expert_order_does_not_change_the_result(method: str, p: dict, weights: list[float]) -> None:
    experts = _experts()
    perm = [2, 0, 1]
    a = _call(method, experts, weights, p)
    b = _call(method, [experts[i] for i in perm], [weights[i] for i in perm], p)
    for module in MODULES:
        assert _max_diff(a.deltas[module], b.deltas[module].dense(torch.float64)) < 1e-4, module
        assert a.per_module_error[module] == pytest.approx(b.per_module_error[module], abs=1e-5)
    assert b.coverage["v"] == [0, 1]  # indices follow the new order


def test_ties_density_one_is_the_sign_elected_disjoint_mean() -> None:
    experts, weights = _experts(), [1.0, -0.7, 0.4]
    res = merge_deltas(experts, "ties", weights=weights, rank=12, density=1.0)
    for module in MODULES:
        present = res.coverage[module]
        ref = _sign_mean_ref([_dense(experts[i], module) for i in present], [weights[i] for i in present])
        assert _max_diff(res.deltas[module], ref) < 1e-5
        # ... which differs from the plain weighted sum wherever experts disagree in sign.
        plain = sum(weights[i] * _dense(experts[i], module) for i in present)
        assert float((ref - plain).abs().max()) > 1e-2


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_per_seed(method: str) -> None:
    experts = _experts()
    a = merge_deltas(experts, method, seed=11, density=0.5)
    b = merge_deltas(experts, method, seed=11, density=0.5)
    c = merge_deltas(experts, method, seed=12, density=0.5)
    for module in MODULES:
        assert a.deltas[module].A.numpy().tobytes() == b.deltas[module].A.numpy().tobytes()
        assert a.deltas[module].B.numpy().tobytes() == b.deltas[module].B.numpy().tobytes()
        assert not torch.equal(a.deltas[module].dense(), c.deltas[module].dense())


def test_dare_mask_of_an_expert_ignores_the_other_experts() -> None:
    experts = _experts()
    alone = merge_deltas([experts[0]], "dare_linear", rank=12, density=0.5, seed=4)
    with_others = merge_deltas(
        [experts[2], experts[0]], "dare_linear", weights=[0.0, 1.0], rank=12, density=0.5, seed=4
    )
    for module in MODULES:
        assert _max_diff(alone.deltas[module], with_others.deltas[module].dense(torch.float64)) < 1e-5


# ---------------------------------------------------------------- registry and validation


def test_registry_records() -> None:
    assert available_methods() == [
        "uniform",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "iso_c",
        "tsv",
        "knots",
    ]
    for name, spec in METHODS.items():
        assert spec.name == name and spec.paper.startswith("https://arxiv.org/abs/")
        params = spec.params()
        with pytest.raises(ValidationError):
            params.seed = 3  # frozen
        with pytest.raises(ValidationError):
            spec.params(unknown=1)


def test_lambda_and_lam_are_the_same_parameter() -> None:
    experts = _experts()
    a = merge_deltas(experts, "task_arithmetic", **{"lambda": 0.3})
    b = merge_deltas(experts, "task_arithmetic", lam=0.3)
    assert torch.equal(a.deltas["q"].B, b.deltas["q"].B) and a.params.lam == 0.3


BAD = [
    ({"method": "tiess"}, ConfigError, r"unknown merge method 'tiess'.*uniform, task_arithmetic, ties"),
    ({"method": "ties", "densty": 0.5}, ConfigError, r"densty: Extra inputs.*Accepted parameters: .*density"),
    ({"method": "ties", "density": 0.0}, ConfigError, r"density: .*greater than 0"),
    ({"method": "dare_linear", "density": 1.5}, ConfigError, r"density: .*less than or equal to 1"),
    ({"method": "ties", "weights": [1.0, 2.0]}, ConfigError, r"got 2 weights for 3 experts"),
    ({"method": "task_arithmetic", "weights": [1.0, math.nan, 1.0]}, ConfigError, r"weights\[1\].*finite"),
    ({"method": "task_arithmetic", "lambda": math.inf}, ConfigError, r"lambda.*finite"),
    ({"method": "uniform", "weights": [1.0, -1.0, 1.0]}, ConfigError, r"weights\[1\] are negative"),
    ({"method": "uniform", "rank": 0}, ConfigError, r"rank: .*greater than or equal to 1"),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), BAD)
def test_bad_parameters_raise_config_error(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        merge_deltas(_experts(), **kwargs)


def test_nan_tensor_names_expert_and_module() -> None:
    experts = _experts()
    bad = experts[1]["k"].B.clone()
    bad[3, 1] = math.nan
    experts[1]["k"] = LowRank(experts[1]["k"].A, bad)
    with pytest.raises(CompatibilityError, match=r"expert 1, module 'k': factor B contains NaN"):
        merge_deltas(experts, "uniform")


def test_shape_mismatch_names_module_expected_and_got() -> None:
    experts = _experts()
    experts[2]["v"] = _lr(9, 2, shape=(16, 10))
    with pytest.raises(
        CompatibilityError,
        match=r"module 'v': expert 2 has ΔW shape \(16, 10\), "
        r"expected \(16, 12\)",
    ):
        merge_deltas(experts, "ties")


def test_malformed_experts_are_rejected() -> None:
    with pytest.raises(ConfigError, match="wrap it in a list"):
        merge_deltas(_experts()[0], "uniform")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="non-empty"):
        merge_deltas([], "uniform")
    with pytest.raises(CompatibilityError, match=r"module 'q': A has rank 2 but B has rank 3"):
        merge_deltas([{"q": LowRank(torch.zeros(2, 12), torch.zeros(16, 3))}], "uniform")
    with pytest.raises(CompatibilityError, match="no expert has any module"):
        merge_deltas([{}, {}], "uniform")


def test_validation_happens_before_any_maths(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def spy(job, params):
        calls.append(job.module)
        raise AssertionError("merge maths ran")

    monkeypatch.setitem(registry.METHODS, "ties", dataclasses.replace(METHODS["ties"], merge_module=spy))
    experts = _experts()
    experts[2]["v"] = _lr(9, 2, shape=(16, 10))  # the last module of the last expert is bad
    with pytest.raises(CompatibilityError):
        merge_deltas(experts, "ties")
    assert calls == []


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("lam", [0.25, 1.5])
def test_scaling_a_merge_equals_merging_at_that_lambda(method, lam):
    # The λ search merges once and scales; that must be the merge at λ, truncation error included.
    extra = {} if method == "task_arithmetic" else {"density": 0.5, "rank": 3, "exact_svd": True}
    direct = merge_deltas(_experts(), method, lam=lam, **extra)
    scaled = merge_deltas(_experts(), method, **extra).scaled(lam)
    assert scaled.params.lam == pytest.approx(lam)
    for m in MODULES:
        ref = direct.deltas[m].dense(torch.float64)
        assert _max_diff(scaled.deltas[m], ref) <= 1e-5 * float(ref.abs().max())
        assert scaled.per_module_error[m] == pytest.approx(direct.per_module_error[m], rel=1e-4, abs=1e-7)
