"""MIMO on a causal LM: packing, per-slot answers, and the predictor that feeds one input K times."""

from __future__ import annotations

import pytest
import torch

from adapterfuse.head import encode, label_token_ids, member_logits, pad, predict_proba
from adapterfuse.tasks.glue import load_task
from adapterfuse.train.pe.layers import flat_tensors
from adapterfuse.train.pe.mimo import pack, slot_logits, slot_rows
from adapterfuse.train.pe.options import PEOptions
from adapterfuse.train.pe.predictor import PEEnsemble
from adapterfuse.train.pe.train import prepare_model
from tests.helpers import tiny_config, write_glue_dir


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    root = write_glue_dir(tmp_path_factory.mktemp("pe-mimo") / "glue")
    return load_task("sst2", validation_size=8, glue_dir=root)


def test_pack_places_each_slot_and_its_answer_position():
    ids, mask, pos = pack([[[1, 2], [3]], [[4, 5, 6], [7, 8]]], separator=[9], pad_id=0)
    assert ids.tolist() == [[1, 2, 9, 4, 5, 6], [3, 9, 7, 8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert pos.tolist() == [[1, 0], [5, 3]]


def test_slot_rows_are_seeded_permutations_of_the_batch():
    slots = slot_rows([5, 6, 7, 8, 9, 10], 3, seed=0, step=4)
    assert slots[0] == [5, 6, 7, 8, 9, 10] and all(sorted(s) == slots[0] for s in slots)
    assert slots == slot_rows([5, 6, 7, 8, 9, 10], 3, seed=0, step=4) != slot_rows([5, 6, 7, 8, 9, 10], 3, 0, 5)


def test_input_repetition_fills_every_slot_of_a_repeated_row_with_its_first_example():
    rows = list(range(40))
    plain = slot_rows(rows, 3, seed=1, step=2)
    assert slot_rows(rows, 3, seed=1, step=2, repeat=1.0) == [rows] * 3
    half = slot_rows(rows, 3, seed=1, step=2, repeat=0.5)
    assert half == slot_rows(rows, 3, seed=1, step=2, repeat=0.5)
    repeated = [i for i in rows if half[1][i] == half[2][i] == i]
    assert 10 <= len(repeated) <= 30  # about half, seeded
    kept = [i for i in rows if i not in repeated]
    assert all(half[j][i] == plain[j][i] for j in (1, 2) for i in kept)


@torch.no_grad()
def test_first_slot_answers_as_the_prompt_alone_and_later_slots_see_the_earlier(tiny_base, sst2):
    model, layers, _ = prepare_model(tiny_base, "mimo", 3, tiny_config(), PEOptions())
    for layer in layers.values():
        layer.B.copy_(torch.randn(layer.B.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    model.eval()
    tok, task = tiny_base.tokenizer, sst2.task
    labels = label_token_ids(task, tok)
    enc = encode(task, sst2.test[:4], tok)
    sep = tok.encode("\n\n", add_special_tokens=False)
    ids, mask, pos = pack([enc, enc[::-1], enc], sep, tok.pad_token_id)
    packed = slot_logits(model, ids, mask, pos, labels)
    alone_ids, alone_mask = pad(enc, tok.pad_token_id)
    alone = member_logits(model, alone_ids, alone_mask, labels, 1)[0]
    torch.testing.assert_close(packed[0], alone, rtol=0, atol=1e-5)  # causal: slot 0 sees only itself
    assert (packed[2] - alone).abs().max() > 1e-4  # slot 2 sees the other prompts before it


def _mimo_ensemble(base, layers, layout, k: int) -> PEEnsemble:
    config = tiny_config()
    manifest = {
        "kind": "pe_ensemble",
        "format_version": 1,
        "method": "mimo",
        "members": k,
        "task": "sst2",
        "layout": layout,
        "rank": config.rank,
        "scale": config.lora_alpha / config.rank,
        "options": PEOptions().model_dump(),
        "base": {"spec": base.spec, "fingerprint": base.fingerprint},
    }
    return PEEnsemble(manifest, flat_tensors(layers))


def test_predictor_with_one_slot_is_the_adapter_as_plain_lora(tiny_base, sst2):
    _, layers, layout = prepare_model(tiny_base, "mimo", 1, tiny_config(), PEOptions())
    with torch.no_grad():
        for layer in layers.values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    one = _mimo_ensemble(tiny_base, layers, layout, 1)
    ours = one.predictor(tiny_base, autocast=False).predict_proba(sst2.task, sst2.test)
    plain = one.merged().attach(tiny_base.model)
    ref = predict_proba(plain, tiny_base.tokenizer, sst2.task, sst2.test, autocast=False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    three = _mimo_ensemble(tiny_base, layers, layout, 3).predictor(tiny_base, autocast=False, batch_size=3)
    log_probs = three.member_log_probs(sst2.task, sst2.test)
    assert log_probs.shape == (3, len(sst2.test), 2)
    torch.testing.assert_close(log_probs[0].exp(), ref, rtol=0, atol=1e-5)  # slot 0 = the prompt alone
    assert (log_probs[2].exp() - ref).abs().max() > 1e-4
