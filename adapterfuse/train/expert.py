"""train_expert(base, task, config) -> Expert: LoRA or AdaLoRA on the label words, resumable.

The loss is cross-entropy over the task's label words at the last position (a soft target over the
digits 0..5 for STS-B), never over the full vocabulary. The frozen base runs under bf16 autocast;
adapter weights, optimizer and loss stay fp32. Every ``checkpoint_every`` steps the adapter, optimizer,
scheduler, RNG and AdaLoRA allocator state go to ``.<out>.partial/``; a rerun with the same config and
base resumes from there and ends with the same bytes as an uninterrupted run. The finished expert is
written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError, ResumeError
from adapterfuse.expert import Expert, versions
from adapterfuse.head import autocast_context, class_weights, encode, label_logits, label_token_ids, pad, task_loss
from adapterfuse.io.atomic import atomic_dir, check_output, write_json
from adapterfuse.tasks.glue import dev_subset_seed, get_task, load_task
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec, capped_subset
from adapterfuse.train.config import TrainConfig

Callback = Callable[[int, float], None]


class LabelScorer(nn.Module):
    """The model as one module returning label-word logits, so DDP/accelerate see one forward."""

    def __init__(self, model: nn.Module, label_ids: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.label_ids = list(label_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return label_logits(self.model, input_ids, attention_mask, self.label_ids)


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
            chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        steps += batches
        epoch += 1
    return steps[:total]


def orth_regularizer(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty: mean ||PᵀP - I||_F over the trainable A and B factors."""
    total, count = torch.zeros(()), 0
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = p @ p.T if "lora_A" in name else p.T @ p
            total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device))
            count += 1
    return total / max(count, 1)


def _peft_config(config: TrainConfig, total_steps: int):
    from peft import AdaLoraConfig, LoraConfig

    common = dict(target_modules=list(config.target_modules), lora_alpha=config.lora_alpha,
                  lora_dropout=config.dropout, task_type="CAUSAL_LM")
    if config.method == "lora":
        return LoraConfig(r=config.rank, **common)
    tinit = int(total_steps * config.adalora_tinit_ratio)
    tfinal = int(total_steps * config.adalora_tfinal_ratio)
    return AdaLoraConfig(init_r=config.adalora_init_r, target_r=config.rank, tinit=tinit, tfinal=tfinal,
                         deltaT=config.adalora_delta_t, total_step=total_steps,
                         orth_reg_weight=config.adalora_orth_reg, **common)


def _fingerprint_data(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.idx, e.fields, e.label]).encode())
    return h.hexdigest()[:16]


def linear_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at step ``total``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (total - s) / max(total - warmup, 1))))


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


class _Checkpoint:
    """The partial-run folder: what would be resumed, and the refusal when the run changed."""

    def __init__(self, out: Path, identity: dict[str, Any]) -> None:
        self.dir = out.with_name(f".{out.name}.partial")
        self.identity = identity

    def load(self) -> dict[str, Any] | None:
        state_file, ckpt = self.dir / "state.json", self.dir / "checkpoint.pt"
        if not state_file.is_file() or not ckpt.is_file():
            return None
        saved = json.loads(state_file.read_text())["identity"]
        changed = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
        changed += [f"config.{k}" for k in sorted(set(saved.get("config", {})) | set(self.identity["config"]))
                    if saved.get("config", {}).get(k) != self.identity["config"].get(k)]
        if changed:
            raise ResumeError(f"checkpoint {self.dir}: was made with a different {', '.join(changed)}; expected "
                              "the same config, base and data to resume; remove that folder (or pass "
                              "--overwrite) to start afresh")
        return torch.load(ckpt, map_location="cpu", weights_only=True)

    def save(self, payload: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "checkpoint.pt.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.dir / "checkpoint.pt")  # a kill mid-write leaves the last complete one
        write_json(self.dir / "state.json", {"identity": self.identity, "step": payload["step"]})

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _allocator_state(peft_model: nn.Module) -> dict[str, Any]:
    alloc = getattr(peft_model.base_model, "rankallocator", None)
    if alloc is None:
        return {}
    rank_pattern = peft_model.peft_config["default"].rank_pattern
    return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
            "rank_pattern": rank_pattern}


def _restore_allocator(peft_model: nn.Module, state: dict[str, Any]) -> None:
    alloc = getattr(peft_model.base_model, "rankallocator", None)
    if alloc is None or not state:
        return
    alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
    peft_model.peft_config["default"].rank_pattern = state["rank_pattern"]


