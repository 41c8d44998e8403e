"""The members' validation log-probabilities, computed once in one batched pass and fitted on many times.

Learning weights and selecting members both only re-pool these cached tensors: no model forward per
optimisation step or per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformers import PreTrainedTokenizerBase

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.backends.ensemble.pooling import pooled_log_probs
from adapterfuse.distributed import map_rows
from adapterfuse.errors import ConfigError
from adapterfuse.head import DEFAULT_MAX_LENGTH, predictions, task_loss
from adapterfuse.progress import bar
from adapterfuse.tasks.metrics import compute_metrics
from adapterfuse.tasks.spec import TaskData, TaskSpec


@dataclass(frozen=True)
class MemberCache:
    """One task's validation inputs as seen by every member.

    Attributes:
        task: the task.
        log_probs: ``[K, n, L]`` member log-probabilities over the label words.
        labels: the ``n`` gold labels.
    """

    task: TaskSpec
    log_probs: torch.Tensor
    labels: list[float]

    def subset(self, members: Sequence[int]) -> MemberCache:
        """The same cache restricted to some members (by index, in the given order)."""
        return MemberCache(self.task, self.log_probs[list(members)], self.labels)

    def score(self, probs: torch.Tensor) -> float:
        """The task's official score (its metrics' mean, as the harness reports it) of ``[n, L]`` answers to
        these inputs."""
        return compute_metrics(self.task.metrics, predictions(self.task, probs), self.labels)["score"]


def cache_members(
    batched: BatchedEnsemble,
    tokenizer: PreTrainedTokenizerBase,
    validation: Sequence[TaskData],
    batch_size: int = 32,
    autocast: bool = True,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_examples: int | None = None,
) -> list[MemberCache]:
    """Every member's log-probabilities on every task's validation split (one batched pass per task).

    Args:
        batched: the members over the base.
        tokenizer: the base's tokenizer.
        validation: the tasks whose ``validation`` split to use.
        batch_size, autocast, max_length: scoring settings.
        max_examples: use at most this many validation examples per task (the first ones).

    Returns:
        One :class:`MemberCache` per task.

    Raises:
        ConfigError: no tasks, or a task with an empty validation split.
    """
    if not validation:
        raise ConfigError("validation: expected at least one task's data, got none")
    caches = []
    settings = dict(batch_size=batch_size, autocast=autocast, max_length=max_length)
    for td in bar(validation, "ensemble: members on validation", unit="task"):
        examples = list(td.validation[:max_examples])
        if not examples:
            raise ConfigError(
                f"validation: task {td.task.name} has no validation examples; expected a validation "
                "split carved from train (validation_size > 0)"
            )
        # Split over the processes of a multi-process launch (members' rows are dimension 1).
        log_probs = map_rows(partial(batched.member_log_probs, tokenizer, td.task, **settings), examples, dim=1)
        caches.append(MemberCache(td.task, log_probs, [e.label for e in examples]))
    return caches


def pooled_nll(
    pooling: str,
    caches: Sequence[MemberCache],
    weights: torch.Tensor | Sequence[float],
    temperature: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """The pooled distribution's loss on the cached tasks: the mean over tasks of :func:`adapterfuse.head.task_loss`.

    That is the label words' cross-entropy, and for regression (STS-B) the soft-target cross-entropy
    between the two nearest score levels, exactly as experts are trained. Differentiable.
    """
    losses = [task_loss(c.task, pooled_log_probs(pooling, c.log_probs, weights, temperature), c.labels) for c in caches]
    return torch.stack(losses).mean()


def pooled_score(
    pooling: str,
    caches: Sequence[MemberCache],
    weights: torch.Tensor | Sequence[float],
    temperature: float = 1.0,
    metric: str = "score",
) -> float:
    """How good the pooled distribution is on the cached tasks; higher is better.

    Args:
        pooling, weights, temperature: how to pool.
        caches: the cached tasks.
        metric: ``"score"`` (the mean over tasks of each task's official metric mean, as the harness
            reports it) or ``"nll"`` (minus :func:`pooled_nll`).

    Raises:
        ConfigError: for an unknown metric.
    """
    if metric == "nll":
        return -float(pooled_nll(pooling, caches, weights, temperature))
    if metric != "score":
        raise ConfigError(f"metric {metric!r}: unknown; expected 'score' or 'nll'")
    scores = []
    for c in caches:
        scores.append(c.score(pooled_log_probs(pooling, c.log_probs, weights, temperature).exp()))
    return sum(scores) / len(scores)
