"""TIES' sign-election conventions (ours, PEFT's, mergekit's) against float64 references and the tools themselves."""

from __future__ import annotations

import copy
import itertools

import peft
import pytest
import torch
from packaging import version

from adapterfuse.backends.merge.common import CONVENTIONS, DareParams, ModuleJob, TiesParams
from adapterfuse.backends.merge.dare_linear import dropped_stack
from adapterfuse.backends.merge.functional import elected_merge_, trim_by_magnitude
from adapterfuse.backends.merge.registry import merge_deltas
from adapterfuse.delta import Deltas, LowRank
from adapterfuse.errors import ConfigError
from tests.helpers import make_tiny_model


def _lr(seed: int, rank: int, shape: tuple[int, int] = (10, 8)) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g))


def _entry_ref(xs: list[float], weights: list[float], sign_on: str, divide: str) -> float:
    """One entry, written out in float64 from the definitions in docs/merge.md."""
    votes = [w * x for w, x in zip(weights, xs, strict=True)] if sign_on == "weighted" else list(xs)
    sign = 1.0 if sum(votes) >= 0 else -1.0
    agree = [i for i, v in enumerate(votes) if v != 0 and (v > 0) == (sign > 0)]
    total = sum(weights[i] * xs[i] for i in agree)
    if divide == "none":
        return total
    denom = len(agree) if divide == "count" else sum(abs(weights[i]) for i in agree)
    return total / denom if denom else 0.0


def _dense_ref(xs: torch.Tensor, weights: list[float], sign_on: str, divide: str) -> torch.Tensor:
    out = torch.zeros(xs.shape[1:], dtype=torch.float64)
    for r, c in itertools.product(range(xs.shape[1]), range(xs.shape[2])):
        out[r, c] = _entry_ref([float(v) for v in xs[:, r, c].double()], weights, sign_on, divide)
    return out


SIGN_ON = ["weighted", "unweighted"]
DIVIDE = ["count", "weight", "none"]


def test_one_entry_gives_each_tools_number() -> None:
    # Values (+1, +1, -1) with weights (0.5, 1, 2), nothing trimmed: PEFT 0.75; mergekit -1.0 (normalize: true)
    # and -2.0 (normalize: false); weighted sign with a count divisor gives -2.0.
    experts = [{"m": LowRank(torch.ones(1, 1), torch.tensor([[v]]))} for v in (1.0, 1.0, -1.0)]
    got = {
        kw: merge_deltas(experts, "ties", weights=[0.5, 1.0, 2.0], density=1.0, **dict(kw)).deltas["m"].dense().item()
        for kw in [(("convention", "peft"),), (("convention", "mergekit"),), (("divide", "none"),), ()]
    }
    assert got == {
        (("convention", "peft"),): 0.75,
        (("convention", "mergekit"),): -1.0,
        (("divide", "none"),): -2.0,
        (): -1.0,  # the default is mergekit's convention
    }
    assert merge_deltas(experts, "ties", weights=[0.5, 1.0, 2.0], density=1.0, divide="count").deltas[
        "m"
    ].dense().item() == pytest.approx(-2.0)


@pytest.mark.parametrize(("sign_on", "divide"), list(itertools.product(SIGN_ON, DIVIDE)))
def test_elected_merge_matches_the_entrywise_reference(sign_on: str, divide: str) -> None:
    xs = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(3))
    xs[1, 0, :] = 0.0  # trimmed entries never agree
    xs[:, 2, 3] = 0.0  # nobody has mass here -> 0
    weights = [1.0, 0.5, -2.0, 3.0]  # a negative weight flips that expert's weighted vote
    out = elected_merge_(xs.clone(), torch.tensor(weights), sign_on, divide)
    assert float((out.double() - _dense_ref(xs, weights, sign_on, divide)).abs().max()) < 1e-5
    assert float(out[2, 3]) == 0.0


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize(("sign_on", "divide"), list(itertools.product(SIGN_ON, DIVIDE)))
def test_each_convention_of_a_method_matches_its_float64_reference(method: str, sign_on: str, divide: str) -> None:
    experts: list[Deltas] = [{"m": _lr(1, 3)}, {"m": _lr(2, 2)}, {"m": _lr(3, 4)}]
    weights = [0.5, 1.0, 2.0]
    res = merge_deltas(
        experts, method, weights=weights, density=0.4, rank="exact", sign_on=sign_on, divide=divide, lam=0.7
    )
    if method == "ties":
        xs = torch.stack([trim_by_magnitude(e["m"].dense(torch.float64), 0.4) for e in experts])
    else:  # the DARE masks dare_ties draws (content-seeded, see dare_linear.mask_seed)
        job = ModuleJob("m", (0, 1, 2), tuple(e["m"] for e in experts), tuple(weights), tuple(weights))
        xs = dropped_stack(job, DareParams(density=0.4)).double()
    ref = 0.7 * _dense_ref(xs, weights, sign_on, divide)
    assert float((res.deltas["m"].dense(torch.float64) - ref).abs().max()) < 1e-5 * max(1.0, float(ref.abs().max()))
    assert res.per_module_error["m"] == 0.0 and res.deltas["m"].rank == 8  # exact: min(out, in)


