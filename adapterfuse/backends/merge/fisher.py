"""``fisher``: each entry of ΔW weighted by how much each task's loss depends on it (Matena & Raffel, 2022).

Per linear module, ``ΔW = (sum_i w_i F_i ⊙ ΔW_i) / (sum_i w_i F_i)``, entry by entry, with ``F_i`` the
diagonal empirical Fisher of the module's weight at expert i: the mean over task i's validation inputs of
the squared gradient of that input's label loss, with the expert applied. An expert lacking the module
counts with ``ΔW_i = 0`` and its task's Fisher (as in RegMean). ``floor`` (relative to each module's largest
Fisher entry) keeps entries that no task's loss depends on at the weighted mean.

The per-input gradient of a linear weight is ``sum_t g_t x_tᵀ`` (output gradient times input over the
input's tokens), read from hooks in one batched backward pass: no weight gradient is ever accumulated. The
merged ΔW is dense, so the output rank follows ``rank`` (``auto`` by default), like TIES and DARE.
Paper: https://arxiv.org/abs/2111.09832
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from adapterfuse.backends.merge.adapter import MergedAdapter, SearchMethod, params_json
from adapterfuse.backends.merge.common import MergeParams, MergeResult, ModuleJob, pooled_error, truncate_output
from adapterfuse.backends.merge.lambda_search import EvalOptions
from adapterfuse.backends.merge.registry import check_experts, validation_by_task
from adapterfuse.base import BaseModel
from adapterfuse.delta import LowRank
from adapterfuse.errors import ConfigError
from adapterfuse.head import autocast_context, iter_batches, label_token_ids, member_logits, task_loss
from adapterfuse.library import ExpertLibrary
from adapterfuse.lowrank import Truncation
from adapterfuse.progress import bar
from adapterfuse.tasks.spec import TaskData


class FisherParams(MergeParams):
    """Parameters of ``fisher``.

    Attributes:
        max_examples: validation inputs per task the Fisher is estimated on (the first ones).
        floor: added to every Fisher entry, relative to the module's largest one, so an entry no task
            depends on is averaged with the weights instead of divided by zero.
        batch_size: inputs per backward pass (each holds ``batch · out · in`` per-input gradients of a module).
        exact_svd: truncate the merged ΔW with a full SVD instead of the seeded randomized one.
    """

    max_examples: int = Field(default=256, ge=1, strict=True)
    floor: float = Field(default=1e-6, gt=0.0, le=1.0)
    batch_size: int = Field(default=8, ge=1, strict=True)
    exact_svd: bool = False


def expert_fisher(
    base: BaseModel,
    deltas: dict[str, LowRank],
    modules: Sequence[str],
    task: TaskData,
    params: FisherParams,
    autocast: bool = True,
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of each module's weight, with ``deltas`` applied, on ``task``'s validation.

    Returns:
        ``{module: [out, in]}`` fp32 means over the inputs of the squared per-input gradients.

    Raises:
        ConfigError: the task has no validation inputs.
    """
    examples = list(task.validation[: params.max_examples])
    if not examples:
        raise ConfigError(f"fisher: task {task.task.name!r} has no validation examples; expected at least one")
    model, device = base.model, next(base.model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(m).register_forward_hook(_hook(m, deltas.get(m), sums)) for m in modules]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_()))
    labels = label_token_ids(task.task, base.tokenizer)
    batches = iter_batches(task.task, examples, base.tokenizer, params.batch_size)
    grad = torch.enable_grad()  # the caller may be under no_grad; only activations get gradients
    try:
        for idx, ids, mask in bar(batches, f"fisher {task.task.name}"):
            with grad, autocast_context(autocast, device):
                logits = member_logits(model, ids.to(device), mask.to(device), labels, k=1)[0]
            gold = [examples[i].label for i in idx]
            (task_loss(task.task, logits, gold) * len(idx)).backward()  # the sum of per-input losses
    finally:
        for handle in handles:
            handle.remove()
    return {m: s / len(examples) for m, s in sums.items()}


def _hook(name: str, delta: LowRank | None, sums: dict[str, torch.Tensor]):
    """A forward hook adding ``delta``'s output and recording each input's squared weight gradient."""

    def forward(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if delta is not None:
            out = out + (x @ delta.A.to(x.device, x.dtype).T) @ delta.B.to(x.device, x.dtype).T

        def record(grad: torch.Tensor) -> None:  # padded tokens have zero gradient: no mask needed
            per_input = torch.einsum("bto,bti->boi", grad.float(), x.detach().float())
            sums[name] = sums.get(name, 0) + per_input.square().sum(0).cpu()  # fp32: a model-sized sum

        out.register_hook(record)
        return out

    return forward


def merge_module(job: ModuleJob, fishers: Sequence[torch.Tensor], params: FisherParams) -> Truncation:
    """The Fisher-weighted mean of one module's updates, brought to the output rank.

    Args:
        job: the module's updates; ``job.all_weights`` has one weight per expert, present here or not.
        fishers: one ``[out, in]`` Fisher per expert (every expert, in order).
        params: the validated parameters.

    Returns:
        The :class:`~adapterfuse.lowrank.Truncation` of the merged update.
    """
    weights = torch.tensor(job.all_weights, dtype=torch.float64).view(-1, 1, 1)
    stack = torch.stack(fishers).double()
    stack = weights * (stack + params.floor * (float(stack.max()) or 1.0))  # all zero: the weighted mean
    numerator = torch.zeros_like(stack[0])
    for position, delta in zip(job.experts, job.deltas, strict=True):
        numerator += stack[position] * delta.dense(torch.float64)
    return truncate_output((numerator / stack.sum(0)).float(), job, params)  # type: ignore[arg-type]


def run(
    library: ExpertLibrary, params: FisherParams, base: BaseModel, tasks: list[TaskData], options: EvalOptions
) -> MergedAdapter:
    """Estimate each expert's Fisher on its task's validation inputs, then merge every module.

    Raises:
        ConfigError: an expert whose task has no validation data among ``tasks``, or weights that are not
            positive (a Fisher-weighted mean needs positive weights).
    """
    by_task = validation_by_task("fisher", library, tasks)
    weights = params.weights or (1.0,) * len(library)
    if min(weights) <= 0:
        given = {e.name: w for e, w in zip(library, weights, strict=True)}
        raise ConfigError(f"fisher: weights {given} (expert: weight); expected every weight > 0 (a weighted mean)")
    experts = [e.deltas for e in library]
    coverage = check_experts(experts)
    modules = list(coverage)
    fishers = [expert_fisher(base, e.deltas, modules, by_task[e.task], params, options.autocast) for e in library]
    out, errors, parts = {}, {}, []
    for module in coverage:
        present = tuple(i for i, x in enumerate(experts) if module in x)
        job = ModuleJob(
            module, present, tuple(experts[i][module] for i in present), tuple(weights[i] for i in present), weights
        )
        result = merge_module(job, [f[module] for f in fishers], params)
        out[module], errors[module] = result.delta, result.error
        parts.append(result)
    merged = MergeResult("fisher", params, out, errors, pooled_error(parts), coverage)
    record = {"tasks": sorted({e.task for e in library}), "max_examples": params.max_examples}
    return MergedAdapter.build(
        merged, library, base, method="fisher", params=params_json(params), search={"fisher": record}
    )


METHOD = SearchMethod(
    name="fisher",
    paper="https://arxiv.org/abs/2111.09832",
    summary="entrywise (sum w_i F_i ΔW_i)/(sum w_i F_i) with F_i each task's diagonal Fisher at its expert",
    params=FisherParams,
    run=run,
)
