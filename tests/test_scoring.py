from __future__ import annotations

import torch

from adapterfuse.head import encode, label_logits, label_token_ids, length_batches, pad, predict_proba, predictions
from adapterfuse.tasks.glue import get_task
from adapterfuse.tasks.spec import Example

EXAMPLES = [
    Example(("A great film .",), 1, 0),
    Example(("Bad and dull, the plot was terrible throughout .",), 0, 1),
    Example(("Fine .",), 1, 2),
]


def test_label_logits_equal_the_full_head_at_the_last_real_token(tiny_base):
    task = get_task("sst2")
    ids, mask = pad(encode(task, EXAMPLES, tiny_base.tokenizer), tiny_base.tokenizer.pad_token_id)
    labels = label_token_ids(task, tiny_base.tokenizer)
    with torch.no_grad():
        ours = label_logits(tiny_base.model, ids, mask, labels)
        full = tiny_base.model(input_ids=ids, attention_mask=mask).logits
    last = mask.sum(1) - 1
    ref = full[torch.arange(len(EXAMPLES)), last][:, labels]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_probabilities_do_not_depend_on_batching_or_order(tiny_base):
    task = get_task("sst2")
    together = predict_proba(tiny_base.model, tiny_base.tokenizer, task, EXAMPLES, batch_size=3, autocast=False)
    alone = torch.cat(
        [predict_proba(tiny_base.model, tiny_base.tokenizer, task, [e], autocast=False) for e in EXAMPLES]
    )
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.sum(1), torch.ones(3))
    reordered = predict_proba(tiny_base.model, tiny_base.tokenizer, task, EXAMPLES[::-1], batch_size=2, autocast=False)
    torch.testing.assert_close(reordered, together.flip(0), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_close_to_fp32(tiny_base):
    task = get_task("sst2")
    fp32 = predict_proba(tiny_base.model, tiny_base.tokenizer, task, EXAMPLES, autocast=False)
    bf16 = predict_proba(tiny_base.model, tiny_base.tokenizer, task, EXAMPLES, autocast=True)
    assert (fp32 - bf16).abs().max() < 0.02


def test_long_prompts_keep_head_and_answer_cue(tokenizer):
    task = get_task("rte")
    long = Example(("word " * 600, "short ."), 0, 0)
    ids = encode(task, [long], tokenizer, max_length=64)[0]
    full = tokenizer(task.prompt(long.fields))["input_ids"]
    assert len(ids) == 64 and ids[:32] == full[:32] and ids[-32:] == full[-32:]


def test_length_batches_sort_and_cover_everything():
    batches = length_batches([5, 1, 9, 3, 7], batch_size=2)
    assert batches == [[1, 3], [0, 4], [2]]


def test_regression_reads_the_expected_score():
    probs = torch.tensor([[0, 0, 0.5, 0.5, 0, 0], [1.0, 0, 0, 0, 0, 0]])
    assert predictions(get_task("stsb"), probs) == [2.5, 0.0]
    assert predictions(get_task("sst2"), torch.tensor([[0.3, 0.7], [0.9, 0.1]])) == [1, 0]