def test_presets_set_both_fields_and_refuse_a_contradiction() -> None:
    for name, (sign_on, divide) in CONVENTIONS.items():
        params = TiesParams(convention=name)
        assert (params.sign_on, params.divide) == (sign_on, divide)
    assert TiesParams(convention="peft", divide="count").divide == "count"  # agreeing is fine
    with pytest.raises(ConfigError, match=r"convention 'peft' means sign_on='unweighted', divide='count'"):
        merge_deltas([{"m": _lr(1, 2)}], "ties", convention="peft", divide="weight")
    with pytest.raises(ConfigError, match=r"convention: Input should be 'mergekit' or 'peft'"):
        merge_deltas([{"m": _lr(1, 2)}], "ties", convention="ours")
    with pytest.raises(ConfigError, match=r"divide: Input should be 'count', 'weight' or 'none'"):
        merge_deltas([{"m": _lr(1, 2)}], "dare_ties", divide="mean")


def test_equal_weights_make_every_normalised_convention_the_same() -> None:
    experts: list[Deltas] = [{"m": _lr(s, 3)} for s in (4, 5, 6)]
    outs = [
        merge_deltas(experts, "ties", rank="exact", sign_on=s, divide=d).deltas["m"].dense()
        for s in SIGN_ON
        for d in ("count", "weight")
    ]
    for out in outs[1:]:
        assert torch.allclose(out, outs[0], atol=1e-6)


# ---------------------------------------------------------------- PEFT


def test_trim_keeps_the_entries_peft_keeps() -> None:
    from peft.utils.merge_utils import magnitude_based_pruning

    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(trim_by_magnitude(x, 0.2) != 0, magnitude_based_pruning(x, 0.2) != 0)  # 204 of 1024


def test_peft_ties_function_matches_the_peft_convention() -> None:
    from peft.utils.merge_utils import ties

    xs = [_lr(s, 3).dense() for s in (7, 8, 9)]
    weights = torch.tensor([0.5, 1.0, 2.0])
    want = ties(xs, weights, density=0.3)
    stack = torch.stack([trim_by_magnitude(x, 0.3) for x in xs])
    got = elected_merge_(stack, weights, *CONVENTIONS["peft"])
    assert float((got - want).abs().max()) < 1e-6


@pytest.mark.skipif(
    version.parse(peft.__version__) < version.parse("0.21"),
    reason="PEFT before 0.21 applied each adapter's scaling twice in its *_svd merges (fixed in 0.21.0)",
)
def test_peft_ties_svd_matches_the_peft_convention(tokenizer) -> None:
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(tokenizer)
    targets = ["q_proj", "o_proj"]  # 32 x 32, so svd_rank 32 keeps everything and nothing is truncated
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    peft_model.add_adapter("b", LoraConfig(r=2, lora_alpha=3, target_modules=targets))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # PEFT initialises B at zero; give both adapters an update
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    experts = [
        {n: LowRank(m.lora_A[a].weight.detach(), m.lora_B[a].weight.detach() * m.scaling[a]) for n, m in layers.items()}
        for a in ("default", "b")
    ]
    weights = [0.5, 1.5]
    peft_model.add_weighted_adapter(
        ["default", "b"], weights, "ties", combination_type="ties_svd", density=0.3, svd_rank=32
    )
    ours = merge_deltas(experts, "ties", weights=weights, density=0.3, rank="exact", convention="peft")
    for name, layer in layers.items():
        want = layer.get_delta_weight("ties").double()
        assert float((ours.deltas[name].dense(torch.float64) - want).abs().max()) < 1e-5 * float(want.abs().max())
    default = merge_deltas(experts, "ties", weights=weights, density=0.3, rank="exact")
    assert any(  # with unequal weights the default (mergekit's) convention is a different merge
        float((default.deltas[n].dense() - ours.deltas[n].dense()).abs().max()) > 1e-3 for n in layers
    )


# ---------------------------------------------------------------- mergekit


@pytest.mark.parametrize(("normalize", "fields"), [(True, {"convention": "mergekit"}), (False, {"divide": "none"})])
def test_mergekit_ties_matches_the_mergekit_convention(normalize: bool, fields: dict) -> None:
    pytest.importorskip("mergekit", reason="mergekit is not installed (pip install -e '.[dev]' installs it)")
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get

    experts = [{"m": _lr(s, 3, (24, 20))} for s in (10, 11, 12)]
    weights, density = [0.5, 1.0, 2.0], 0.3
    # A zero base: each model's tensor is its ΔW itself, so mergekit's task vectors carry no rounding.
    tensors = [torch.zeros(24, 20)] + [e["m"].dense() for e in experts]
    group = TensorGroup.from_tensors(tensors, base_index=0)
    ids = [e.id for e in group.entries if not e.is_base]
    want = get("ties").merge_group(
        group,
        normalize=normalize,
        rescale=False,
        int8_mask=False,
        **{"lambda": 1.0},
        weight=dict(zip(ids, weights, strict=True)),
        density=dict.fromkeys(ids, density),
    )
    ours = merge_deltas(experts, "ties", weights=weights, density=density, rank="exact", **fields)
    assert float((ours.deltas["m"].dense() - want).abs().max()) < 1e-5 * float(want.abs().max())
