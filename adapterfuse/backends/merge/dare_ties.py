"""``dare_ties``: DARE's drop-and-rescale in place of TIES' trim, then TIES' sign election and disjoint mean.

Per module: each expert's ΔW is dropped and rescaled exactly as in :mod:`.dare_linear` (same
content-derived mask seeds, so reordering experts changes nothing), signs are elected by total mass and
the agreeing weighted entries merged under the convention of
:class:`~adapterfuse.backends.merge.common.SignParams` (as in :mod:`.ties`), and the result is scaled by λ
and brought to ``rank`` (default ``auto``: the smallest rank holding ``energy`` of it).
"""

from __future__ import annotations

from adapterfuse.backends.merge.common import DareTiesParams, MergeMethod, ModuleJob, truncate_output
from adapterfuse.backends.merge.dare_linear import dropped_stack
from adapterfuse.backends.merge.ties import sign_merge
from adapterfuse.lowrank import Truncation


def merge_module(job: ModuleJob, params: DareTiesParams) -> Truncation:
    """DARE-TIES-merge one module and truncate it to the output rank.

    Args:
        job: the module's updates and weights.
        params: validated parameters (``density``, the convention, ``lambda``, ``rank``, ``energy``,
            ``exact_svd``, ``seed``).

    Returns:
        The truncated merge, its truncation error and the untruncated norm.
    """
    stack = dropped_stack(job, params)
    return truncate_output(params.lam * sign_merge(stack, job.weight_tensor(stack.device), params), job, params)


METHOD = MergeMethod(
    name="dare_ties",
    paper="https://arxiv.org/abs/2311.03099",
    summary="DARE drop-and-rescale, then TIES sign election and merge of the agreeing entries, times lambda",
    params=DareTiesParams,
    merge_module=merge_module,
)
