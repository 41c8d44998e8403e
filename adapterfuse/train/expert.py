"""train_expert(base, task, config) -> Expert: LoRA or AdaLoRA on the label words, resumable.

The loss is cross-entropy over the task's label words at the last position (a soft target over the
digits 0..5 for STS-B), never over the full vocabulary. It is the expert's plug-in to
:func:`adapterfuse.train.loop.run_loop`: the frozen base runs under bf16 autocast; adapter weights,
optimizer and loss stay fp32. Every ``checkpoint_every`` steps the adapter, optimizer, scheduler, RNG,
AdaLoRA allocator state and the snapshots taken so far go to ``.<out>.partial/``; a rerun with the same
config and base resumes from there and ends with the same bytes as an uninterrupted run. The finished
expert is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterfuse.base import BaseModel
from adapterfuse.device import model_device
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert, versions
from adapterfuse.head import autocast_context, class_weights, encode, label_logits, label_token_ids, pad, task_loss
from adapterfuse.io.atomic import atomic_dir, check_output
from adapterfuse.io.card import invocation
from adapterfuse.tasks.glue import get_task, load_task
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec
from adapterfuse.train.average import average_steps, stack_snapshots
from adapterfuse.train.config import TrainConfig, stable_adapter_config
from adapterfuse.train.loop import (
    Callback,
    Checkpoint,
    Objective,
    Trainable,
    batch_schedule,
    cycle_ends,
    cyclic_schedule,
    linear_schedule,
    run_checkpoint,
    run_loop,
    scored_test,
)


class LabelScorer(nn.Module):
    """The model as one module returning label-word logits, so DDP/accelerate see one forward."""

    def __init__(self, model: nn.Module, label_ids: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.label_ids = list(label_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return label_logits(self.model, input_ids, attention_mask, self.label_ids)


def orth_regularizer(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty: mean ||PᵀP - I||_F over the trainable A and B factors."""
    total, count = torch.zeros((), device=model_device(model)), 0
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = p @ p.T if "lora_A" in name else p.T @ p
            total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device))
            count += 1
    return total / max(count, 1)


def _peft_config(config: TrainConfig, total_steps: int):
    from peft import AdaLoraConfig, LoraConfig

    common = dict(
        target_modules=list(config.target_modules),
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        task_type="CAUSAL_LM",
    )
    if config.method == "lora":
        return LoraConfig(r=config.rank, **common)
    tinit = int(total_steps * config.adalora_tinit_ratio)
    tfinal = int(total_steps * config.adalora_tfinal_ratio)
    return AdaLoraConfig(
        init_r=config.adalora_init_r,
        target_r=config.rank,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=config.adalora_delta_t,
        total_step=total_steps,
        orth_reg_weight=config.adalora_orth_reg,
        **common,
    )


def _allocator_state(peft_model: nn.Module) -> dict[str, Any]:
    alloc = getattr(peft_model.base_model, "rankallocator", None)
    if alloc is None:
        return {}
    rank_pattern = peft_model.peft_config["default"].rank_pattern
    return {
        "ipt": alloc.ipt,
        "exp_avg_ipt": alloc.exp_avg_ipt,
        "exp_avg_unc": alloc.exp_avg_unc,
        "rank_pattern": rank_pattern,
    }


def _restore_allocator(peft_model: nn.Module, state: dict[str, Any]) -> None:
    alloc = getattr(peft_model.base_model, "rankallocator", None)
    if alloc is None or not state:
        return
    alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
    peft_model.peft_config["default"].rank_pattern = state["rank_pattern"]


@dataclass
class _ExpertObjective(Objective):
    """The expert's loss plug-in: label-word cross-entropy (plus AdaLoRA's orthogonality penalty) on this
    process's share of a batch; after each update AdaLoRA's rank allocation and the cycle-end snapshots."""

    scorer: nn.Module
    peft_model: nn.Module
    spec: TaskSpec
    train: Sequence[Example]
    encoded: list[list[int]]
    pad_id: int
    config: TrainConfig
    accelerator: Any
    ends: Sequence[int]
    snapshots: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = model_device(self.peft_model)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.weights = class_weights(self.spec, self.train, self.config.balance_classes)
        self.trainable = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}

    def _rows(self, batch: list[int]) -> list[int]:
        return batch[self.rank :: self.world] or batch[:1]

    def tokens(self, batch: list[int]) -> int:
        """Tokens of all processes' rows (each process sees its share)."""
        return sum(len(self.encoded[i]) for i in self._rows(batch)) * self.world

    def loss(self, step: int, batch: list[int]) -> torch.Tensor:
        """Cross-entropy over the label words (fp32), the frozen base under the config's autocast."""
        rows = self._rows(batch)
        ids, mask = pad([self.encoded[i] for i in rows], self.pad_id)
        with autocast_context(self.config.autocast, self.device):
            logits = self.scorer(ids.to(self.device), mask.to(self.device))
        loss = task_loss(self.spec, logits, [self.train[i].label for i in rows], self.weights)
        if self.config.method == "adalora":
            loss = loss + self.config.adalora_orth_reg * orth_regularizer(self.peft_model)
        return loss

    def after_update(self, step: int) -> None:
        """AdaLoRA's allocation (it needs this step's gradients); a snapshot at each cycle's end."""
        if self.config.method == "adalora":
            self.peft_model.base_model.update_and_allocate(step)
        if (self.config.snapshots > 1 or self.config.average_last > 1) and step + 1 in self.ends:
            self.snapshots.append({n: p.detach().clone() for n, p in self.trainable.items()})

    def state(self) -> dict[str, Any]:
        """AdaLoRA's allocator state and the snapshots taken so far."""
        return {"allocator": _allocator_state(self.peft_model), "snapshots": self.snapshots}

    def load_state(self, payload: dict[str, Any]) -> None:
        """Restore :meth:`state`."""
        _restore_allocator(self.peft_model, payload.get("allocator", {}))
        self.snapshots = payload.get("snapshots", [])


