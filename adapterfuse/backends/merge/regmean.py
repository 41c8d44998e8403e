"""``regmean``: the closed-form merge that best preserves every task's module outputs (Jin et al., 2023).

Per linear module, with ``G_i`` the Gram matrix of the module's inputs on expert i's task,
``ΔW = (sum_i w_i ΔW_i G_i) (sum_i G_i)^-1``: the least-squares solution of keeping each expert's outputs
on its own task's inputs. Off-diagonal Gram entries are scaled by ``alpha`` (the paper's regulariser;
``alpha = 0`` is a per-input-feature weighted mean, ``alpha = 1`` the plain least squares).

The low-rank form is exact: ``ΔW_i G_i G^-1 = B_i (A_i G_i G^-1)``, so each expert keeps its ``B`` and gets
a new ``A`` from one linear solve with the ``[in, in]`` matrix ``G``; the output has rank ``sum r_i``.
The Gram matrices come from one pass of the frozen base over each task's validation inputs (mean over
real tokens, so tasks with longer prompts do not outweigh the others). Paper: https://arxiv.org/abs/2212.09849
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from adapterfuse.backends.merge.adapter import MergedAdapter, SearchMethod, params_json
from adapterfuse.backends.merge.common import MergeParams, MergeResult, linear_output, pooled_error
from adapterfuse.backends.merge.lambda_search import EvalOptions
from adapterfuse.backends.merge.registry import check_experts, validation_by_task
from adapterfuse.base import BaseModel
from adapterfuse.delta import LowRank
from adapterfuse.errors import ConfigError
from adapterfuse.head import autocast_context, iter_batches
from adapterfuse.library import ExpertLibrary
from adapterfuse.lowrank import Truncation
from adapterfuse.progress import bar
from adapterfuse.tasks.spec import TaskData


class RegMeanParams(MergeParams):
    """Parameters of ``regmean``.

    Attributes:
        alpha: scale of the Gram matrices' off-diagonal entries, in ``[0, 1]`` (the paper's 0.9 default).
        max_examples: validation inputs per task the Gram matrices are computed on (the first ones).
    """

    alpha: float = Field(default=0.9, ge=0.0, le=1.0)
    max_examples: int = Field(default=256, ge=1, strict=True)


@torch.no_grad()
def module_grams(
    base: BaseModel, modules: Sequence[str], task: TaskData, params: RegMeanParams, options: EvalOptions
) -> dict[str, torch.Tensor]:
    """The mean over real tokens of ``x xᵀ`` of each module's input ``x``, on ``task``'s validation inputs.

    Returns:
        ``{module: [in, in]}`` fp64 Gram matrices.

    Raises:
        ConfigError: the task has no validation inputs.
    """
    examples = list(task.validation[: params.max_examples])
    if not examples:
        raise ConfigError(f"regmean: task {task.task.name!r} has no validation examples; expected at least one")
    sums: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"mask": None, "tokens": 0}

    def hook(name: str):
        def record(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0][state["mask"]].double()  # real tokens only: [tokens, in]
            sums[name] = sums.get(name, 0) + x.T @ x

        return record

    handles = [base.model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    decoder, device = base.model.get_decoder(), next(base.model.parameters()).device
    try:
        batches = iter_batches(task.task, examples, base.tokenizer, options.batch_size)
        for _, ids, mask in bar(batches, f"regmean grams {task.task.name}"):
            state["mask"] = mask.bool().to(device)
            state["tokens"] += int(mask.sum())
            with autocast_context(options.autocast, device):
                decoder(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()
    return {m: g.cpu() / state["tokens"] for m, g in sums.items()}


def regularise(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha · G + (1 - alpha) · diag(G)``: the off-diagonal entries scaled by ``alpha``."""
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def merge_module(
    deltas: Sequence[LowRank | None],
    weights: Sequence[float],
    grams: Sequence[torch.Tensor],
    params: RegMeanParams,
    module: str = "",
) -> Truncation:
    """RegMean of one module: each present expert's ``A`` replaced by ``A_i G_i G^-1``, the factors stacked.

    Args:
        deltas: one update per expert (``None`` where an expert lacks the module: its Gram still counts).
        weights: one weight per expert.
        grams: one regularised ``[in, in]`` Gram matrix per expert.
        params: the validated parameters (``rank``, ``energy``: the output rank policy; exact by default).
        module: the module's name, for the message of an overflow.

    Returns:
        The :class:`~adapterfuse.lowrank.Truncation` of the merged update.
    """
    total = sum(grams)
    total = total + 1e-8 * float(torch.diagonal(total).mean()) * torch.eye(total.shape[0], dtype=total.dtype)
    items = []
    for d, w, g in zip(deltas, weights, grams, strict=True):
        if d is not None:
            a_new = torch.linalg.solve(total, g @ d.A.double().T).T  # A_i G_i G^-1 (G symmetric)
            items.append((w, LowRank(a_new.float(), d.B)))
    return linear_output(items, params.rank, params.energy, module)


def run(
    library: ExpertLibrary, params: RegMeanParams, base: BaseModel, tasks: list[TaskData], options: EvalOptions
) -> MergedAdapter:
    """Compute each expert task's Gram matrices on the validation split and merge in closed form.

    Raises:
        ConfigError: an expert whose task has no validation data among ``tasks``.
    """
    by_task = validation_by_task("regmean", library, tasks)
    experts = [e.deltas for e in library]
    coverage = check_experts(experts)
    grams = {t: module_grams(base, list(coverage), by_task[t], params, options) for t in {e.task for e in library}}
    weights = params.weights or (1.0,) * len(experts)
    out, errors, parts = {}, {}, []
    for module in coverage:
        regular = [regularise(grams[e.task][module], params.alpha) for e in library]
        result = merge_module([x.get(module) for x in experts], weights, regular, params, module)
        out[module], errors[module] = result.delta, result.error
        parts.append(result)
    merged = MergeResult("regmean", params, out, errors, pooled_error(parts), coverage)
    record = {"tasks": sorted(grams), "alpha": params.alpha, "max_examples": params.max_examples}
    return MergedAdapter.build(
        merged, library, base, method="regmean", params=params_json(params), search={"regmean": record}
    )


METHOD = SearchMethod(
    name="regmean",
    paper="https://arxiv.org/abs/2212.09849",
    summary="(sum w_i ΔW_i G_i)(sum G_i)^-1 with G_i each task's input Gram matrix per module; closed form",
    params=RegMeanParams,
    run=run,
)
