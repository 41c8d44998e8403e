"""The validation split as routers fit on it: features computed once, and every expert's answers cached.

:class:`RoutingData` holds, for the validation inputs of several tasks, the routing features (one
feature pass, cached) and, per pool of experts, every expert's label-word log-probabilities (one
batched ensemble pass per task, cached). From those it derives, without another forward pass:

- ``quality[i, e]``: how well expert ``e`` answers input ``i`` (the log-likelihood of the gold label;
  for regression the soft target between the two nearest score levels, as experts are trained);
- the *best-expert* assignment (``argmax_e quality``) and the *oracle* assignment (each input to the
  expert of its own task, ``-1`` where no expert serves that task);
- the validation score of any routing (:func:`routed_score`), for cluster tables, curves and subsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.backends.ensemble.cache import MemberCache, cache_members
from adapterfuse.backends.route.features import DEFAULT_LAYER, FeatureExtractor, check_on, default_shape, routing_texts
from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.head import Scoring, label_log_likelihood
from adapterfuse.tasks.spec import TaskData, TaskSpec


def serves(expert: Expert) -> set[str]:
    """The training tasks an expert answers: ``meta["tasks"]`` (a cluster merge) or its own task."""
    tasks = expert.meta.get("tasks")
    if isinstance(tasks, list):
        return {str(t) for t in tasks}
    return {expert.task} if expert.task else set()


def own_expert(task: TaskSpec, pool: Sequence[Expert]) -> int:
    """The index of the first expert in ``pool`` serving ``task`` (its oracle expert), ``-1`` if none."""
    for i, e in enumerate(pool):
        if task.train_task in serves(e):
            return i
    return -1


def example_quality(task: TaskSpec, log_probs: torch.Tensor, labels: Sequence[float]) -> torch.Tensor:
    """Each member's log-likelihood of each gold label (:func:`adapterfuse.head.label_log_likelihood`).

    Args:
        task: the task (regression labels use a soft target between the two nearest levels).
        log_probs: ``[K, n, L]`` member log-probabilities.
        labels: the ``n`` gold labels.

    Returns:
        ``[n, K]``; higher is better.
    """
    return label_log_likelihood(task, log_probs, labels).T


def pool_rows(pooling: str, log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pool each row with its own weights.

    Args:
        pooling: ``"linear"`` (mixture of probabilities) or ``"log_linear"`` (renormalised product).
        log_probs: ``[k, n, L]`` the chosen members' log-probabilities, row by row.
        weights: ``[n, k]`` each row's weights (summing to 1).

    Returns:
        ``[n, L]`` probabilities; with ``k == 1`` exactly ``exp(log_probs[0])``.

    Raises:
        ConfigError: an unknown pooling.
    """
    if log_probs.shape[0] == 1:
        return log_probs[0].exp()
    w = weights.T.unsqueeze(-1).to(log_probs.dtype)  # [k, n, 1]
    if pooling == "linear":
        return (w * log_probs.exp()).sum(dim=0)
    if pooling == "log_linear":
        return torch.softmax((w * log_probs).sum(dim=0), dim=-1)
    raise ConfigError(f"pooling {pooling!r}: unknown; expected 'linear' or 'log_linear'")