def train_expert(
    base: BaseModel,
    task: TaskSpec | str,
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    data: TaskData | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> Expert:
    """Train one LoRA or AdaLoRA expert for one task and save it as an expert folder.

    Args:
        base: the frozen base (it is copied, never modified).
        task: the task (spec or name).
        config: training settings (defaults: :class:`TrainConfig`).
        out: the expert folder to write; required.
        overwrite: replace an existing ``out`` (and discard a stale partial checkpoint).
        data: the task's splits; loaded from GLUE_DIR/the Hub with the config's sizes when omitted.
        callback: called as ``callback(step, loss)`` after every step (progress, tests, early stop).
        progress: show a progress bar with the loss.

    Returns:
        The trained :class:`Expert`, with validation and test scores in its metadata. With
        ``config.snapshots = N > 1``, ``out`` holds ``snapshot-1 … snapshot-N`` (one expert folder each,
        taken at the end of each cosine cycle) and the last snapshot is returned.

    Raises:
        ConfigError: more snapshots than training steps.
        OutputExistsError: ``out`` exists and ``overwrite`` is false (checked before any work).
        ResumeError: a partial checkpoint exists that was made with another config, base or data.
    """
    from accelerate import Accelerator
    from peft import get_peft_model

    config = config or TrainConfig()
    spec = get_task(task) if isinstance(task, str) else task
    if out is None:
        raise ConfigError("out: expected the expert folder to write, got None; pass out=PATH")
    out = check_output(out, overwrite)
    data = data or load_task(spec, config.validation_size, config.seed, config.max_train_examples)
    train, encoded, schedule, ckpt = _plan(base, spec, data, config, out)
    if overwrite:
        ckpt.clear()

    # The base's device decides: the copy trains where the base is (a base loaded on the CPU trains there
    # even when a GPU is present; under a multi-GPU launch each process's base is on its own GPU).
    accelerator = Accelerator(cpu=base.device.type == "cpu", device_placement=False)
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(copy.deepcopy(base.model), _peft_config(config, len(schedule)))
    peft_model.train()
    scorer = LabelScorer(peft_model, label_token_ids(spec, base.tokenizer))
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    ends = _kept_steps(config, len(schedule))
    scheduler = (
        linear_schedule(optimizer, len(schedule), int(len(schedule) * config.warmup_ratio))
        if config.snapshots == 1
        else cyclic_schedule(optimizer, ends)
    )
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    objective = _ExpertObjective(
        scorer, peft_model, spec, train, encoded, base.tokenizer.pad_token_id, config, accelerator, ends
    )
    title = f"train {spec.name}" if progress else None
    trainable = Trainable(params, optimizer, scheduler)
    result = run_loop(schedule, trainable, objective, config, ckpt, callback, title, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # one process evaluates and writes; the others wait, then load it
        run = {"train_examples": len(train), **result.summary()}
        if config.snapshots == 1:
            if config.average_last > 1:  # the adapter saved is the mean of the kept steps' adapters
                run["averaged_steps"] = ends
                peft_model = _averaged_model(base, config, objective.snapshots, len(schedule))
            with atomic_dir(out, overwrite) as tmp:
                expert = _evaluate_into(peft_model, base, spec, data, config, run, tmp, out.name)
        else:
            expert = _save_snapshots(
                peft_model, params, objective.snapshots, base, spec, data, config, run, out, overwrite
            )
        expert.path = out / expert.name if config.snapshots > 1 else out
        ckpt.clear()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        return expert
    return Expert.load(out / f"snapshot-{config.snapshots}" if config.snapshots > 1 else out)


def _kept_steps(config: TrainConfig, total: int) -> list[int]:
    """The steps whose adapters are kept: the last ones to average, or the ends of the snapshot cycles."""
    if config.average_last > 1:
        return average_steps(total, config.average_last, config.checkpoint_every)
    return cycle_ends(total, config.snapshots)


def bootstrap_sample(examples: list[Example], seed: int) -> list[Example]:
    """A bootstrap resample: as many examples as given, drawn with replacement, seeded (bagging).

    Args:
        examples: the training examples.
        seed: the draw's seed (the run's seed: members of a bagged ensemble differ by seed).

    Returns:
        The resampled list; the same seed gives the same list.
    """
    generator = torch.Generator().manual_seed(BOOTSTRAP_SEED_OFFSET + seed)
    return [examples[i] for i in torch.randint(len(examples), (len(examples),), generator=generator).tolist()]


# Kept apart from the seeds of the data split, the batch order and the adapter's initialisation, so that
# bagging changes which examples are drawn and nothing else.
BOOTSTRAP_SEED_OFFSET = 7919


def _plan(
    base: BaseModel, spec: TaskSpec, data: TaskData, config: TrainConfig, out: Path
) -> tuple[list[Example], list[list[int]], list[list[int]], Checkpoint]:
    """The training examples, their tokens, every step's batch, and the checkpoint that can resume them.

    Raises:
        ConfigError: more snapshots than training steps.
    """
    train = data.train[: config.max_train_examples] if config.max_train_examples else data.train
    if config.bootstrap:
        train = bootstrap_sample(train, config.seed)
    encoded = encode(spec, train, base.tokenizer, config.max_length)
    schedule = batch_schedule([len(x) for x in encoded], config.batch_size, config.epochs, config.seed)
    if config.snapshots > len(schedule):
        raise ConfigError(
            f"snapshots {config.snapshots}: more than the {len(schedule)} training steps; use at most "
            f"{len(schedule)} or train on more examples/epochs"
        )
    return train, encoded, schedule, run_checkpoint(out, spec.name, base.fingerprint, train, config)


def _averaged_model(base: BaseModel, config: TrainConfig, snapshots: list[dict[str, Any]], steps: int) -> nn.Module:
    """A PEFT model of rank ``N·rank`` (alpha ``N·alpha``) holding the exact mean of the snapshots' ΔW."""
    from peft import get_peft_model

    n = len(snapshots)
    wide = config.model_copy(update={"rank": n * config.rank, "alpha": n * config.lora_alpha})
    model = get_peft_model(copy.deepcopy(base.model), _peft_config(wide, steps))
    stacked = stack_snapshots(snapshots)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in stacked:
                param.copy_(stacked[name])
    return model


def _save_snapshots(
    peft_model: nn.Module,
    trainable: dict[str, nn.Parameter],
    snapshots: list[dict[str, Any]],
    base: BaseModel,
    spec: TaskSpec,
    data: TaskData,
    config: TrainConfig,
    run: dict[str, Any],
    out: Path,
    overwrite: bool,
) -> Expert:
    """Write ``out/snapshot-1 … snapshot-N``, each a scored expert folder, in one atomic rename."""
    with atomic_dir(out, overwrite) as tmp:
        for i, snapshot in enumerate(snapshots, start=1):
            with torch.no_grad():
                for name, tensor in snapshot.items():
                    trainable[name].copy_(tensor)
            (tmp / f"snapshot-{i}").mkdir()
            expert = _evaluate_into(
                peft_model, base, spec, data, config, {**run, "snapshot": i}, tmp / f"snapshot-{i}", f"snapshot-{i}"
            )
    return expert  # the last snapshot: the run's final adapter


def _evaluate_into(
    peft_model: nn.Module,
    base: BaseModel,
    spec: TaskSpec,
    data: TaskData,
    config: TrainConfig,
    run: dict[str, Any],
    tmp: Path,
    name: str,
) -> Expert:
    """Score the trained adapter on validation and test, then write the expert files into ``tmp``."""
    from adapterfuse.harness import score_examples

    peft_model.eval()
    t0 = time.perf_counter()
    test = scored_test(data.test, config)
    scores = {
        "validation": score_examples(peft_model, base.tokenizer, spec, data.validation, config)
        if data.validation
        else {},
        "test": score_examples(peft_model, base.tokenizer, spec, test, config),
    }
    meta = {
        "task": spec.name,
        "method": config.method,
        "seed": config.seed,
        "base": base.record(),
        "training": {**config.model_dump(mode="json"), **run, "eval_wall_s": round(time.perf_counter() - t0, 2)},
        "scores": scores,
        "versions": versions(),
        **({"command": command} if (command := invocation()) else {}),  # the CLI line, shown on the card
    }
    # Name the base by its spec (a Hub id for the default), not the local cache folder it was read from.
    peft_model.peft_config["default"].base_model_name_or_path = base.spec
    peft_model.save_pretrained(tmp)
    expert = Expert.load(tmp, name=name)
    expert.config = stable_adapter_config(expert.config)
    expert.meta = meta
    if config.method == "adalora":
        expert.meta["adalora_ranks"] = {m: d.rank for m, d in expert.deltas.items()}
    expert.write_into(tmp)
    return expert
