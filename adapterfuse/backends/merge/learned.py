"""Merge weights learned on the validation split (Lotfi et al., "Trade-offs in Ensembling, Merging and
Routing Among Parameter-Efficient Experts", https://arxiv.org/abs/2603.03535; gradient-free as in
LoraHub, Huang et al. 2023, https://arxiv.org/abs/2307.13269).

The weighted merge ``ΔW(w) = Σ_i w_i B_i A_i`` is made differentiable in ``w`` without forming any
ΔW: every expert's factors are concatenated into ONE LoRA adapter of rank ``Σ r_i`` (``B_cat``,
``A_cat``), and a forward pre-hook on each ``lora_B`` multiplies the rank-space activations
``A_cat x`` by ``w`` repeated over each expert's rank block. So the model computes
``B_cat diag(w) A_cat x = ΔW(w) x`` exactly, and only the K (or K × layers) weights train.

- ``mode="gradient"``: Adam on the validation loss (``head.task_loss`` on the label logits), seeded.
- ``mode="gradient_free"``: a seeded (1+λ) evolution strategy in the box ``[-bound, bound]`` on the
  loss plus LoraHub's L1 penalty ``l1 · mean_layers Σ_i |w_i|``; a candidate whose plain loss is above
  the uniform start's is never accepted, so the result is never worse than uniform on validation.

Both start from ``w = 1/K`` (the uniform merge) and return the best weights evaluated; the merged
adapter is ``task_arithmetic`` at those weights with λ = 1.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from adapterfuse.backends.merge.adapter import MergedAdapter, SearchMethod, params_json
from adapterfuse.backends.merge.common import MergeParams, MergeResult
from adapterfuse.backends.merge.lambda_search import EvalOptions
from adapterfuse.backends.merge.registry import merge_deltas
from adapterfuse.base import BaseModel
from adapterfuse.delta import Deltas, LowRank, peft_from_deltas
from adapterfuse.expert import Expert
from adapterfuse.head import autocast_context, iter_batches, label_logits, label_token_ids, task_loss
from adapterfuse.library import ExpertLibrary
from adapterfuse.lowrank import stack_factors
from adapterfuse.progress import bar, tracker
from adapterfuse.tasks.spec import TaskData, TaskSpec

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
NO_LAYER = "other"


class LearnedParams(MergeParams):
    """Parameters of ``learned``.

    Attributes:
        mode: ``gradient`` (Adam) or ``gradient_free`` (evolution strategy, LoraHub-style).
        per_layer: one weight per expert per transformer layer instead of one per expert.
        epochs: passes over the validation examples (gradient).
        steps: loss evaluations allowed (gradient-free), the uniform start included.
        lr: Adam's learning rate (gradient); the initial step size in the box (gradient-free).
        batch_size: validation rows per forward pass.
        l1: LoraHub's penalty on ``Σ|w|`` (gradient-free).
        bound: the search box ``[-bound, bound]`` (gradient-free).
    """

    mode: Literal["gradient", "gradient_free"] = "gradient"
    per_layer: bool = Field(default=False, strict=True)
    epochs: int = Field(default=3, ge=1, strict=True)
    steps: int = Field(default=40, ge=1, strict=True)
    lr: float = Field(default=0.05, gt=0.0)
    batch_size: int = Field(default=16, ge=1, strict=True)
    l1: float = Field(default=0.05, ge=0.0)
    bound: float = Field(default=1.5, gt=0.0)

    @field_validator("weights")
    @classmethod
    def _no_weights(cls, weights: tuple[float, ...] | None) -> None:
        """The weights are what this method learns; given ones would be silently overwritten."""
        if weights is not None:
            raise ValueError("learned fits the weights on validation data and takes none")
        return None


def layer_key(module: str) -> str:
    """The transformer layer of a module (``model.layers.3.self_attn.q_proj`` -> ``"3"``), else ``other``."""
    found = _LAYER.search(module)
    return found.group(1) if found else NO_LAYER


def layer_groups(experts: Sequence[Deltas], per_layer: bool) -> list[str]:
    """The weight groups: the layers present (numeric order, ``other`` last), or one group ``all``."""
    if not per_layer:
        return ["all"]
    keys = {layer_key(m) for d in experts for m in d}
    return sorted(keys, key=lambda k: (k == NO_LAYER, int(k) if k.isdigit() else 0))


class RankWeightedModel:
    """The experts' concatenated factors on a copy of the base, weighted per rank block by ``weights``.

    Args:
        base: the frozen base (copied; never modified).
        experts: each expert's updates.
        per_layer: one weight per expert per layer.

    Attributes:
        model: the PEFT model carrying the rank-``Σ r_i`` adapter (all its own weights frozen).
        weights: ``[K, G]`` learnable weights, initialised at ``1/K``.
        groups: the ``G`` group names (layers, or ``all``).
    """

    def __init__(self, base: BaseModel, experts: Sequence[Deltas], per_layer: bool) -> None:
        self.groups = layer_groups(experts, per_layer)
        k, g = len(experts), len(self.groups)
        self.weights = nn.Parameter(torch.full((k, g), 1.0 / k))
        stacked, index = {}, {}
        for module in sorted({m for d in experts for m in d}):
            group = self.groups.index(layer_key(module)) if per_layer else 0
            present = [i for i, d in enumerate(experts) if module in d]
            # weight 1 each: the learned weights enter through the hook, not the factors
            stacked[module] = stack_factors([(1.0, experts[i][module]) for i in present])
            index[module] = torch.cat([torch.full((experts[i][module].rank,), i * g + group) for i in present])
        state, config = peft_from_deltas(stacked, base.spec)
        self.model = Expert(name="weighted", config=config, state_dict=state).attach(base.model)
        self.model.requires_grad_(False)
        inner = self.model.base_model.model
        self._hooks = [
            inner.get_submodule(m).lora_B["default"].register_forward_pre_hook(self._scaler(idx))
            for m, idx in index.items()
        ]

    def _scaler(self, index: torch.Tensor):
        """A pre-hook scaling the rank-space input of one ``lora_B`` by the weights of its rank slots."""

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            # The weights (and their optimiser) stay on the CPU; their slots go to the activations' device.
            scale = self.weights.reshape(-1)[index].to(args[0].device, args[0].dtype)
            return (args[0] * scale, *args[1:])

        return hook

    def set(self, weights: torch.Tensor) -> None:
        """Overwrite the weights (``[K, G]``) in place."""
        with torch.no_grad():
            self.weights.copy_(weights)

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()


@dataclass(frozen=True)
class Batch:
    """One pre-tokenised validation batch of one task."""

    task_index: int
    task: TaskSpec
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: list[float]
    label_ids: list[int]


def make_batches(tasks: Sequence[TaskData], tokenizer, batch_size: int) -> list[Batch]:
    """Tokenise every task's validation split once."""
    out = []
    for t, td in enumerate(tasks):
        ids = label_token_ids(td.task, tokenizer)
        for idx, input_ids, mask in iter_batches(td.task, td.validation, tokenizer, batch_size):
            out.append(Batch(t, td.task, input_ids, mask, [td.validation[i].label for i in idx], ids))
    return out


