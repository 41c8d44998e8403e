"""run_loop: the one training loop of every trainer, with the loss as a plug-in, checkpointed and resumable.

A trainer (an expert, a parameter-efficient ensemble, a distilled student) brings its batches, its
trainable parameters with their optimizer and schedule, and an :class:`Objective`: the loss of one
batch, plus optional hooks (tokens counted, work after each update, extra state to checkpoint). The
loop does the rest the same way for all of them: the gradient step with clipping, the progress bar,
a checkpoint every ``checkpoint_every`` steps of the parameters, optimizer, scheduler, RNG, step and
the objective's state into ``.<out>.partial/`` (atomic writes; the previous checkpoint is kept, see
:mod:`adapterfuse.train.checkpoint`), and the resume from the latest complete one when the run's
identity (config, base, data …) is unchanged, so a resumed run ends with the same bytes as an
uninterrupted one. The frozen base runs under the objective's bf16 autocast; adapter maths stays fp32.

Also here: the pieces the trainers share (the seeded length-bucketed batch schedule, the linear and
cyclic learning-rate schedules, and the seeded dev subset every trainer scores).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterfuse.progress import tracker
from adapterfuse.tasks.glue import dev_subset_seed
from adapterfuse.tasks.spec import Example, capped_subset
from adapterfuse.train.checkpoint import Checkpoint
from adapterfuse.train.config import TrainConfig

Callback = Callable[[int, float], None]
LossFn = Callable[[int, Any], torch.Tensor]


def batch_schedule(lengths: Sequence[int], batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Every training step's example indices, fixed by the seed (so a resumed run sees the same data).

    Each epoch is a seeded shuffle cut into windows of 50 batches; each window is sorted by length
    before it is cut into batches (little padding), and the batches are shuffled again.
    """
    n = len(lengths)
    total = max(1, round(math.ceil(n / batch_size) * epochs))
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < total:
        rng = random.Random(f"{seed}:{epoch}")
        order = list(range(n))
        rng.shuffle(order)
        window = batch_size * 50
        batches: list[list[int]] = []
        for w in range(0, n, window):
            chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        steps += batches
        epoch += 1
    return steps[:total]


def linear_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at step ``total``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (total - s) / max(total - warmup, 1)))
    )


def cycle_ends(total: int, cycles: int) -> list[int]:
    """The steps (1-based counts) at which each of ``cycles`` near-equal cycles of ``total`` steps ends.

    Rounded, not a fixed ``ceil(total / cycles)`` length, so there are exactly ``cycles`` of them
    (``cycles <= total``); the last one is ``total``.
    """
    return [round(i * total / cycles) for i in range(1, cycles + 1)]


