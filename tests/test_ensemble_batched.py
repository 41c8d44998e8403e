"""The batched K-member forward pass against each member alone through PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.expert import Expert
from adapterfuse.head import iter_batches, predict_proba
from adapterfuse.lowrank import stack_members
from adapterfuse.surgery import StackedLoRALinear
from adapterfuse.tasks.glue import load_task
from adapterfuse.train.expert import train_expert
from tests.helpers import random_expert, tiny_config, write_glue_dir

ATTN = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj")
MLP = ("model.layers.1.mlp.down_proj", "model.layers.0.mlp.gate_proj")


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("ens-batched") / "glue")
    return load_task("sst2", validation_size=8, glue_dir=root)


@pytest.fixture(scope="module")
def adalora(tiny_base, sst2, tmp_path_factory):
    config = tiny_config(method="adalora", adalora_init_r=6, adalora_delta_t=1, max_train_examples=24)
    trained = train_expert(
        tiny_base, "sst2", config, out=tmp_path_factory.mktemp("ens-ada") / "ada", data=sst2, progress=False
    )
    # A second's training moves the singular values E very little; scaling them keeps a valid AdaLoRA
    # adapter (same pruned ranks) whose effect is large enough for the comparison to be able to fail.
    state = {k: v * 300 if "lora_E" in k else v for k, v in trained.state_dict.items()}
    return Expert("ada", trained.config, state, trained.meta)


def alone(expert, base, task, examples) -> torch.Tensor:
    """The reference: the expert attached to (a copy of) the base through PEFT, scored in fp32."""
    return predict_proba(expert.attach(base.model), base.tokenizer, task, examples, autocast=False)


def check_against_peft(experts, base, td, batch_size: int = 7) -> torch.Tensor:
    batched = BatchedEnsemble(base.model, experts)
    log_probs = batched.member_log_probs(base.tokenizer, td.task, td.test, batch_size=batch_size, autocast=False)
    assert log_probs.shape == (len(experts), len(td.test), td.task.n_labels)
    refs = torch.stack([alone(e, base, td.task, td.test) for e in experts])
    torch.testing.assert_close(log_probs.exp(), refs, rtol=0, atol=1e-5)
    return refs


def test_members_of_equal_rank_match_each_member_alone(tiny_base, sst2):
    experts = [random_expert(tiny_base, f"e{i}", rank=4, seed=i, scale=2.0) for i in range(3)]
    refs = check_against_peft(experts, tiny_base, sst2)
    # the check can fail: the members really differ from each other and from the base
    base_probs = predict_proba(tiny_base.model, tiny_base.tokenizer, sst2.task, sst2.test, autocast=False)
    assert (refs[0] - refs[1]).abs().max() > 1e-3 and (refs[2] - base_probs).abs().max() > 1e-3


def test_members_of_different_ranks_and_modules_match_each_member_alone(tiny_base, sst2):
    experts = [
        random_expert(tiny_base, "r2", rank=2, modules=ATTN, seed=1, scale=2.0),
        random_expert(tiny_base, "r8", rank=8, seed=2, scale=2.0),
        random_expert(tiny_base, "r5", rank=5, modules=MLP + ATTN[:1], seed=3, scale=2.0),
    ]
    stacked = stack_members([e.deltas for e in experts], [e.name for e in experts])
    A, B = stacked["model.layers.1.mlp.down_proj"]
    assert A.shape[:2] == (3, 8) and B.shape[2] == 8
    assert not A[0].any() and not B[0].any()  # r2 lacks that module: zeros
    assert not A[2, 5:].any() and not B[2, :, 5:].any()  # r5 padded from rank 5 to 8
    check_against_peft(experts, tiny_base, sst2, batch_size=5)


def test_adalora_member_matches_peft(tiny_base, sst2, adalora):
    ranks = {d.rank for d in adalora.deltas.values()}
    assert adalora.peft_type == "ADALORA" and len(ranks) > 1  # pruned to different ranks per module
    experts = [adalora, random_expert(tiny_base, "lora", rank=3, seed=7, scale=2.0)]
    refs = check_against_peft(experts, tiny_base, sst2)
    base_probs = predict_proba(tiny_base.model, tiny_base.tokenizer, sst2.task, sst2.test, autocast=False)
    assert (refs[0] - base_probs).abs().max() > 1e-3


def test_embeddings_once_and_one_base_matmul_per_layer_per_batch(tiny_base, sst2):
    experts = [random_expert(tiny_base, f"e{i}", rank=2, seed=i) for i in range(4)]
    batched = BatchedEnsemble(tiny_base.model, experts)
    embed_rows, q_rows = [], []
    batched.model.get_input_embeddings().register_forward_hook(lambda m, i, o: embed_rows.append(i[0].shape[0]))
    q = batched.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, StackedLoRALinear)
    q.base.register_forward_hook(lambda m, i, o: q_rows.append(i[0].shape[0]))
    batch_size = 6
    batched.member_log_probs(tiny_base.tokenizer, sst2.task, sst2.test, batch_size=batch_size, autocast=False)
    sizes = [len(idx) for idx, _, _ in iter_batches(sst2.task, sst2.test, tiny_base.tokenizer, batch_size)]
    assert embed_rows == sizes  # once per batch, for the n inputs (not K*n)
    assert q_rows == [4 * n for n in sizes]  # one base matmul over every member's rows


def test_caller_base_is_untouched_and_weights_are_shared(tiny_base, sst2):
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    probs = predict_proba(tiny_base.model, tiny_base.tokenizer, sst2.task, sst2.test, autocast=False)
    batched = BatchedEnsemble(tiny_base.model, [random_expert(tiny_base, "e", rank=4, scale=2.0)])
    batched.member_log_probs(tiny_base.tokenizer, sst2.task, sst2.test, autocast=False)
    assert not any(isinstance(m, StackedLoRALinear) for m in tiny_base.model.modules())
    assert all(torch.equal(before[k], v) for k, v in tiny_base.model.state_dict().items())
    torch.testing.assert_close(
        predict_proba(tiny_base.model, tiny_base.tokenizer, sst2.task, sst2.test, autocast=False), probs, rtol=0, atol=0
    )
    ours = batched.model.get_input_embeddings().weight
    assert ours.data_ptr() == tiny_base.model.get_input_embeddings().weight.data_ptr()  # no copy of the weights


def test_bf16_autocast_stays_close_to_fp32(tiny_base, sst2):
    experts = [random_expert(tiny_base, f"e{i}", rank=4, seed=i, scale=2.0) for i in range(2)]
    batched = BatchedEnsemble(tiny_base.model, experts)
    fp32 = batched.member_log_probs(tiny_base.tokenizer, sst2.task, sst2.test, autocast=False).exp()
    bf16 = batched.member_log_probs(tiny_base.tokenizer, sst2.task, sst2.test, autocast=True).exp()
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=2e-2)


def test_bad_inputs(tiny_base):
    layer = StackedLoRALinear(nn.Linear(4, 3), torch.zeros(2, 1, 4), torch.zeros(2, 3, 1))
    with pytest.raises(ConfigError, match="not a multiple of K=2"):
        layer(torch.zeros(3, 5, 4))
    with pytest.raises(ConfigError, match="at least one expert"):
        BatchedEnsemble(tiny_base.model, [])
    expert = random_expert(tiny_base, "e", rank=2)
    with pytest.raises(ConfigError, match="PEFT model"):
        BatchedEnsemble(expert.attach(tiny_base.model), [expert])
    bad = random_expert(tiny_base, "bad", rank=2, modules=ATTN[:1]).deltas
    bad = {"model.layers.9.self_attn.q_proj": bad[ATTN[0]]}
    with pytest.raises(CompatibilityError, match=r"layers\.9.*not found"):
        BatchedEnsemble(tiny_base.model, [bad])


def test_a_batch_over_max_rows_is_split_and_gives_the_same_answers(tiny_base, sst2):
    experts = [random_expert(tiny_base, f"e{i}", rank=2, seed=i) for i in range(4)]
    whole = BatchedEnsemble(tiny_base.model, experts)
    split = BatchedEnsemble(tiny_base.model, experts, max_rows=8)  # 2 inputs x 4 members per pass
    q_rows = []
    split.model.get_submodule("model.layers.0.self_attn.q_proj").base.register_forward_hook(
        lambda m, i, o: q_rows.append(i[0].shape[0])
    )
    ref = whole.member_log_probs(tiny_base.tokenizer, sst2.task, sst2.test, batch_size=6, autocast=False)
    got = split.member_log_probs(tiny_base.tokenizer, sst2.task, sst2.test, batch_size=6, autocast=False)
    assert max(q_rows) == 8
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="max_rows"):
        BatchedEnsemble(tiny_base.model, experts, max_rows=0)
