"""``iso_c``: isotropic merging, the summed update with its spectrum flattened (Marczak et al., 2025).

Task arithmetic's sum ``ΔW = sum_i w_i ΔW_i`` is dominated by a few directions; Iso-C keeps its singular
vectors and gives every direction the same singular value, the mean of the sum's: ``λ · mean(S) · U Vᵀ``.
For rank-r experts the SVD of the sum is exact from a QR of the stacked factors and an SVD of the
``(K·r)``-sized core (:func:`adapterfuse.lowrank.thin_svd`), so the output has rank at most ``sum r_i``.
"""

from __future__ import annotations

from adapterfuse.backends.merge.common import LinearParams, MergeMethod, ModuleJob, linear_output
from adapterfuse.delta import LowRank
from adapterfuse.lowrank import Truncation, stack_factors, thin_svd


def merge_module(job: ModuleJob, params: LinearParams) -> Truncation:
    """Flatten the spectrum of one module's weighted sum, then scale by λ.

    Args:
        job: the module's updates and weights.
        params: validated parameters (``weights``, ``lambda``, ``rank``).

    Returns:
        ``λ · mean(S) · U Vᵀ`` in factored form (truncated to ``rank`` if one is asked: the directions of
        the largest singular values of the sum are kept).
    """
    u, s, vh = thin_svd(stack_factors(list(zip(job.weights, job.deltas, strict=True))))
    scale = params.lam * s.mean() if s.numel() else 0.0  # an all-zero sum stays zero (rank 0)
    flat = LowRank(vh.contiguous(), (u * scale).contiguous())
    return linear_output([(1.0, flat)], params.rank, params.energy, job.module)


METHOD = MergeMethod(
    name="iso_c",
    paper="https://arxiv.org/abs/2502.04959",
    summary="lambda * mean(S) * U V^T of the weighted sum's SVD (flat spectrum); rank <= sum(r_i)",
    params=LinearParams,
    merge_module=merge_module,
)
