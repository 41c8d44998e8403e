"""Distil an ensemble into one LoRA adapter: one forward pass per input instead of K.

The student is trained to match the pooled ensemble's distribution over the label words on the tasks'
training inputs: the loss is ``KL(ensemble || student)``, with the ensemble's probabilities computed
once, up front, by its batched forward pass. ``train.train_expert`` only takes hard labels (a soft
target only for STS-B's score), so this is a compact loop of its own, built from the same pieces: the
seeded length-bucketed :func:`~adapterfuse.train.expert.batch_schedule`, label-word logits, bf16 autocast for
the frozen base, fp32 adapter, AdamW with linear warm-up and decay, gradient clipping.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapterfuse.backends.ensemble.predictor import EnsemblePredictor
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert, versions
from adapterfuse.head import autocast_context, encode, label_logits, label_token_ids, pad
from adapterfuse.io.atomic import atomic_dir, check_output
from adapterfuse.tasks.spec import TaskData
from adapterfuse.train.config import TrainConfig


def _targets(ensemble: EnsemblePredictor, tasks_data: Sequence[TaskData], config: TrainConfig):
    """Per task: the training examples, their encoded prompts, label ids and the ensemble's probabilities."""
    out = []
    for td in tasks_data:
        train = list(td.train[: config.max_train_examples] if config.max_train_examples else td.train)
        if not train:
            raise ConfigError(f"distill: task {td.task.name} has no training inputs; expected a train split")
        probs = ensemble.predict_proba(td.task, train)  # once, batched over the K members
        encoded = encode(td.task, train, ensemble.base.tokenizer, config.max_length)
        out.append((td, encoded, label_token_ids(td.task, ensemble.base.tokenizer), probs))
    return out


def _schedule(prepared: list, config: TrainConfig) -> list[tuple[int, list[int]]]:
    """Every step's (task index, rows): each task's seeded length-bucketed batches, shuffled together."""
    from adapterfuse.train.expert import batch_schedule

    steps = [(t, rows) for t, (_, encoded, _, _) in enumerate(prepared)
             for rows in batch_schedule([len(x) for x in encoded], config.batch_size, config.epochs, config.seed + t)]
    random.Random(config.seed).shuffle(steps)
    return steps


def _student(ensemble: EnsemblePredictor, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(ensemble.base.model), lora)
    model.train()
    return model


def _train(model, prepared: list, steps: list, config: TrainConfig, pad_id: int,
           callback: Callable[[int, float], None] | None) -> float:
    """The training loop; returns its wall time in seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total, warmup = len(steps), int(len(steps) * config.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0 (as train.py)
        optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (total - s) / max(total - warmup, 1))))
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    for step, (t, rows) in enumerate(steps):
        _, encoded, labels, probs = prepared[t]
        ids, mask = pad([encoded[i] for i in rows], pad_id)
        with autocast_context(config.autocast, device):
            logits = label_logits(model, ids.to(device), mask.to(device), labels)
        loss = F.kl_div(torch.log_softmax(logits.float(), -1), probs[rows].to(device), reduction="batchmean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if callback is not None:
            callback(step + 1, loss.item())
    return time.perf_counter() - t0


def _compare(student, ensemble: EnsemblePredictor, tasks_data: Sequence[TaskData], config: TrainConfig):
    """Test-split results of the student, the ensemble and the base, and the share of the gain kept."""
    from adapterfuse.harness import ModelPredictor, ZeroShotPredictor, evaluate

    settings = dict(batch_size=config.eval_batch_size, autocast=config.autocast, max_length=config.max_length)
    predictors = {"student": ModelPredictor("distilled", student, ensemble.base.tokenizer, **settings),
                  "ensemble": ensemble, "base": ZeroShotPredictor(ensemble.base, **settings)}
    results = {k: evaluate(p, tasks_data, "test", config.max_eval_examples) for k, p in predictors.items()}
    avg = {k: r["average"] for k, r in results.items()}
    gain = avg["ensemble"] - avg["base"]
    kept = (avg["student"] - avg["base"]) / gain if abs(gain) > 1e-12 else None
    return results, {"test_average": avg, "kept": kept,
                     "per_task": {k: {t: v["score"] for t, v in r["tasks"].items()} for k, r in results.items()}}


def distill(ensemble: EnsemblePredictor, tasks_data: Sequence[TaskData], out: str | Path,
            config: TrainConfig | None = None, overwrite: bool = False,
            callback: Callable[[int, float], None] | None = None) -> Expert:
    """Train one LoRA adapter to match the pooled ensemble on the tasks' training inputs.

    Args:
        ensemble: the teacher.
        tasks_data: the tasks; their ``train`` inputs (labels unused) are distilled on, their ``test``
            split measures the result.
        out: the expert folder to write.
        config: the student's training settings (``method`` must be ``lora``; rank, lr, epochs, batch
            size, caps, seed, autocast are used).
        overwrite: replace an existing ``out``.
        callback: called as ``callback(step, loss)`` after every step.

    Returns:
        The student :class:`Expert`. ``meta["distillation"]`` holds the teacher, the test averages of
        student, ensemble and base, and ``kept``: the share of the ensemble's gain over the base that
        the student keeps (``None`` when the ensemble gains nothing).

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false (checked before any work).
        ConfigError: no tasks, a task without training inputs, or a non-LoRA method.
    """
    config = config or TrainConfig()
    if config.method != "lora":
        raise ConfigError(f"distill: method {config.method!r}; expected 'lora' (the student is a plain LoRA adapter)")
    if not tasks_data:
        raise ConfigError("distill: expected at least one task's data, got none")
    out = check_output(out, overwrite)
    prepared = _targets(ensemble, tasks_data, config)
    steps = _schedule(prepared, config)
    student = _student(ensemble, config)
    wall = _train(student, prepared, steps, config, ensemble.base.tokenizer.pad_token_id, callback)
    student.eval()
    results, report = _compare(student, ensemble, tasks_data, config)
    return _save(student, ensemble, tasks_data, config, out, overwrite, results, report,
                 {"steps": len(steps), "train_examples": sum(len(p[1]) for p in prepared),
                  "train_wall_s": round(wall, 2)})


def _save(student, ensemble: EnsemblePredictor, tasks_data: Sequence[TaskData], config: TrainConfig, out: Path,
          overwrite: bool, results: dict[str, Any], report: dict[str, Any], run: dict[str, Any]) -> Expert:
    """Write the student as an expert folder (plain PEFT LoRA plus ``adapterfuse.json``), atomically."""
    base = ensemble.base
    tasks = [td.task.name for td in tasks_data]
    test = {f"{t}.{m}": v for t, r in results["student"]["tasks"].items() for m, v in r.items()
            if m not in ("n", "seconds", "examples_per_s")}
    meta = {"task": tasks[0] if len(tasks) == 1 else None, "tasks": tasks, "method": "distill", "seed": config.seed,
            "base": {"spec": base.spec, "fingerprint": base.fingerprint},
            "training": {**config.model_dump(mode="json"), **run},
            "distillation": {"teacher": {"members": ensemble.names, "pooling": ensemble.pooling,
                                         "weights": ensemble.weights, "temperature": ensemble.temperature},
                             "loss": "KL(ensemble || student) on the training inputs", **report},
            "scores": {"test": test}, "versions": versions()}
    student.peft_config["default"].base_model_name_or_path = base.spec
    with atomic_dir(out, overwrite) as tmp:
        student.save_pretrained(tmp)
        expert = Expert.load(tmp, name=out.name)
        expert.meta = meta
        expert.write_into(tmp)
    expert.path = out
    return expert