def batch_loss(wm: RankWeightedModel, batch: Batch, autocast: bool) -> torch.Tensor:
    """The task loss of one batch under the current weights (differentiable in them)."""
    device = next(wm.model.parameters()).device
    with autocast_context(autocast, device):
        logits = label_logits(wm.model, batch.input_ids.to(device), batch.attention_mask.to(device), batch.label_ids)
    return task_loss(batch.task, logits.float().cpu(), batch.labels)


@torch.no_grad()
def validation_loss(wm: RankWeightedModel, batches: Sequence[Batch], autocast: bool) -> float:
    """Mean over tasks of each task's mean example loss (tasks weigh equally, whatever their size)."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for b in batches:
        n = len(b.labels)
        sums[b.task_index] = sums.get(b.task_index, 0.0) + float(batch_loss(wm, b, autocast)) * n
        counts[b.task_index] = counts.get(b.task_index, 0) + n
    return sum(sums[t] / counts[t] for t in sums) / len(sums)


def fit_gradient(
    wm: RankWeightedModel, batches: Sequence[Batch], params: LearnedParams, autocast: bool
) -> dict[str, object]:
    """Adam on the weights over seeded shuffles of the validation batches.

    Returns:
        ``{"loss_uniform", "loss", "history"}``; ``wm.weights`` is left at the best weights evaluated
        (after each epoch, the uniform start included).
    """
    optimizer = torch.optim.Adam([wm.weights], lr=params.lr)
    start = validation_loss(wm, batches, autocast)
    best, best_w, history = start, wm.weights.detach().clone(), [start]
    for epoch in bar(range(params.epochs), "learned merge: fitting", unit="epoch"):
        order = list(range(len(batches)))
        random.Random(f"{params.seed}:{epoch}").shuffle(order)
        for i in order:
            optimizer.zero_grad(set_to_none=True)
            batch_loss(wm, batches[i], autocast).backward()
            optimizer.step()
        loss = validation_loss(wm, batches, autocast)
        history.append(loss)
        if loss < best:
            best, best_w = loss, wm.weights.detach().clone()
    wm.set(best_w)
    return {"loss_uniform": start, "loss": best, "history": history}


def fit_gradient_free(
    wm: RankWeightedModel, batches: Sequence[Batch], params: LearnedParams, autocast: bool
) -> dict[str, object]:
    """A seeded (1+4) evolution strategy with step-size adaptation, LoraHub's L1 penalty and box.

    Returns:
        ``{"loss_uniform", "loss", "objective", "evaluations", "history"}``; ``wm.weights`` is left at
        the best accepted weights.
    """
    gen = torch.Generator().manual_seed(params.seed)
    groups = wm.weights.shape[1]

    def evaluate(w: torch.Tensor) -> tuple[float, float]:
        wm.set(w)
        loss = validation_loss(wm, batches, autocast)
        return loss + params.l1 * float(w.abs().sum()) / groups, loss

    parent = wm.weights.detach().clone()
    f_parent, start = evaluate(parent)
    loss_parent, evals, sigma, history = start, 1, params.lr * 4, [start]
    meter = tracker(None, "learned merge: fitting", params.steps, "eval", evals)
    while evals < params.steps:
        n = min(4, params.steps - evals)
        children = [
            (parent + sigma * torch.randn(parent.shape, generator=gen)).clamp(-params.bound, params.bound)
            for _ in range(n)
        ]
        scored = [(*evaluate(c), j) for j, c in enumerate(children)]
        evals += n
        meter.update(n)
        f_child, loss_child, j = min(scored)
        # accept only a strictly better objective that is also no worse than uniform on the plain loss
        if f_child < f_parent and loss_child <= start:
            parent, f_parent, loss_parent = children[j], f_child, loss_child
            sigma *= 1.5
        else:
            sigma *= 0.7
        history.append(loss_parent)
    meter.close()
    wm.set(parent)
    return {"loss_uniform": start, "loss": loss_parent, "objective": f_parent, "evaluations": evals, "history": history}


def final_merge(
    experts: Sequence[Deltas], weights: torch.Tensor, groups: list[str], params: LearnedParams
) -> MergeResult:
    """``task_arithmetic`` (λ = 1) at the learned weights.

    Per-expert weights go to the registry as weights. Per-layer weights scale each expert's ``B`` in
    each layer first (exactly ``w_{i,layer} ΔW_i`` there), then the scaled experts are summed.
    """
    w = weights.detach().double()
    if not params.per_layer:
        return merge_deltas(
            list(experts), "task_arithmetic", weights=w[:, 0].tolist(), rank=params.rank, seed=params.seed, lam=1.0
        )
    scaled = [
        {m: LowRank(d.A, d.B * float(w[i, groups.index(layer_key(m))])) for m, d in e.items()}
        for i, e in enumerate(experts)
    ]
    return merge_deltas(scaled, "task_arithmetic", rank=params.rank, seed=params.seed, lam=1.0)


def weights_record(names: Sequence[str], weights: torch.Tensor, groups: list[str], per_layer: bool) -> dict:
    """The learned weights by expert name (and layer, when per layer)."""
    w = weights.detach()
    if not per_layer:
        return {n: float(w[i, 0]) for i, n in enumerate(names)}
    return {n: {g: float(w[i, j]) for j, g in enumerate(groups)} for i, n in enumerate(names)}


def run(
    library: ExpertLibrary, params: LearnedParams, base: BaseModel, tasks: list[TaskData], options: EvalOptions
) -> MergedAdapter:
    """Learn the merge weights and return the merge at them (the runner registered as ``learned``).

    Args:
        library: the checked experts.
        params: validated :class:`LearnedParams`.
        base: the frozen base.
        tasks: validation tasks.
        options: scoring settings (``autocast``).

    Returns:
        The merged adapter; ``search["learned"]`` holds the weights, the losses and the history.
    """
    experts = [e.deltas for e in library]
    wm = RankWeightedModel(base, experts, params.per_layer)
    try:
        batches = make_batches(tasks, base.tokenizer, params.batch_size)
        fit = fit_gradient if params.mode == "gradient" else fit_gradient_free
        record = fit(wm, batches, params, options.autocast)
        weights = wm.weights.detach().clone()
    finally:
        wm.close()
    names = [e.name for e in library]
    record = {
        "mode": params.mode,
        "per_layer": params.per_layer,
        "groups": wm.groups,
        "weights": weights_record(names, weights, wm.groups, params.per_layer),
        "mean_weights": {n: float(weights[i].mean()) for i, n in enumerate(names)},
        "criterion": "validation loss",
        "tasks": [t.task.name for t in tasks],
        **record,
    }
    result = final_merge(experts, weights, wm.groups, params)
    return MergedAdapter.build(
        result, library, base, method="learned", params=params_json(params), search={"learned": record}
    )


METHOD = SearchMethod(
    name="learned",
    paper="https://arxiv.org/abs/2603.03535",
    summary="per-expert (or per-layer) merge weights fitted on the validation loss, by Adam or an ES",
    params=LearnedParams,
    run=run,
)
