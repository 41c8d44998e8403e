"""``dare_linear``: Drop And REscale, then a weighted sum (Yu et al., 2023).

Per module: ``ΔW = λ · sum_i w_i · drop(ΔW_i)`` where ``drop`` keeps each entry with probability
``density`` and divides kept entries by ``density``
(:func:`~adapterfuse.backends.merge.functional.dare_drop`). The result is dense; by default (``rank="auto"``)
it keeps the smallest rank that holds ``energy`` of it.

Seeding: each (expert, module) mask is drawn from its own CPU generator seeded with
:func:`mask_seed` = the first 8 bytes of ``sha256(seed, module name, shape and fp32 bytes of that
expert's A and B)``. The mask therefore depends on the seed, the module and the expert's *content*,
never on the expert's position in the list or on which other experts are merged: reordering the experts
changes nothing but float rounding of the sum. (Two experts with byte-identical factors get the same mask.)
"""

from __future__ import annotations

import hashlib

import torch

from adapterfuse.backends.merge.common import DareParams, MergeMethod, ModuleJob, truncate_output
from adapterfuse.backends.merge.functional import dare_drop
from adapterfuse.delta import LowRank
from adapterfuse.lowrank import Truncation


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The fp32 bytes of a tensor (``clone`` so a view does not drag its whole storage in)."""
    return bytes(t.detach().to("cpu", torch.float32).clone().untyped_storage())


def mask_seed(seed: int, module: str, delta: LowRank) -> int:
    """The seed of one expert's DARE mask for one module.

    Args:
        seed: the merge's seed.
        module: the module's name.
        delta: that expert's update of that module.

    Returns:
        A 63-bit seed from ``sha256`` over the seed, the module name, the factors' shapes and their fp32
        bytes.
    """
    h = hashlib.sha256(b"adapterfuse.dare.v1\0")
    h.update(f"{seed}\0{module}\0{tuple(delta.A.shape)}\0{tuple(delta.B.shape)}\0".encode())
    h.update(_tensor_bytes(delta.A))
    h.update(_tensor_bytes(delta.B))
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def mask_generator(seed: int, module: str, delta: LowRank) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`mask_seed` (CPU so masks match on every device)."""
    return torch.Generator(device="cpu").manual_seed(mask_seed(seed, module, delta))


def dropped_stack(job: ModuleJob, params: DareParams) -> torch.Tensor:
    """Every expert's dropped-and-rescaled ΔW of the job's module.

    Args:
        job: the module's updates.
        params: validated parameters (``density``, ``seed``).

    Returns:
        ``[K, out, in]`` fp32 stack, unweighted.
    """
    return torch.stack(
        [dare_drop(d.dense(), params.density, mask_generator(params.seed, job.module, d)) for d in job.deltas]
    )


def merge_module(job: ModuleJob, params: DareParams) -> Truncation:
    """DARE-merge one module linearly and truncate it to the output rank.

    Args:
        job: the module's updates and weights.
        params: validated parameters (``density``, ``lambda``, ``rank``, ``exact_svd``, ``seed``).

    Returns:
        The truncated merge, its truncation error and the untruncated norm.
    """
    stack = dropped_stack(job, params)
    merged = params.lam * (stack * job.weight_tensor(stack.device).reshape(-1, 1, 1)).sum(dim=0)
    return truncate_output(merged, job, params)


METHOD = MergeMethod(
    name="dare_linear",
    paper="https://arxiv.org/abs/2311.03099",
    summary="randomly drop 1-density of each ΔW's entries, rescale by 1/density, lambda * weighted sum",
    params=DareParams,
    merge_module=merge_module,
)
