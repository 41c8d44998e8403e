"""The label loss, class weights and per-example likelihood of adapterfuse.head, and the members' read-out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapterfuse.head import (
    class_weights,
    encode,
    label_log_likelihood,
    label_logits,
    label_token_ids,
    last_hidden,
    member_logits,
    pad,
    read_labels,
    task_loss,
)
from adapterfuse.tasks.glue import get_task
from adapterfuse.tasks.spec import Example

EXAMPLES = [
    Example(("A great film .",), 1, 0),
    Example(("Bad and dull, the plot was terrible throughout .",), 0, 1),
    Example(("Fine .",), 1, 2),
]


def _logits(n: int, labels: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, labels, generator=torch.Generator().manual_seed(seed)) * 3


def test_classification_loss_is_torch_cross_entropy_with_and_without_class_weights():
    task = get_task("mnli")
    logits, labels = _logits(7, 3), [0, 2, 2, 1, 0, 2, 2]
    torch.testing.assert_close(task_loss(task, logits, labels), F.cross_entropy(logits, torch.tensor(labels)))
    weights = torch.tensor([0.5, 2.0, 1.0])
    torch.testing.assert_close(
        task_loss(task, logits, labels, weights), F.cross_entropy(logits, torch.tensor(labels), weight=weights)
    )


def test_regression_loss_is_cross_entropy_against_the_two_nearest_levels():
    task = get_task("stsb")
    logits, labels = _logits(4, 6), [2.4, 0.0, 5.0, 3.75]
    target = torch.zeros(4, 6)
    target[0, 2], target[0, 3], target[1, 0], target[2, 5], target[3, 3], target[3, 4] = 0.6, 0.4, 1, 1, 0.25, 0.75
    torch.testing.assert_close(task_loss(task, logits, labels), F.cross_entropy(logits, target))


@pytest.mark.parametrize(("task", "labels"), [("sst2", [1, 0, 0, 1, 1]), ("stsb", [0.2, 4.9, 5.0, 2.5, 1.0])])
def test_per_example_likelihood_averages_to_minus_the_loss(task, labels):
    spec = get_task(task)
    logits = torch.stack([_logits(5, spec.n_labels, seed) for seed in range(3)])  # three members
    log_probs = torch.log_softmax(logits, dim=-1)
    ll = label_log_likelihood(spec, log_probs, labels)
    assert ll.shape == (3, 5)
    for k in range(3):
        torch.testing.assert_close(-ll[k].mean(), task_loss(spec, logits[k], labels))
    torch.testing.assert_close(label_log_likelihood(spec, log_probs[1], labels), ll[1], rtol=0, atol=0)


def test_class_weights_are_inverse_frequencies_and_only_when_asked():
    task = get_task("sst2")
    examples = [Example(("x",), y, i) for i, y in enumerate([0, 0, 0, 1])]
    torch.testing.assert_close(class_weights(task, examples, True), torch.tensor([4 / 6, 4 / 2]))
    assert class_weights(task, examples, False) is None
    assert class_weights(get_task("stsb"), [Example(("a", "b"), 2.5, 0)], True) is None


def test_members_read_out_equals_label_logits_row_by_row(tiny_base):
    task = get_task("sst2")
    ids, mask = pad(encode(task, EXAMPLES, tiny_base.tokenizer), tiny_base.tokenizer.pad_token_id)
    labels = label_token_ids(task, tiny_base.tokenizer)
    with torch.no_grad():
        ref = label_logits(tiny_base.model, ids, mask, labels)
        torch.testing.assert_close(
            read_labels(tiny_base.model, last_hidden(tiny_base.model, ids, mask).float(), labels), ref, rtol=0, atol=0
        )
        both = member_logits(tiny_base.model, ids, mask, labels, 2)  # the plain base: both members alike
        blocks = member_logits(tiny_base.model, ids[[0, 1, 2, 2]], mask[[0, 1, 2, 2]], labels, 2, replicate=False)
    assert both.shape == (2, 3, 2) and blocks.shape == (2, 2, 2)
    torch.testing.assert_close(both, ref.expand(2, 3, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocks.reshape(4, 2), ref[[0, 1, 2, 2]], rtol=1e-5, atol=1e-6)
