"""``ties``: TrIm, Elect sign and merge (Yadav et al., 2023).

Per module: form each expert's ΔW_i, keep its top ``density`` fraction by magnitude
(:func:`~adapterfuse.backends.merge.functional.trim_by_magnitude`), weight it, elect each entry's sign by the total
mass of the weighted stack, average only the agreeing weighted entries (divided by how many agree), and
scale by λ. The result is a dense matrix of generally full rank, so it is truncated back to ``rank``
(default: the largest rank among the experts that have the module, so the merged adapter is no larger
than its largest expert) by SVD. Only one module's K dense updates exist at a time.
"""

from __future__ import annotations

import torch

from adapterfuse.backends.merge.common import MergeMethod, ModuleJob, TiesParams, truncate_output
from adapterfuse.backends.merge.functional import agreeing_mean_, elect_sign, trim_by_magnitude
from adapterfuse.lowrank import Truncation


def sign_merge(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' elect-and-merge on an already trimmed (or dropped) stack.

    Args:
        stack: ``[K, out, in]`` unweighted expert updates.
        weights: ``[K]`` their weights.

    Returns:
        ``[out, in]``: the disjoint mean of the weighted entries that agree with the sign elected on the
        weighted stack.
    """
    weighted = stack * weights.to(stack).reshape(-1, 1, 1)
    return agreeing_mean_(weighted, elect_sign(weighted))


def merge_module(job: ModuleJob, params: TiesParams) -> Truncation:
    """TIES-merge one module and truncate it to the output rank.

    Args:
        job: the module's updates and weights.
        params: validated parameters (``density``, ``lambda``, ``rank``, ``exact_svd``, ``seed``).

    Returns:
        The truncated merge, its truncation error and the untruncated norm.
    """
    stack = torch.stack([trim_by_magnitude(d.dense(), params.density) for d in job.deltas])
    return truncate_output(params.lam * sign_merge(stack, job.weight_tensor(stack.device)), job, params)


METHOD = MergeMethod(
    name="ties",
    paper="https://arxiv.org/abs/2306.01708",
    summary="trim each ΔW to its top-density entries, elect signs by mass, disjoint mean, times lambda",
    params=TiesParams,
    merge_module=merge_module,
)
