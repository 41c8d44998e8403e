"""``ties``: TrIm, Elect sign and merge (Yadav et al., 2023).

Per module: form each expert's ΔW_i, keep its top ``density`` fraction by magnitude
(:func:`~adapterfuse.backends.merge.functional.trim_by_magnitude`), elect each entry's sign by total mass,
merge the agreeing weighted entries and scale by λ. How the sign is elected (on weighted or unweighted
values) and what the agreeing sum is divided by (their count, their weights, nothing) is the parameter
model's convention (:class:`~adapterfuse.backends.merge.common.SignParams`; mergekit's by default, PEFT's
with ``convention="peft"``). The result is a dense matrix of generally full rank; by default (``rank="auto"``)
it keeps the smallest rank that holds ``energy`` of it. Only one module's K dense updates exist at a time.
"""

from __future__ import annotations

import torch

from adapterfuse.backends.merge.common import MergeMethod, ModuleJob, SignParams, TiesParams, truncate_output
from adapterfuse.backends.merge.functional import elected_merge_, trim_by_magnitude
from adapterfuse.lowrank import Truncation


def sign_merge(stack: torch.Tensor, weights: torch.Tensor, params: SignParams) -> torch.Tensor:
    """TIES' elect-and-merge on an already trimmed (or dropped) stack, under the parameters' convention.

    Args:
        stack: ``[K, out, in]`` unweighted expert updates; **overwritten** (pass a stack the caller owns).
        weights: ``[K]`` their weights.
        params: ``sign_on`` and ``divide`` (see :class:`~adapterfuse.backends.merge.common.SignParams`).

    Returns:
        ``[out, in]``: the agreeing weighted entries' sum, divided as ``params.divide`` says.
    """
    return elected_merge_(stack, weights, params.sign_on, params.divide)


def merge_module(job: ModuleJob, params: TiesParams) -> Truncation:
    """TIES-merge one module and truncate it to the output rank.

    Args:
        job: the module's updates and weights.
        params: validated parameters (``density``, the convention, ``lambda``, ``rank``, ``energy``,
            ``exact_svd``, ``seed``).

    Returns:
        The truncated merge, its truncation error and the untruncated norm.
    """
    stack = torch.stack([trim_by_magnitude(d.dense(), params.density) for d in job.deltas])
    return truncate_output(params.lam * sign_merge(stack, job.weight_tensor(stack.device), params), job, params)


METHOD = MergeMethod(
    name="ties",
    paper="https://arxiv.org/abs/2306.01708",
    summary="trim each ΔW to its top-density entries, elect signs by mass, merge the agreeing entries, times lambda",
    params=TiesParams,
    merge_module=merge_module,
)