@dataclass(frozen=True)
class PoolScores:
    """Every pool expert's answers on the validation inputs.

    Attributes:
        names: the pool's expert names, in order.
        caches: per task, ``[E, n_t, L]`` log-probabilities (:class:`MemberCache`).
        quality: ``[N, E]`` (see :func:`example_quality`), rows task after task.
        own: ``[N]`` the oracle expert of each row, ``-1`` where no pool expert serves its task.
    """

    names: list[str]
    caches: list[MemberCache]
    quality: torch.Tensor
    own: torch.Tensor

    @property
    def best(self) -> torch.Tensor:
        """``[N]`` the best expert of each row (ties: the lower index)."""
        return self.quality.argmax(dim=1)

    def rows(self, keep: torch.Tensor) -> PoolScores:
        """The same experts on some rows only (``keep``: ``[N]`` bool); a task keeps its cache even if empty."""
        caches, start = [], 0
        for cache in self.caches:
            n = cache.log_probs.shape[1]
            mask = keep[start : start + n]
            labels = [y for y, k in zip(cache.labels, mask.tolist(), strict=True) if k]
            caches.append(MemberCache(cache.task, cache.log_probs[:, mask], labels))
            start += n
        return PoolScores(self.names, caches, self.quality[keep], self.own[keep])

    def subset(self, keep: Sequence[int]) -> PoolScores:
        """The same scores for some experts only (by index, in the given order)."""
        keep = list(keep)
        remap = torch.full((len(self.names),), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        own = torch.where(self.own >= 0, remap[self.own.clamp(min=0)], self.own)
        return PoolScores(
            [self.names[i] for i in keep], [c.subset(keep) for c in self.caches], self.quality[:, keep], own
        )


def routed_score(scores: PoolScores, indices: torch.Tensor, weights: torch.Tensor, pooling: str = "linear") -> float:
    """The validation score of a routing: each task's official metric, averaged over tasks.

    Args:
        scores: the pool's cached answers.
        indices: ``[N, k]`` chosen experts per row (see :func:`~adapterfuse.backends.route.routers.base.keep_top_k`).
        weights: ``[N, k]`` their weights.
        pooling: how chosen experts are pooled.

    Returns:
        The mean over tasks of the per-task ``score`` (as the harness reports it).
    """
    out, start = [], 0
    for cache in scores.caches:
        n = cache.log_probs.shape[1]
        idx, w = indices[start : start + n], weights[start : start + n]
        chosen = cache.log_probs[idx.T, torch.arange(n).unsqueeze(0)]  # [k, n, L]
        out.append(cache.score(pool_rows(pooling, chosen, w)))
        start += n
    return sum(out) / len(out)


def top1_score(scores: PoolScores, chosen: torch.Tensor) -> float:
    """The validation score when each row goes to the one expert ``chosen[i]`` (``[N]`` indices)."""
    return routed_score(scores, chosen[:, None], torch.ones(len(chosen), 1))


def oracle_score(scores: PoolScores) -> float | None:
    """The validation score of the oracle routing (each row to its own task's expert), or ``None`` where
    some row's task has no expert in the pool."""
    if not bool((scores.own >= 0).all()):
        return None
    return top1_score(scores, scores.own)


class RoutingData:
    """Validation inputs of several tasks, their routing features, and pools' cached answers.

    Build it once and pass it to every :func:`~adapterfuse.backends.route.route` call of a comparison: features
    and each pool's answers are computed on first use and then reused.

    Args:
        base: the frozen base.
        validation: tasks whose ``validation`` split routers fit on.
        on: route on the ``"prompt"`` or the raw ``"fields"``.
        layer: the feature layer (see :class:`FeatureExtractor`).
        scoring: feature and scoring settings.
        max_examples: use at most this many validation examples per task (the first ones).
        shape: append the text's shape to the features (default: only ``on="fields"``; see
            :func:`~adapterfuse.backends.route.features.text_shape`).
        readout: ``"mean"`` or ``"mean_last"`` (see :class:`FeatureExtractor`).

    Raises:
        ConfigError: no tasks, a task with no validation examples, an unknown ``on`` or a bad layer.
    """

    def __init__(
        self,
        base: BaseModel,
        validation: Sequence[TaskData],
        on: str = "prompt",
        layer: int = DEFAULT_LAYER,
        scoring: Scoring = Scoring(),
        max_examples: int | None = None,
        shape: bool | int | None = None,
        readout: str = "mean",
    ) -> None:
        if not validation:
            raise ConfigError(
                "validation: expected at least one task's data, got none; the learned and clustered "
                "routers fit on the validation split (pass validation=[TaskData, ...])"
            )
        self.base, self.on = base, check_on(on)
        self.extractor = FeatureExtractor(
            base, layer, scoring.batch_size, scoring.autocast, scoring.max_length, default_shape(on, shape), readout
        )
        self.tasks = [td.task for td in validation]
        self.examples = [list(td.validation[:max_examples]) for td in validation]
        for task, examples in zip(self.tasks, self.examples, strict=True):
            if not examples:
                raise ConfigError(
                    f"validation: task {task.name} has no validation examples; expected a split "
                    "carved from train (validation_size > 0)"
                )
        self.scoring = scoring
        self._scores: dict[tuple[tuple[str, str], ...], PoolScores] = {}

    @property
    def layer(self) -> int:
        """The resolved feature layer."""
        return self.extractor.layer

    @cached_property
    def features(self) -> torch.Tensor:
        """``[N, d]`` routing features of every validation input, task after task (computed once)."""
        return torch.cat(
            [
                self.extractor.encode(routing_texts(t, ex, self.on))
                for t, ex in zip(self.tasks, self.examples, strict=True)
            ]
        )

    @property
    def row_tasks(self) -> list[TaskSpec]:
        """The task of each row."""
        return [t for t, ex in zip(self.tasks, self.examples, strict=True) for _ in ex]

    def scores(self, pool: Sequence[Expert]) -> PoolScores:
        """Every pool expert's answers on the validation inputs (one batched pass per task, cached).

        Args:
            pool: the experts routers choose among.

        Returns:
            The :class:`PoolScores`.
        """
        key = tuple((e.name, e.weights_sha256()) for e in pool)
        if key not in self._scores:
            batched = BatchedEnsemble(self.base.model, list(pool))
            data = [TaskData(t, [], ex, []) for t, ex in zip(self.tasks, self.examples, strict=True)]
            caches = cache_members(batched, self.base.tokenizer, data, **asdict(self.scoring))
            quality = torch.cat([example_quality(c.task, c.log_probs, c.labels) for c in caches])
            own = torch.tensor([own_expert(t, pool) for t in self.row_tasks], dtype=torch.long)
            self._scores[key] = PoolScores([e.name for e in pool], caches, quality, own)
        return self._scores[key]
