"""CAMERO: shared bottom adapters, per-member top adapters, perturbations and the consistency loss."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.errors import ConfigError
from adapterfuse.head import encode, label_token_ids, member_logits, pad
from adapterfuse.tasks.glue import load_task
from adapterfuse.train.pe.camero import consistency_loss, perturbation
from adapterfuse.train.pe.layers import flat_tensors, load_flat
from adapterfuse.train.pe.options import PEOptions
from adapterfuse.train.pe.train import members_loss, prepare_model
from tests.helpers import tiny_config, write_glue_dir

K = 3
OPTS = PEOptions(camero_shared_layers=1, camero_perturbation="none", camero_consistency=0.0)


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("pe-camero") / "glue")
    return load_task("sst2", validation_size=8, glue_dir=root)


@torch.no_grad()
def randomize(layers, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        layer.B.copy_(torch.randn(layer.B.shape, generator=gen) * 0.5)


def camero_model(base, k: int = K, opts: PEOptions = OPTS):
    return prepare_model(base, "camero", k, tiny_config(), opts)


def batch(base, td, n: int = 5):
    ids, mask = pad(encode(td.task, td.test[:n], base.tokenizer), base.tokenizer.pad_token_id)
    return ids, mask, [e.label for e in td.test[:n]], label_token_ids(td.task, base.tokenizer)


def test_layout_shares_the_bottom_layers_only(tiny_base):
    _, layers, layout = camero_model(tiny_base)
    assert {m: v for m, v in layout.items() if ".layers.0." in m} == dict.fromkeys(
        [m for m in layout if ".layers.0." in m], "shared"
    )
    assert all(v == "independent" for m, v in layout.items() if ".layers.1." in m)
    top = layers["model.layers.1.self_attn.q_proj"]
    assert top.A.shape[0] == K and not torch.equal(top.A[0], top.A[1])  # members start apart
    _, _, default = camero_model(tiny_base, opts=PEOptions())
    assert default == layout  # default: half of the 2 layers shared
    with pytest.raises(ConfigError, match="only 2 decoder layers"):
        camero_model(tiny_base, opts=PEOptions(camero_shared_layers=3))


def _grads(layers):
    return {f"{m}.{n}": p.grad.detach().clone() for m, layer in layers.items() for n, p in layer.tensors().items()}


def _batched_grads(base, td, consistency: float):
    model, layers, layout = camero_model(base)
    randomize(layers, seed=0)
    ids, mask, y, labels = batch(base, td)
    logits = member_logits(model, ids, mask, labels, K)
    members_loss(td.task, logits, [y] * K, consistency=consistency).backward()
    return logits.detach(), _grads(layers), flat_tensors(layers), layout


def test_no_consistency_no_perturbation_equals_independent_members_on_shared_bottom(tiny_base, sst2):
    logits, batched, trained, layout = _batched_grads(tiny_base, sst2, consistency=0.0)
    ids, mask, y, labels = batch(tiny_base, sst2)
    separate_logits, separate = [], []
    for j in range(K):
        single, single_layers, _ = camero_model(tiny_base, k=1)
        load_flat(
            single_layers,
            {n: t[j : j + 1] if layout[n.rpartition(".")[0]] == "independent" else t for n, t in trained.items()},
        )
        one = member_logits(single, ids, mask, labels, 1)
        members_loss(sst2.task, one, [y]).backward()
        separate_logits.append(one[0].detach())
        separate.append(_grads(single_layers))
    torch.testing.assert_close(logits, torch.stack(separate_logits), rtol=0, atol=1e-5)
    for name, g in batched.items():
        if layout[name.rpartition(".")[0]] == "independent":  # each member's own top adapter
            want = torch.cat([s[name] for s in separate]) / K
        else:  # the shared bottom: the mean of the members' gradients
            want = torch.stack([s[name] for s in separate]).mean(dim=0)
        torch.testing.assert_close(g, want, rtol=0, atol=1e-5)
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # members differ: the check can fail
    # With a consistency weight the gradients change (so the comparison above is not vacuous).
    _, with_consistency, _, _ = _batched_grads(tiny_base, sst2, consistency=1.0)
    assert any((with_consistency[n] - batched[n]).abs().max() > 1e-6 for n in batched)


def test_perturbation_differs_per_member_and_only_inside_the_block(tiny_base, sst2):
    model, layers, _ = camero_model(tiny_base)
    with torch.no_grad():
        for layer in layers.values():  # identical members: any difference comes from the perturbation
            layer.B.zero_()
    ids, mask, _, labels = batch(tiny_base, sst2)
    with torch.no_grad():
        clean = member_logits(model, ids, mask, labels, K)
        torch.manual_seed(0)
        with perturbation(model, 1, "noise", 0.5):
            noisy = member_logits(model, ids, mask, labels, K)
        after = member_logits(model, ids, mask, labels, K)
    torch.testing.assert_close(clean[0], clean[1], rtol=0, atol=1e-6)
    assert (noisy[0] - noisy[1]).abs().max() > 1e-4
    torch.testing.assert_close(after, clean, rtol=0, atol=0)  # the hook is removed


def test_consistency_loss_is_zero_for_identical_members_and_positive_otherwise():
    same = torch.randn(1, 4, 2).repeat(3, 1, 1)
    assert float(consistency_loss(same)) == pytest.approx(0.0, abs=1e-7)
    assert float(consistency_loss(torch.randn(3, 4, 2))) > 0
    assert float(consistency_loss(torch.randn(1, 4, 2))) == pytest.approx(0.0, abs=1e-7)