def cyclic_schedule(optimizer: torch.optim.Optimizer, ends: Sequence[int]) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine annealing from the full rate to 0 within each cycle, then a restart.

    Huang et al., "Snapshot Ensembles: Train 1, get M for free" (https://arxiv.org/abs/1704.00109): the
    adapter at the end of each cycle is one member.

    Args:
        optimizer: the optimizer whose rate is scaled.
        ends: where each cycle ends (see :func:`cycle_ends`).
    """
    starts = [0, *ends[:-1]]

    def factor(step: int) -> float:
        i = next((j for j, end in enumerate(ends) if step < end), len(ends) - 1)
        return 0.5 * (1 + math.cos(math.pi * (step - starts[i]) / (ends[i] - starts[i])))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scored_test(examples: list[Example], config: TrainConfig) -> list[Example]:
    """The test (dev) examples a trainer scores: the seeded subset of ``config.max_eval_examples``.

    The same subset that ``load_task(max_test=...)`` and the other commands score, so an expert and a
    parameter-efficient ensemble trained with one config are scored on the same examples.
    """
    return capped_subset(examples, config.max_eval_examples, dev_subset_seed(config.seed))


def fingerprint_examples(examples: Sequence[Example]) -> str:
    """A short hash of examples (ids, fields, labels): a resumed run must train on the same data."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.idx, e.fields, e.label]).encode())
    return h.hexdigest()[:16]


class Objective(ABC):
    """The loss plug-in of :func:`run_loop`: :meth:`loss` is required; the other hooks are optional."""

    @abstractmethod
    def loss(self, step: int, batch: Any) -> torch.Tensor:
        """The scalar loss of one batch (``step`` is the 0-based step index)."""

    def tokens(self, batch: Any) -> int:
        """Tokens this batch trains on (for the throughput reported); 0 when not counted."""
        return 0

    def after_update(self, step: int) -> None:
        """Work after the optimizer and scheduler step, while the gradients are still there (none by default)."""
        return None

    def state(self) -> dict[str, Any]:
        """Extra state to checkpoint (merged into the checkpoint payload; keys must not clash)."""
        return {}

    def load_state(self, payload: dict[str, Any]) -> None:
        """Restore :meth:`state` from a checkpoint payload (nothing by default)."""
        return None


class LossObjective(Objective):
    """An :class:`Objective` from a plain callable ``loss_fn(step, batch) -> loss``."""

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    def loss(self, step: int, batch: Any) -> torch.Tensor:
        """The callable's loss."""
        return self.loss_fn(step, batch)


@dataclass
class Trainable:
    """What the loop updates: named parameters (clipped and checkpointed in this order), optimizer, schedule."""

    params: Mapping[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass
class LoopResult:
    """How a run went: the step it resumed from, total wall time and tokens (adding up across resumes)."""

    steps: int
    resumed_from_step: int
    wall_s: float
    tokens: int

    def summary(self) -> dict[str, Any]:
        """The run's numbers as trainers record them in their metadata."""
        return {
            "steps": self.steps,
            "resumed_from_step": self.resumed_from_step,
            "train_wall_s": round(self.wall_s, 2),
            "train_tokens_per_s": round(self.tokens / max(self.wall_s, 1e-9), 1),
        }


def run_checkpoint(
    out: Path, task: str, base_fingerprint: str, train: Sequence[Example], config: TrainConfig, **identity: Any
) -> Checkpoint:
    """The checkpoint of one training run: it resumes only the same task, base, data, config and ``identity``."""
    return Checkpoint(
        out,
        {
            **identity,
            "task": task,
            "base": base_fingerprint,
            "data": fingerprint_examples(train),
            "config": config.model_dump(mode="json"),
        },
    )


def _restore(payload: dict[str, Any], trainable: Trainable, objective: Objective) -> None:
    with torch.no_grad():
        for name, tensor in payload["adapter"].items():
            trainable.params[name].copy_(tensor)
    trainable.optimizer.load_state_dict(payload["optimizer"])
    trainable.scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"])
    if "cuda_rng" in payload and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    objective.load_state(payload)


def _payload(done: int, trainable: Trainable, objective: Objective, wall_s: float, tokens: int) -> dict[str, Any]:
    payload = {
        **objective.state(),
        "step": done,
        "adapter": {n: p.detach().clone() for n, p in trainable.params.items()},
        "optimizer": trainable.optimizer.state_dict(),
        "scheduler": trainable.scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "wall_s": wall_s,
        "tokens": tokens,
    }
    if torch.cuda.is_available():  # dropout on the GPU draws from its own generators
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    return payload


def run_loop(
    schedule: Sequence[Any],
    trainable: Trainable,
    objective: Objective | LossFn,
    config: TrainConfig,
    checkpoint: Checkpoint | None = None,
    callback: Callback | None = None,
    progress: str | None = None,
    accelerator: Any = None,
) -> LoopResult:
    """Train over ``schedule`` (one batch per step), resuming from ``checkpoint`` when it holds a run.

    Each step: the objective's loss, backward, gradient clipping at ``config.grad_clip``, optimizer and
    scheduler step, :meth:`Objective.after_update`, gradients cleared; every ``config.checkpoint_every``
    steps (but the last) a checkpoint; then ``callback(step, loss)`` with the 1-based step.

    Args:
        schedule: every step's batch (whatever the objective takes).
        trainable: the parameters, optimizer and scheduler (built by the caller, seeded).
        objective: the loss plug-in, or a callable ``loss_fn(step, batch) -> loss``.
        config: ``grad_clip`` and ``checkpoint_every`` are used.
        checkpoint: where to checkpoint and resume from; ``None``: neither.
        callback: called after every step (progress, tests, early stop by raising).
        progress: the progress bar's title; ``None``: no bar.
        accelerator: an ``accelerate.Accelerator`` for the backward pass and the main process (which
            alone checkpoints); ``None``: plain ``loss.backward()`` in one process.

    Returns:
        The :class:`LoopResult`.

    Raises:
        ResumeError: the checkpoint was made by a different run.
        SaveError: a checkpoint could not be written (disk full …); the complete ones already there are kept.
    """
    objective = objective if isinstance(objective, Objective) else LossObjective(objective)
    params = list(trainable.params.values())
    main = accelerator is None or accelerator.is_main_process
    start, prior_wall, tokens = 0, 0.0, 0
    payload = checkpoint.load() if checkpoint is not None else None
    if payload is not None:
        _restore(payload, trainable, objective)
        start, prior_wall, tokens = payload["step"], payload.get("wall_s", 0.0), payload.get("tokens", 0)
    total = len(schedule)
    t0 = time.perf_counter()  # wall time and tokens add up across resumes
    bar = tracker(range(start, total), progress or "train", total, "step", start, enabled=progress is not None and main)
    for step in bar:
        batch = schedule[step]
        tokens += objective.tokens(batch)
        loss = objective.loss(step, batch)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        trainable.optimizer.step()
        trainable.scheduler.step()
        objective.after_update(step)
        trainable.optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if checkpoint is not None and main and done % config.checkpoint_every == 0 and done < total:
            checkpoint.save(_payload(done, trainable, objective, prior_wall + time.perf_counter() - t0, tokens))
        if callback is not None:
            callback(done, loss.item())
    return LoopResult(total, start, prior_wall + time.perf_counter() - t0, tokens)
