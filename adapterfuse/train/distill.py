"""Distil an ensemble into one LoRA adapter: one forward pass per input instead of K.

The student is trained to match the pooled ensemble's distribution over the label words on the tasks'
training inputs: the loss is ``KL(ensemble || student)``, with the ensemble's probabilities computed
once, up front, by its batched forward pass. The loss is the student's plug-in to the loop every trainer
runs (:func:`adapterfuse.train.loop.run_loop`): the seeded length-bucketed batches of each task shuffled
together, label-word logits, bf16 autocast for the frozen base, fp32 adapter, AdamW with linear warm-up
and decay, gradient clipping, and a checkpoint every ``checkpoint_every`` steps in ``.<out>.partial/``
that a rerun with the same config, base, data and teacher resumes from, ending with the same bytes.
"""

from __future__ import annotations

import copy
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterfuse.backends.ensemble.predictor import EnsemblePredictor
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert, versions
from adapterfuse.head import autocast_context, encode, label_logits, label_token_ids, pad
from adapterfuse.io.atomic import atomic_dir, check_output
from adapterfuse.tasks.spec import TaskData
from adapterfuse.train.config import TrainConfig, stable_adapter_config
from adapterfuse.train.loop import (
    Callback,
    Checkpoint,
    Objective,
    Trainable,
    batch_schedule,
    fingerprint_examples,
    linear_schedule,
    run_loop,
)


def _targets(ensemble: EnsemblePredictor, tasks_data: Sequence[TaskData], config: TrainConfig):
    """Per task: the training examples, their encoded prompts, label ids and the ensemble's probabilities."""
    out = []
    for td in tasks_data:
        train = _train_examples(td, config)
        if not train:
            raise ConfigError(f"distill: task {td.task.name} has no training inputs; expected a train split")
        probs = ensemble.predict_proba(td.task, train)  # once, batched over the K members
        encoded = encode(td.task, train, ensemble.base.tokenizer, config.max_length)
        out.append((td, encoded, label_token_ids(td.task, ensemble.base.tokenizer), probs))
    return out


def _schedule(prepared: list, config: TrainConfig) -> list[tuple[int, list[int]]]:
    """Every step's (task index, rows): each task's seeded length-bucketed batches, shuffled together."""
    steps = [
        (t, rows)
        for t, (_, encoded, _, _) in enumerate(prepared)
        for rows in batch_schedule([len(x) for x in encoded], config.batch_size, config.epochs, config.seed + t)
    ]
    random.Random(config.seed).shuffle(steps)
    return steps


def _student(ensemble: EnsemblePredictor, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(ensemble.base.model), lora)
    model.train()
    return model


@dataclass
class _DistillObjective(Objective):
    """The student's loss plug-in: ``KL(ensemble || student)`` over the label words of a step's rows."""

    model: nn.Module
    prepared: list
    config: TrainConfig
    pad_id: int

    def tokens(self, batch: tuple[int, list[int]]) -> int:
        """The real (unpadded) tokens of the step's rows."""
        t, rows = batch
        return sum(len(self.prepared[t][1][i]) for i in rows)

    def loss(self, step: int, batch: tuple[int, list[int]]) -> torch.Tensor:
        """The KL of the student's label-word distribution from the ensemble's (fp32)."""
        t, rows = batch
        _, encoded, labels, probs = self.prepared[t]
        device = next(self.model.parameters()).device
        ids, mask = pad([encoded[i] for i in rows], self.pad_id)
        with autocast_context(self.config.autocast, device):
            logits = label_logits(self.model, ids.to(device), mask.to(device), labels)
        return F.kl_div(torch.log_softmax(logits.float(), -1), probs[rows].to(device), reduction="batchmean")


