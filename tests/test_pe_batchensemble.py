"""BatchEnsemble / TabM LoRA: members against the shared LoRA, PEFT, and K separate training steps."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.delta import LowRank, peft_from_deltas
from adapterfuse.expert import Expert
from adapterfuse.head import encode, label_logits, label_token_ids, member_logits, pad
from adapterfuse.tasks.glue import load_task
from adapterfuse.train.pe.batchensemble import init_rank1, split_rows
from adapterfuse.train.pe.layers import flat_tensors, load_flat, member_deltas
from adapterfuse.train.pe.options import PEOptions
from adapterfuse.train.pe.predictor import PEEnsemble
from adapterfuse.train.pe.train import members_loss, prepare_model
from tests.helpers import tiny_config, write_glue_dir

K = 3


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("pe-be") / "glue")
    return load_task("sst2", validation_size=8, glue_dir=root)


def batch(base, td, n: int = 6):
    ids, mask = pad(encode(td.task, td.test[:n], base.tokenizer), base.tokenizer.pad_token_id)
    return ids, mask, [e.label for e in td.test[:n]], label_token_ids(td.task, base.tokenizer)


@torch.no_grad()
def randomize(layers, seed: int = 0, rank1: bool = True) -> None:
    """Non-zero B (A is random already) and far-from-1 r, s, so every check below can fail."""
    gen = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        layer.B.copy_(torch.randn(layer.B.shape, generator=gen) * 0.5)
        if rank1 and layer.mode == "batchensemble":
            layer.r.copy_(1 + 0.5 * torch.randn(layer.r.shape, generator=gen))
            layer.s.copy_(1 + 0.5 * torch.randn(layer.s.shape, generator=gen))


def be_model(base, k: int = K, **config):
    return prepare_model(base, "batchensemble", k, tiny_config(**config), PEOptions())


def test_member_with_unit_rank1_vectors_equals_the_shared_lora(tiny_base, sst2):
    model, layers, _ = be_model(tiny_base)
    randomize(layers)
    with torch.no_grad():
        for layer in layers.values():
            layer.r[0], layer.s[0] = 1.0, 1.0
    ids, mask, _, labels = batch(tiny_base, sst2)
    with torch.no_grad():
        ours = member_logits(model.eval(), ids, mask, labels, K)
    scale = tiny_config().lora_alpha / tiny_config().rank
    shared = {m: LowRank(layer.A.detach().clone(), layer.B.detach() * scale) for m, layer in layers.items()}
    state, config = peft_from_deltas(shared, tiny_base.spec)
    peft = Expert("shared", config, state).attach(tiny_base.model)
    with torch.no_grad():
        ref = label_logits(peft, ids, mask, labels)
    torch.testing.assert_close(ours[0], ref, rtol=0, atol=1e-5)
    assert (ours[1] - ref).abs().max() > 1e-3  # other members differ: the comparison can fail


def test_exported_members_run_in_the_ensemble_backend_as_trained(tiny_base, sst2):
    model, layers, layout = be_model(tiny_base)
    randomize(layers, seed=1)
    ids, mask, _, labels = batch(tiny_base, sst2)
    with torch.no_grad():
        ours = torch.log_softmax(member_logits(model.eval(), ids, mask, labels, K), dim=-1)
    scale = tiny_config().lora_alpha / tiny_config().rank
    deltas = member_deltas(layout, flat_tensors(layers), K, scale)
    batched = BatchedEnsemble(tiny_base.model, deltas)
    with torch.no_grad():
        theirs = torch.log_softmax(batched.member_logits(ids, mask, labels), dim=-1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def _grads(layers):
    return {f"{m}.{n}": p.grad.detach().clone() for m, layer in layers.items() for n, p in layer.tensors().items()}


@pytest.mark.parametrize("be_data", ["all", "split"])
def test_batched_step_equals_k_separate_member_steps(tiny_base, sst2, be_data):
    model, layers, _ = be_model(tiny_base)
    randomize(layers, seed=2)
    ids, mask, y, labels = batch(tiny_base, sst2, n=6)
    task = sst2.task
    if be_data == "all":
        member_rows = [list(range(6))] * K
        logits = member_logits(model, ids, mask, labels, K)
    else:
        order = split_rows(list(range(6)), K)
        member_rows = [order[j * 2 : (j + 1) * 2] for j in range(K)]
        logits = member_logits(model, ids[order], mask[order], labels, K, replicate=False)
    members_loss(task, logits, [[y[i] for i in rows] for rows in member_rows]).backward()
    batched = _grads(layers)
    trained = flat_tensors(layers)

    separate = []
    for j in range(K):
        single, single_layers, _ = be_model(tiny_base, k=1)
        load_flat(single_layers, {n: (t[j : j + 1] if n.endswith((".r", ".s")) else t) for n, t in trained.items()})
        rows = member_rows[j]
        one = member_logits(single, ids[rows], mask[rows], labels, 1)
        members_loss(task, one, [[y[i] for i in rows]]).backward()
        separate.append(_grads(single_layers))
    for name, g in batched.items():
        if name.endswith((".r", ".s")):  # a member's own vectors: 1/K of its separate gradient (mean loss)
            want = torch.cat([s[name] for s in separate]) / K
        else:  # the shared factors: the mean of the members' gradients
            want = torch.stack([s[name] for s in separate]).mean(dim=0)
        torch.testing.assert_close(g, want, rtol=0, atol=1e-5)
    assert max(float(g.abs().max()) for g in batched.values()) > 1e-3  # gradients are not all ~0


def test_split_rows_gives_equal_member_blocks_without_dropping_rows():
    assert split_rows([10, 11, 12, 13, 14, 15], 3) == [10, 13, 11, 14, 12, 15]
    out = split_rows([1, 2, 3, 4, 5], 2)
    assert len(out) == 6 and set(out) == {1, 2, 3, 4, 5}


def test_rank1_init_is_near_one_seeded_and_differs_between_members(tiny_base):
    _, a, _ = be_model(tiny_base)
    _, b, _ = be_model(tiny_base)
    _, c, _ = be_model(tiny_base, seed=1)
    layer = next(iter(a.values()))
    assert torch.unique(layer.r).tolist() == pytest.approx([0.9, 1.1])
    assert not torch.equal(layer.r[0], layer.r[1])
    assert all(torch.equal(a[m].r, b[m].r) and torch.equal(a[m].s, b[m].s) for m in a)
    assert not torch.equal(layer.r, next(iter(c.values())).r)
    init_rank1(a, 0.0, 0)
    assert torch.equal(layer.r, torch.ones_like(layer.r))


def test_merged_back_into_one_adapter_is_the_mean_update(tiny_base):
    _, layers, layout = be_model(tiny_base)
    randomize(layers, seed=3)
    manifest = {
        "method": "batchensemble",
        "members": K,
        "layout": layout,
        "rank": 4,
        "scale": 2.0,
        "task": "sst2",
        "base": {"spec": tiny_base.spec, "fingerprint": tiny_base.fingerprint},
    }
    ens = PEEnsemble(manifest, flat_tensors(layers))
    merged = ens.merged()
    members = ens.member_deltas()
    for module, d in merged.deltas.items():
        want = torch.stack([m[module].dense() for m in members]).mean(dim=0)
        torch.testing.assert_close(d.dense(), want, rtol=1e-5, atol=1e-6)
    assert merged.peft_type == "LORA" and merged.meta["merged_from"]["members"] == K
