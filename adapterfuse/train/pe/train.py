"""train_pe_ensemble(base, task, PESpec(kind, members, config, options)) -> PEEnsemble: K members sharing weights.

The loop is :func:`adapterfuse.train.loop.run_loop`, as for an expert (same seeded batch schedule,
label-word loss, AdamW, linear warm-up and decay, gradient clipping, bf16 autocast for the frozen base
with the adapter in fp32); the members' loss is its plug-in, and what differs per kind is how a step's
rows reach the members:

- ``batchensemble``: the batch is replicated once per member (``be_data='all'``) or cut into K
  member blocks (``'split'``), and run as one batched pass of ``K*n`` member-contiguous rows;
- ``camero``: replicated like BatchEnsemble, with per-member perturbations and a consistency loss;
- ``mimo``: K independent examples packed per row, one shared adapter (see :mod:`.mimo`);
- ``swag``: one shared LoRA, snapshotted along the end of training (see :mod:`.swag`).

The loss is the mean of the members' losses, so a member's own parameters get ``1/K`` of the
gradient its separate training would give, and shared parameters the mean of the members' gradients.
Every ``checkpoint_every`` steps the trained tensors, optimizer, scheduler, RNG and SWAG statistics go to
``.<out>.partial/``; a rerun with the same config, kind, options, base and data resumes from there and
ends with the same bytes as an uninterrupted run. The output is written at the end, atomically. The
test split is scored on the same seeded subset as an expert's (:func:`~adapterfuse.train.loop.scored_test`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.expert import versions
from adapterfuse.head import (
    autocast_context,
    class_weights,
    encode,
    label_token_ids,
    member_logits,
    pad,
    predictions,
    task_loss,
)
from adapterfuse.io.atomic import check_output
from adapterfuse.surgery import shared_copy
from adapterfuse.tasks.glue import get_task, load_task
from adapterfuse.tasks.metrics import compute_metrics
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec
from adapterfuse.train.activations import checkpoint_if_needed
from adapterfuse.train.config import TrainConfig
from adapterfuse.train.loop import (
    Callback,
    LoopResult,
    Objective,
    Trainable,
    batch_schedule,
    linear_schedule,
    run_checkpoint,
    run_loop,
    scored_test,
)
from adapterfuse.train.pe import batchensemble, camero, mimo
from adapterfuse.train.pe.layers import (
    MemberLoRALinear,
    flat_tensors,
    install,
    target_modules,
    trained_params,
)
from adapterfuse.train.pe.options import PEOptions, PESpec, parse_options
from adapterfuse.train.pe.predictor import FORMAT_VERSION, PEEnsemble
from adapterfuse.train.pe.swag import SwagPosterior, flatten, lr_factor, snapshot_steps


def members_loss(
    task: TaskSpec,
    logits: torch.Tensor,
    labels: Sequence[Sequence[float]],
    class_weights: torch.Tensor | None = None,
    consistency: float = 0.0,
) -> torch.Tensor:
    """The mean of the members' label-word losses, plus ``consistency`` × CAMERO's consistency term.

    Args:
        task: the task (classification or regression loss, as :func:`adapterfuse.head.task_loss`).
        logits: ``[K, n, L]`` member logits.
        labels: one label list per member (``K`` lists of ``n``).
        class_weights: optional per-class loss weights.
        consistency: the weight of :func:`adapterfuse.train.pe.camero.consistency_loss`.

    Returns:
        A scalar loss.
    """
    loss = torch.stack([task_loss(task, logits[i], labels[i], class_weights) for i in range(logits.shape[0])]).mean()
    if consistency:
        loss = loss + consistency * camero.consistency_loss(logits)
    return loss


def build_layout(kind: str, model: nn.Module, modules: Sequence[str], opts: PEOptions) -> dict[str, str]:
    """Module -> mode for a kind (BatchEnsemble: all rank-1; CAMERO: shared bottom; MIMO/SWAG: shared)."""
    if kind == "batchensemble":
        return batchensemble.layout(modules)
    if kind == "camero":
        return camero.layout(modules, camero.shared_layer_count(model, opts.camero_shared_layers))
    return dict.fromkeys(modules, "shared")


@dataclass
class _PEObjective(Objective):
    """The members' loss plug-in for a kind (forward of a step's rows, mean member loss), and SWAG's
    collection of the adapter after the updates it snapshots."""

    kind: str
    k: int
    opts: PEOptions
    spec: TaskSpec
    train: Sequence[Example]
    encoded: list[list[int]]
    label_ids: list[int]
    base: BaseModel
    config: TrainConfig
    model: nn.Module
    layers: dict[str, MemberLoRALinear]
    total: int
    shared_layers: int = 0

    def __post_init__(self) -> None:
        self.pad_id = self.base.tokenizer.pad_token_id
        self.sep = self.base.tokenizer.encode(self.opts.mimo_separator, add_special_tokens=False)
        self.weights = class_weights(self.spec, self.train, self.config.balance_classes)
        swag = self.kind == "swag"
        self.snaps = snapshot_steps(self.total, self.opts.swag_start, self.opts.swag_every) if swag else set()
        self.swag = SwagPosterior.empty(trained_params(self.layers), self.opts.swag_rank) if swag else None

    def tokens(self, rows: list[int]) -> int:
        """The real (unpadded) tokens of the step's rows."""
        return sum(len(self.encoded[i]) for i in rows)

    def loss(self, step: int, rows: list[int]) -> torch.Tensor:
        """The loss of one step (forward under the config's autocast; the loss in fp32)."""
        device = next(self.model.parameters()).device
        with autocast_context(self.config.autocast, device):
            if self.kind == "mimo":
                slots = mimo.slot_rows(rows, self.k, self.config.seed, step, self.opts.mimo_repeat)
                ids, mask, pos = mimo.pack([[self.encoded[i] for i in s] for s in slots], self.sep, self.pad_id)
                logits = mimo.slot_logits(self.model, ids.to(device), mask.to(device), pos, self.label_ids)
                labels = [[self.train[i].label for i in s] for s in slots]
            elif self.kind == "batchensemble" and self.opts.be_data == "split":
                member_rows = batchensemble.split_rows(rows, self.k)
                ids, mask = pad([self.encoded[i] for i in member_rows], self.pad_id)
                logits = member_logits(
                    self.model, ids.to(device), mask.to(device), self.label_ids, self.k, replicate=False
                )
                size = len(member_rows) // self.k
                labels = [[self.train[i].label for i in member_rows[j * size : (j + 1) * size]] for j in range(self.k)]
            else:
                k = self.k if self.kind in ("batchensemble", "camero") else 1
                ids, mask = pad([self.encoded[i] for i in rows], self.pad_id)
                noise = (
                    (self.opts.camero_perturbation, self.opts.camero_perturbation_scale)
                    if self.kind == "camero"
                    else ("none", 0.0)
                )
                with camero.perturbation(self.model, self.shared_layers, *noise):
                    logits = member_logits(self.model, ids.to(device), mask.to(device), self.label_ids, k)
                labels = [[self.train[i].label for i in rows]] * k
        weight = self.opts.camero_consistency if self.kind == "camero" else 0.0
        return members_loss(self.spec, logits.float().cpu(), labels, self.weights, weight)

    def after_update(self, step: int) -> None:
        """SWAG: take a snapshot of the adapter after the updates it collects at."""
        if self.swag is not None and step + 1 in self.snaps:
            self.swag.collect(flatten(flat_tensors(self.layers)))

    def state(self) -> dict[str, Any]:
        """SWAG's running statistics so far (nothing for the other kinds)."""
        if self.swag is None:
            return {}
        return {"swag": {**self.swag.state(), "count": self.swag.count}}

    def load_state(self, payload: dict[str, Any]) -> None:
        """Restore :meth:`state`."""
        if self.swag is not None and "swag" in payload:
            saved = payload["swag"]
            self.swag = SwagPosterior.from_state(saved, saved["count"], self.opts.swag_rank)