def _identity(ensemble: EnsemblePredictor, prepared: list, config: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share: tasks, base, training inputs, the teacher's targets, config."""
    targets = hashlib.sha256()
    for _, _, _, probs in prepared:
        targets.update(probs.float().contiguous().numpy().tobytes())
    return {
        "tasks": [td.task.name for td, *_ in prepared],
        "base": ensemble.base.fingerprint,
        "data": fingerprint_examples([e for td, *_ in prepared for e in _train_examples(td, config)]),
        "teacher": targets.hexdigest()[:16],
        "config": config.model_dump(mode="json"),
    }


def _train_examples(td: TaskData, config: TrainConfig) -> list:
    return list(td.train[: config.max_train_examples] if config.max_train_examples else td.train)


def _compare(student, ensemble: EnsemblePredictor, tasks_data: Sequence[TaskData], config: TrainConfig):
    """Test-split results of the student, the ensemble and the base, and the share of the gain kept."""
    from adapterfuse.harness import ModelPredictor, ZeroShotPredictor, evaluate

    settings = dict(batch_size=config.eval_batch_size, autocast=config.autocast, max_length=config.max_length)
    predictors = {
        "student": ModelPredictor("distilled", student, ensemble.base.tokenizer, **settings),
        "ensemble": ensemble,
        "base": ZeroShotPredictor(ensemble.base, **settings),
    }
    results = {k: evaluate(p, tasks_data, "test", config.max_eval_examples) for k, p in predictors.items()}
    avg = {k: r["average"] for k, r in results.items()}
    gain = avg["ensemble"] - avg["base"]
    kept = (avg["student"] - avg["base"]) / gain if abs(gain) > 1e-12 else None
    return results, {
        "test_average": avg,
        "kept": kept,
        "per_task": {k: {t: v["score"] for t, v in r["tasks"].items()} for k, r in results.items()},
    }


def distill(
    ensemble: EnsemblePredictor,
    tasks_data: Sequence[TaskData],
    out: str | Path,
    config: TrainConfig | None = None,
    overwrite: bool = False,
    callback: Callback | None = None,
    progress: bool = False,
    compare: bool = True,
) -> Expert:
    """Train one LoRA adapter to match the pooled ensemble on the tasks' training inputs.

    Args:
        ensemble: the teacher.
        tasks_data: the tasks; their ``train`` inputs (labels unused) are distilled on, their ``test``
            split measures the result.
        out: the expert folder to write.
        config: the student's training settings (``method`` must be ``lora``; rank, lr, epochs, batch
            size, caps, seed, autocast are used).
        overwrite: replace an existing ``out`` (and discard a stale partial checkpoint).
        callback: called as ``callback(step, loss)`` after every step (progress, tests, early stop).
        progress: show a progress bar with the loss.
        compare: score student, ensemble and base on the test split (a caller that scores the student
            itself, as a recipe run does, passes ``False``).

    Returns:
        The student :class:`Expert`. ``meta["distillation"]`` holds the teacher and, when compared, the
        test averages of student, ensemble and base, and ``kept``: the share of the ensemble's gain over
        the base that the student keeps (``None`` when the ensemble gains nothing).

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false (checked before any work).
        ConfigError: no tasks, a task without training inputs, or a non-LoRA method.
        ResumeError: a partial checkpoint exists that was made with another config, base, data or teacher.
    """
    config = config or TrainConfig()
    if config.method != "lora":
        raise ConfigError(f"distill: method {config.method!r}; expected 'lora' (the student is a plain LoRA adapter)")
    if not tasks_data:
        raise ConfigError("distill: expected at least one task's data, got none")
    out = check_output(out, overwrite)
    prepared = _targets(ensemble, tasks_data, config)
    steps = _schedule(prepared, config)
    ckpt = Checkpoint(out, _identity(ensemble, prepared, config))
    if overwrite:
        ckpt.clear()
    student = _student(ensemble, config)
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = linear_schedule(optimizer, len(steps), int(len(steps) * config.warmup_ratio))
    objective = _DistillObjective(student, prepared, config, ensemble.base.tokenizer.pad_token_id)
    result = run_loop(
        steps,
        Trainable(params, optimizer, scheduler),
        objective,
        config,
        ckpt,
        callback,
        "distill" if progress else None,
    )
    student.eval()
    results, report = _compare(student, ensemble, tasks_data, config) if compare else (None, {})
    expert = _save(
        student,
        ensemble,
        tasks_data,
        config,
        out,
        overwrite,
        results,
        report,
        {"train_examples": sum(len(p[1]) for p in prepared), **result.summary()},
    )
    ckpt.clear()
    return expert


def _save(
    student,
    ensemble: EnsemblePredictor,
    tasks_data: Sequence[TaskData],
    config: TrainConfig,
    out: Path,
    overwrite: bool,
    results: dict[str, Any] | None,
    report: dict[str, Any],
    run: dict[str, Any],
) -> Expert:
    """Write the student as an expert folder (plain PEFT LoRA plus ``adapterfuse.json``), atomically."""
    base = ensemble.base
    tasks = [td.task.name for td in tasks_data]
    test = {
        f"{t}.{m}": v
        for t, r in (results["student"]["tasks"] if results else {}).items()
        for m, v in r.items()
        if m not in ("n", "seconds", "examples_per_s")
    }
    meta = {
        "task": tasks[0] if len(tasks) == 1 else None,
        "tasks": tasks,
        "method": "distill",
        "seed": config.seed,
        "base": base.record(),
        "training": {**config.model_dump(mode="json"), **run},
        "distillation": {
            "teacher": {
                "members": ensemble.names,
                "pooling": ensemble.pooling,
                "weights": ensemble.weights,
                "temperature": ensemble.temperature,
            },
            "loss": "KL(ensemble || student) on the training inputs",
            **report,
        },
        "scores": {"test": test},
        "versions": versions(),
    }
    student.peft_config["default"].base_model_name_or_path = base.spec
    with atomic_dir(out, overwrite) as tmp:
        student.save_pretrained(tmp)
        expert = Expert.load(tmp, name=out.name)
        expert.config = stable_adapter_config(expert.config)
        expert.meta = meta
        expert.write_into(tmp)
    expert.path = out
    return expert
