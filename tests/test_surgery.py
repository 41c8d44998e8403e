"""Model surgery: the weight-sharing copy, the installer of layers by module name, and the stacked layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterfuse.delta import LowRank
from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.lowrank import slot_factors, stack_members
from adapterfuse.surgery import StackedLoRALinear, blockwise_lowrank, replace_linear, shared_copy
from tests.helpers import random_expert

Q = "model.layers.0.self_attn.q_proj"


def _factors(seed: int, rank: int, in_dim: int = 12, out_dim: int = 10) -> LowRank:
    gen = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(rank, in_dim, generator=gen), torch.randn(out_dim, rank, generator=gen))


def test_shared_copy_shares_every_weight_and_swaps_without_touching_the_original(tiny_base):
    copy = shared_copy(tiny_base.model)
    ours, theirs = dict(copy.named_parameters()), dict(tiny_base.model.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[n].data_ptr() == theirs[n].data_ptr() for n in ours)  # no second base in memory
    original = tiny_base.model.get_submodule(Q)
    layer = replace_linear(
        copy, Q, lambda target: StackedLoRALinear(target, torch.zeros(1, 2, 32), torch.zeros(1, 32, 2)), (32, 32)
    )
    assert copy.get_submodule(Q) is layer and layer.base.weight is original.weight
    assert tiny_base.model.get_submodule(Q) is original and isinstance(original, nn.Linear)


def test_replace_linear_refuses_a_missing_module_a_non_linear_and_another_shape(tiny_base):
    copy = shared_copy(tiny_base.model)

    def build(target):
        return nn.Identity()

    with pytest.raises(CompatibilityError, match=r"'model\.layers\.9\.self_attn\.q_proj': not found"):
        replace_linear(copy, "model.layers.9.self_attn.q_proj", build)
    with pytest.raises(CompatibilityError, match=r"'model\.layers\.0\.self_attn': is a \w+, expected nn\.Linear"):
        replace_linear(copy, "model.layers.0.self_attn", build)
    with pytest.raises(CompatibilityError, match=r"base weight is \(32, 32\), the update's ΔW is \(32, 16\)"):
        replace_linear(copy, Q, build, (32, 16))
    assert isinstance(copy.get_submodule(Q), nn.Linear)  # nothing was swapped


def test_one_member_equals_the_plain_peft_lora_forward(tiny_base):
    expert = random_expert(tiny_base, "e", rank=4, modules=(Q,), seed=3, scale=2.0)
    delta = expert.deltas[Q]
    peft_layer = expert.attach(tiny_base.model).get_submodule(f"base_model.model.{Q}")
    layer = StackedLoRALinear(tiny_base.model.get_submodule(Q), delta.A[None].float(), delta.B[None].float())
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs, plain = layer(x), peft_layer(x), tiny_base.model.get_submodule(Q)(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours - plain).abs().max() > 1e-3  # the update is really there


def test_member_blocks_each_get_their_own_update():
    base = nn.Linear(12, 10)
    members = [{"m": _factors(1, 2)}, {"m": _factors(2, 3)}]
    A, B = stack_members(members, ["a", "b"])["m"]
    layer = StackedLoRALinear(base, A, B)
    x = torch.randn(4, 6, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x)
        for k, member in enumerate(members):
            rows = x[2 * k : 2 * k + 2]
            torch.testing.assert_close(
                y[2 * k : 2 * k + 2], base(rows) + rows @ member["m"].dense().T, rtol=0, atol=1e-5
            )
    with pytest.raises(ConfigError, match="5 rows is not a multiple of K=2"):
        blockwise_lowrank(torch.zeros(5, 12), A, B)


@pytest.mark.parametrize("weighting", ["row", "token"])
def test_weighted_layers_equal_the_weighted_sum_of_the_members_updates(weighting):
    base = nn.Linear(12, 10)
    factors = [_factors(1, 2), None, _factors(3, 4)]  # the middle member lacks this module
    stacked, slots = slot_factors(factors)
    assert stacked.A.shape == (6, 12) and slots.tolist() == [0, 0, 2, 2, 2, 2]
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0))
    w = torch.softmax(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)), dim=1)

    class Fixed(StackedLoRALinear):
        def mix_weights(self, h):  # each token takes its row's weights
            return w.repeat_interleave(5, dim=0)

    layer = (StackedLoRALinear if weighting == "row" else Fixed)(base, stacked.A, stacked.B, slots, weighting)
    layer.weights = w
    with torch.no_grad():
        got = layer(x)
        want = base(x) + sum(w[:, e, None, None] * (x @ f.dense().T) for e, f in enumerate(factors) if f is not None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_row_layer_needs_its_weights_and_fp32_holds_under_autocast():
    base = nn.Linear(12, 10)
    stacked, slots = slot_factors([_factors(1, 2), _factors(2, 2)])
    layer = StackedLoRALinear(base, stacked.A, stacked.B, slots, "row", fp32=True)
    x = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"one row of member weights per batch row \(2\), got None"):
        layer(x)
    layer.weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # row 0 is member 0, row 1 member 1
    with torch.no_grad():
        exact = torch.stack(
            [(x[0] @ stacked.A[:2].T) @ stacked.B[:, :2].T, (x[1] @ stacked.A[2:].T) @ stacked.B[:, 2:].T]
        )  # fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = base(x)
            got = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(got, y + exact.to(y.dtype))  # the low-rank part is fp32, rounded once at the end


def test_bad_weightings_are_refused():
    base = nn.Linear(4, 3)
    with pytest.raises(ConfigError, match="weighting 'expert': unknown"):
        StackedLoRALinear(base, torch.zeros(2, 4), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), "expert")
    with pytest.raises(ConfigError, match="weighting 'row': expected the rank slots"):
        StackedLoRALinear(base, torch.zeros(2, 4), torch.zeros(3, 2), weighting="row")