def _scheduler(kind: str, opts: PEOptions, optimizer: torch.optim.Optimizer, total: int, warmup: int):
    """Linear warm-up then linear decay to 0 (as train_expert); SWAG holds its rate while it collects."""
    if kind == "swag":
        start = int(total * opts.swag_start)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, warmup, start, opts.swag_lr_ratio)
        )
    return linear_schedule(optimizer, total, warmup)


def prepare_model(
    base: BaseModel, kind: str, members: int, config: TrainConfig, opts: PEOptions
) -> tuple[nn.Module, dict[str, MemberLoRALinear], dict[str, str]]:
    """A private copy of the base with the kind's trainable layers installed and initialised (seeded).

    Returns:
        ``(model, layers, layout)``; the caller's base is never modified.
    """
    model = shared_copy(base.model)
    layout = build_layout(kind, model, target_modules(model, config.target_modules), opts)
    k_rows = members if kind in ("batchensemble", "camero") else 1
    layers = install(model, layout, k_rows, config.rank, config.lora_alpha / config.rank, config.dropout, config.seed)
    if kind == "batchensemble":
        batchensemble.init_rank1(layers, opts.be_jitter, config.seed)
    return model, layers, layout


def train_pe_ensemble(
    base: BaseModel,
    task: TaskSpec | str,
    spec: PESpec = PESpec(),
    out: str | Path | None = None,
    overwrite: bool = False,
    data: TaskData | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> PEEnsemble:
    """Train a parameter-efficient ensemble of ``spec.members`` members for one task and save it as a folder.

    Args:
        base: the frozen base (never modified).
        task: the task (spec or name).
        spec: the kind (``batchensemble``, ``mimo``, ``camero`` or ``swag``), K (members, MIMO slots, or
            SWAG samples), the training settings and the kind's options (see
            :class:`~adapterfuse.train.pe.options.PESpec`).
        out: the folder to write; required.
        overwrite: replace an existing ``out`` (and discard a stale partial checkpoint).
        data: the task's splits (loaded with the config's sizes when omitted).
        callback: ``callback(step, loss)`` after every step (progress, tests, early stop).
        progress: show a progress bar.

    Returns:
        The saved :class:`PEEnsemble` (``.predictor(base)`` for the harness, ``.merged()`` for one adapter).

    Raises:
        ConfigError: unknown kind or option, members < 1, AdaLoRA, no ``out`` (all before any work).
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        ResumeError: a partial checkpoint exists that was made with another config, kind, options, base or data.
    """
    kind, members, config = spec.kind, spec.members, spec.config or TrainConfig()
    opts = parse_options(kind, members, config, dict(spec.options or {}))
    task_spec = get_task(task) if isinstance(task, str) else task
    if out is None:
        raise ConfigError("out: expected the folder to write, got None")
    out = check_output(out, overwrite)
    data = data or load_task(task_spec, config.validation_size, config.seed, config.max_train_examples)
    train = data.train[: config.max_train_examples] if config.max_train_examples else data.train
    encoded = encode(task_spec, train, base.tokenizer, config.max_length)
    schedule = batch_schedule([len(x) for x in encoded], config.batch_size, config.epochs, config.seed)
    options = opts.model_dump(mode="json")
    ckpt = run_checkpoint(
        out, task_spec.name, base.fingerprint, train, config, kind=kind, members=members, options=options
    )
    if overwrite:
        ckpt.clear()

    torch.manual_seed(config.seed)
    model, layers, layout = prepare_model(base, kind, members, config, opts)
    model.train()
    # K copies of each row (BatchEnsemble on all data, CAMERO) or K prompts packed per row (MIMO)
    k_fold = kind in ("camero", "mimo") or (kind == "batchensemble" and opts.be_data == "all")
    largest = max((members if k_fold else 1) * len(step) * max(len(encoded[i]) for i in step) for step in schedule)
    checkpointed = checkpoint_if_needed(model, largest)  # same bytes either way; less memory, more time
    params = {f"{m}.{n}": p for m, layer in layers.items() for n, p in layer.tensors().items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    total = len(schedule)
    scheduler = _scheduler(kind, opts, optimizer, total, int(total * config.warmup_ratio))
    shared = camero.shared_layer_count(model, opts.camero_shared_layers) if kind == "camero" else 0
    objective = _PEObjective(
        kind,
        members,
        opts,
        task_spec,
        train,
        encoded,
        label_token_ids(task_spec, base.tokenizer),
        base,
        config,
        model,
        layers,
        total,
        shared,
    )
    result = run_loop(
        schedule,
        Trainable(params, optimizer, scheduler),
        objective,
        config,
        ckpt,
        callback,
        f"train {kind} {task_spec.name}" if progress else None,
    )
    ensemble = _ensemble(objective, layout, base, len(train), result, opts)
    ensemble.manifest["training"]["activation_checkpointing"] = checkpointed
    ensemble.manifest["scores"] = _scores(ensemble, base, data, config)
    ensemble.save(out, overwrite)
    ckpt.clear()
    return ensemble


def _ensemble(
    objective: _PEObjective,
    layout: dict[str, str],
    base: BaseModel,
    train_examples: int,
    result: LoopResult,
    opts: PEOptions,
) -> PEEnsemble:
    """The trained ensemble with its manifest (SWAG: the posterior's statistics in place of the adapter)."""
    config, layers = objective.config, objective.layers
    tensors = flat_tensors(layers)
    run = result.summary()
    manifest = {
        "kind": "pe_ensemble",
        "format_version": FORMAT_VERSION,
        "method": objective.kind,
        "members": objective.k,
        "task": objective.spec.name,
        "layout": layout,
        "rank": config.rank,
        "scale": config.lora_alpha / config.rank,
        "options": opts.model_dump(mode="json"),
        "base": base.record(),
        "training": {
            **config.model_dump(mode="json"),
            "train_examples": train_examples,
            "steps": run["steps"],
            "resumed_from_step": run["resumed_from_step"],
            "trained_params": trained_params(layers),
            "train_wall_s": run["train_wall_s"],
            "train_tokens_per_s": run["train_tokens_per_s"],
        },
        "versions": versions(),
    }
    swag = objective.swag
    if swag is not None:
        manifest["shapes"] = {n: list(t.shape) for n, t in tensors.items()}
        seed = opts.sample_seed if opts.sample_seed is not None else config.seed
        manifest["swag"] = {"count": swag.count, "rank": swag.rank, "sample_seed": seed}
        tensors = swag.state()
    return PEEnsemble(manifest, tensors)


def _scores(ensemble: PEEnsemble, base: BaseModel, data: TaskData, config: TrainConfig) -> dict[str, Any]:
    """Validation and test metrics of the pooled members, on the examples train_expert scores for an expert."""
    predictor = ensemble.predictor(
        base, batch_size=config.eval_batch_size, autocast=config.autocast, max_length=config.max_length
    )
    out: dict[str, Any] = {}
    for split, examples in (("validation", data.validation), ("test", scored_test(data.test, config))):
        if examples:
            probs = predictor.predict_proba(data.task, list(examples))
            out[split] = compute_metrics(data.task.metrics, predictions(data.task, probs), [e.label for e in examples])
    return out
