"""Fisher merging against a reference built from plain autograd on the tiny model and its validation data."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.backends.merge.api import merge
from adapterfuse.backends.merge.fisher import FisherParams, expert_fisher
from adapterfuse.errors import ConfigError
from adapterfuse.head import encode, label_logits, label_token_ids, pad, task_loss
from adapterfuse.tasks.glue import load_task
from tests.conftest import write_glue_dir
from tests.helpers import random_expert

Q0 = "model.layers.0.self_attn.q_proj"
UP1 = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("fisher") / "glue", n_train=40, n_dev=6)
    return [load_task(t, validation_size=10, max_train=10, glue_dir=root) for t in ("sst2", "stsb")]


@pytest.fixture(scope="module")
def experts(tiny_base):
    return [
        random_expert(tiny_base, f"x{i}", rank=2 + i, seed=i, scale=2.0, task=t) for i, t in enumerate(("sst2", "stsb"))
    ]


def _reference_fisher(base, expert, task_data, module, adapted=None):
    """Mean over inputs of the squared gradient of each input's loss in the module's weight, at the expert
    (its updates added to the weights of ``adapted`` modules, by default all of them)."""
    adapted = list(expert.deltas) if adapted is None else adapted
    originals = {m: base.model.get_submodule(m).weight.data.clone() for m in adapted}
    linear = base.model.get_submodule(module)
    labels = label_token_ids(task_data.task, base.tokenizer)
    total = torch.zeros_like(linear.weight, dtype=torch.float64)
    try:
        for m in adapted:
            base.model.get_submodule(m).weight.data = originals[m] + expert.deltas[m].dense()
        linear.weight.requires_grad_(True)
        for example in task_data.validation:
            ids, mask = pad(encode(task_data.task, [example], base.tokenizer), base.tokenizer.pad_token_id)
            loss = task_loss(task_data.task, label_logits(base.model, ids, mask, labels), [example.label])
            (grad,) = torch.autograd.grad(loss, linear.weight)
            total += grad.double().square()
    finally:
        linear.weight.requires_grad_(False)
        for m, weight in originals.items():
            base.model.get_submodule(m).weight.data = weight
    return total / len(task_data.validation)


@pytest.mark.parametrize("module", [Q0, UP1])
def test_the_fisher_is_the_mean_squared_per_input_gradient(tiny_base, experts, data, module):
    got = expert_fisher(tiny_base, experts[1].deltas, [module], data[1], FisherParams(batch_size=3), autocast=False)
    want = _reference_fisher(tiny_base, experts[1], data[1], module, adapted=[module])
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(got[module].double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_fisher_merge_is_the_fisher_weighted_mean_of_the_updates(tiny_base, experts, data):
    merged = merge(
        experts, method="fisher", weights=[1.0, 3.0], rank="exact", base=tiny_base, validation=data, autocast=False
    )
    fishers = [_reference_fisher(tiny_base, e, d, Q0) for e, d in zip(experts, data, strict=True)]
    floor = 1e-6 * float(torch.stack(fishers).max())
    weighted = [w * (f + floor) for w, f in zip([1.0, 3.0], fishers, strict=True)]
    dense = [e.deltas[Q0].dense(torch.float64) for e in experts]
    want = (weighted[0] * dense[0] + weighted[1] * dense[1]) / (weighted[0] + weighted[1])
    got = merged.deltas[Q0].dense(torch.float64)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    # neither expert alone, nor their plain mean: the Fisher decides entry by entry
    plain = (dense[0] + 3.0 * dense[1]) / 4.0
    assert float((got - plain).abs().max()) > 1e-2 * float(want.abs().max())
    assert merged.method == "fisher" and merged.search["fisher"]["tasks"] == ["sst2", "stsb"]


def test_one_expert_comes_back_and_bad_inputs_are_refused(tiny_base, experts, data):
    one = merge(experts[:1], method="fisher", rank="exact", base=tiny_base, validation=data[:1], autocast=False)
    for module, delta in experts[0].deltas.items():
        want = delta.dense(torch.float64)
        assert float((one.deltas[module].dense(torch.float64) - want).abs().max()) < 1e-5 * float(want.abs().max())
    with pytest.raises(ConfigError, match=r"fisher: experts \{'x1': 'stsb'\} .* have no validation data"):
        merge(experts, method="fisher", base=tiny_base, validation=data[:1], autocast=False)
    with pytest.raises(
        ConfigError, match=r"fisher: weights \{.*'x1': 0.0.*\} \(expert: weight\); expected every weight > 0"
    ):
        merge(experts, method="fisher", weights=[1.0, 0.0], base=tiny_base, validation=data, autocast=False)
    with pytest.raises(ConfigError, match="floor"):
        merge(experts, method="fisher", floor=0.0, base=tiny_base, validation=data)