def train_expert(base: BaseModel, task: TaskSpec | str, config: TrainConfig | None = None,
                 out: str | Path | None = None, overwrite: bool = False, data: TaskData | None = None,
                 callback: Callback | None = None, progress: bool = True) -> Expert:
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
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    spec = get_task(task) if isinstance(task, str) else task
    if out is None:
        raise ConfigError("out: expected the expert folder to write, got None; pass out=PATH")
    out = check_output(out, overwrite)
    data = data or load_task(spec, config.validation_size, config.seed, config.max_train_examples)
    train = data.train[: config.max_train_examples] if config.max_train_examples else data.train
    labels = label_token_ids(spec, base.tokenizer)
    encoded = encode(spec, train, base.tokenizer, config.max_length)
    schedule = batch_schedule([len(x) for x in encoded], config.batch_size, config.epochs, config.seed)
    if config.snapshots > len(schedule):
        raise ConfigError(f"snapshots {config.snapshots}: more than the {len(schedule)} training steps; use at most "
                          f"{len(schedule)} or train on more examples/epochs")
    ends = cycle_ends(len(schedule), config.snapshots)
    identity = {"task": spec.name, "base": base.fingerprint, "data": _fingerprint_data(train),
                "config": config.model_dump(mode="json")}
    ckpt = _Checkpoint(out, identity)
    if overwrite:
        ckpt.clear()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(copy.deepcopy(base.model), _peft_config(config, len(schedule)))
    peft_model.train()
    scorer = LabelScorer(peft_model, labels)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = (linear_schedule(optimizer, len(schedule), int(len(schedule) * config.warmup_ratio))
                 if config.snapshots == 1 else cyclic_schedule(optimizer, ends))
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    weights = class_weights(spec, train, config.balance_classes)

    start, prior_wall, tokens_before, snapshots = 0, 0.0, 0, []
    state = ckpt.load()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    if state is not None:
        with torch.no_grad():
            for name, tensor in state["adapter"].items():
                trainable[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        _restore_allocator(peft_model, state.get("allocator", {}))
        start = state["step"]
        prior_wall, tokens_before = state.get("wall_s", 0.0), state.get("tokens", 0)
        snapshots = state.get("snapshots", [])

    t0, tokens = time.perf_counter(), tokens_before  # wall time and tokens add up across resumes
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(range(start, len(schedule)), desc=f"train {spec.name}", initial=start, total=len(schedule),
               disable=not progress or not accelerator.is_main_process)
    for step in bar:
        rows = schedule[step][rank::world] or schedule[step][:1]
        ids, mask = pad([encoded[i] for i in rows], base.tokenizer.pad_token_id)
        tokens += int(mask.sum()) * world
        with autocast_context(config.autocast, accelerator.device):
            logits = scorer(ids.to(accelerator.device), mask.to(accelerator.device))
        loss = task_loss(spec, logits.cpu(), [train[i].label for i in rows], weights)
        if config.method == "adalora":
            loss = loss + config.adalora_orth_reg * orth_regularizer(peft_model)
        accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        if config.method == "adalora":
            peft_model.base_model.update_and_allocate(step)  # needs this step's gradients: before zero_grad
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if config.snapshots > 1 and done in ends:
            snapshots.append({n: p.detach().clone() for n, p in trainable.items()})
        if accelerator.is_main_process and (done % config.checkpoint_every == 0) and done < len(schedule):
            ckpt.save({"step": done, "adapter": {n: p.detach().clone() for n, p in trainable.items()},
                       "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "rng": torch.get_rng_state(), "allocator": _allocator_state(peft_model),
                       "wall_s": prior_wall + time.perf_counter() - t0, "tokens": tokens,
                       "snapshots": snapshots})
        if callback is not None:
            callback(done, loss.item())
    train_wall = prior_wall + time.perf_counter() - t0
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # one process evaluates and writes; the others wait, then load it
        run = {"train_examples": len(train), "steps": len(schedule), "resumed_from_step": start,
               "train_wall_s": round(train_wall, 2), "train_tokens_per_s": round(tokens / max(train_wall, 1e-9), 1)}
        if config.snapshots == 1:
            with atomic_dir(out, overwrite) as tmp:
                expert = _evaluate_into(peft_model, base, spec, data, config, run, tmp, out.name)
        else:
            expert = _save_snapshots(peft_model, trainable, snapshots, base, spec, data, config, run, out, overwrite)
        expert.path = out / expert.name if config.snapshots > 1 else out
        ckpt.clear()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        return expert
    return Expert.load(out / f"snapshot-{config.snapshots}" if config.snapshots > 1 else out)


def _save_snapshots(peft_model: nn.Module, trainable: dict[str, nn.Parameter], snapshots: list[dict[str, Any]],
                    base: BaseModel, spec: TaskSpec, data: TaskData, config: TrainConfig, run: dict[str, Any],
                    out: Path, overwrite: bool) -> Expert:
    """Write ``out/snapshot-1 … snapshot-N``, each a scored expert folder, in one atomic rename."""
    with atomic_dir(out, overwrite) as tmp:
        for i, snapshot in enumerate(snapshots, start=1):
            with torch.no_grad():
                for name, tensor in snapshot.items():
                    trainable[name].copy_(tensor)
            (tmp / f"snapshot-{i}").mkdir()
            expert = _evaluate_into(peft_model, base, spec, data, config, {**run, "snapshot": i},
                                    tmp / f"snapshot-{i}", f"snapshot-{i}")
    return expert  # the last snapshot: the run's final adapter


def _evaluate_into(peft_model: nn.Module, base: BaseModel, spec: TaskSpec, data: TaskData, config: TrainConfig,
                   run: dict[str, Any], tmp: Path, name: str) -> Expert:
    """Score the trained adapter on validation and test, then write the expert files into ``tmp``."""
    from adapterfuse.harness import score_examples

    peft_model.eval()
    t0 = time.perf_counter()
    # The same seeded subset of dev that load_task(max_test=...) and the other commands score.
    test = capped_subset(data.test, config.max_eval_examples, dev_subset_seed(config.seed))
    scores = {"validation": score_examples(peft_model, base.tokenizer, spec, data.validation, config)
              if data.validation else {},
              "test": score_examples(peft_model, base.tokenizer, spec, test, config)}
    meta = {"task": spec.name, "method": config.method, "seed": config.seed,
            "base": {"spec": base.spec, "fingerprint": base.fingerprint},
            "training": {**config.model_dump(mode="json"), **run, "eval_wall_s": round(time.perf_counter() - t0, 2)},
            "scores": scores, "versions": versions()}
    # Name the base by its spec (a Hub id for the default), not the local cache folder it was read from.
    peft_model.peft_config["default"].base_model_name_or_path = base.spec
    peft_model.save_pretrained(tmp)
    expert = Expert.load(tmp, name=name)
    expert.meta = meta
    if config.method == "adalora":
        expert.meta["adalora_ranks"] = {m: d.rank for m, d in expert.deltas.items()}
    expert.write_into(tmp)
    return expert
