"""RegMean in low-rank form against a dense float64 reference, on the tiny model and its validation data."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.backends.merge.api import merge
from adapterfuse.backends.merge.lambda_search import EvalOptions
from adapterfuse.backends.merge.regmean import RegMeanParams, module_grams, regularise
from adapterfuse.errors import ConfigError
from adapterfuse.tasks.glue import load_task
from tests.conftest import write_glue_dir
from tests.helpers import random_expert

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("regmean") / "glue", n_train=60, n_dev=6)
    return [load_task(t, validation_size=24, max_train=24, glue_dir=root) for t in ("sst2", "rte")]


@pytest.fixture(scope="module")
def experts(tiny_base):
    return [
        random_expert(tiny_base, f"x{i}", rank=2 + i, seed=i, scale=2.0, task=t) for i, t in enumerate(("sst2", "rte"))
    ]


def test_the_gram_matrix_is_the_mean_of_the_module_inputs_outer_products(tiny_base, data):
    options = EvalOptions(autocast=False, batch_size=5)
    gram = module_grams(tiny_base, [Q0], data[0], RegMeanParams(), options)[Q0]
    from adapterfuse.head import iter_batches

    inner = tiny_base.model.model
    xs = []
    with torch.no_grad():
        for _, ids, mask in iter_batches(data[0].task, data[0].validation, tiny_base.tokenizer, 7):
            x = inner.layers[0].input_layernorm(inner.embed_tokens(ids))  # q_proj's input in layer 0
            xs.append(x[mask.bool()].double())
    x = torch.cat(xs)
    torch.testing.assert_close(gram, x.T @ x / len(x), rtol=1e-5, atol=1e-7)


def test_regmean_matches_the_dense_closed_form(tiny_base, experts, data):
    merged = merge(experts, method="regmean", alpha=0.5, base=tiny_base, validation=data, autocast=False)
    options = EvalOptions(autocast=False)
    params = RegMeanParams(alpha=0.5)
    grams = [module_grams(tiny_base, [Q0], td, params, options)[Q0] for td in data]
    g = [regularise(x, 0.5) for x in grams]
    dense = [e.deltas[Q0].dense(torch.float64) for e in experts]
    want = (dense[0] @ g[0] + dense[1] @ g[1]) @ torch.linalg.inv(g[0] + g[1])
    got = merged.deltas[Q0].dense(torch.float64)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    assert merged.deltas[Q0].rank == 2 + 3 and merged.search["regmean"]["tasks"] == ["rte", "sst2"]


def test_one_expert_comes_back_unchanged_and_missing_validation_is_refused(tiny_base, experts, data):
    one = merge(experts[:1], method="regmean", base=tiny_base, validation=data[:1], autocast=False)
    for module, delta in experts[0].deltas.items():
        want = delta.dense(torch.float64)
        assert float((one.deltas[module].dense(torch.float64) - want).abs().max()) < 1e-4 * float(want.abs().max())
    with pytest.raises(ConfigError, match=r"regmean: experts \{'x1': 'rte'\} .* have no validation data"):
        merge(experts, method="regmean", base=tiny_base, validation=data[:1], autocast=False)
    with pytest.raises(ConfigError, match="alpha"):
        merge(experts, method="regmean", alpha=1.5, base=tiny_base, validation=data)
