"""``knots``: KnOTS, the experts' updates aligned in one shared SVD basis, then TIES-merged there
(Stoica et al., 2025).

The weighted updates side by side, ``[w_1 ΔW_1 | … | w_K ΔW_K] = U S [V_1ᵀ | … | V_Kᵀ]``, share one left basis
``U S``; each task is then just its ``V_iᵀ``, and those aligned coefficients are merged with TIES (trim to
``density`` by magnitude, elect each entry's sign, mean of the agreeing entries): ``λ · U S V_mergedᵀ``.
In low rank the side-by-side SVD needs no full-size matrix: a QR of the stacked ``B`` factors, a QR of
each ``A_iᵀ`` (block diagonal together), and an SVD of the ``(K·r)``-sized core. The output has rank at
most ``sum r_i``; one expert at density 1 and λ = 1 comes back unchanged.
"""

from __future__ import annotations

import torch
from pydantic import Field

from adapterfuse.backends.merge.common import MergeMethod, ModuleJob, SignParams, linear_output
from adapterfuse.backends.merge.functional import trim_by_magnitude
from adapterfuse.backends.merge.ties import sign_merge
from adapterfuse.delta import LowRank
from adapterfuse.lowrank import Truncation


class KnotsParams(SignParams):
    """Parameters of ``knots``.

    Attributes:
        density: fraction of each task's aligned coefficients kept by magnitude before the TIES merge.

    The weights are already inside the aligned coefficients, so the TIES step weighs every task 1 and
    the sign conventions of :class:`~adapterfuse.backends.merge.common.SignParams` all give the same merge.
    """

    density: float = Field(default=0.2, gt=0.0, le=1.0)


def aligned_basis(job: ModuleJob, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The SVD of the weighted updates side by side: ``(U [out, k], S [k], [V_iᵀ [k, in] per expert])``."""
    stacked_b = torch.cat([d.B.float() * float(w) for w, d in zip(job.weights, job.deltas, strict=True)], dim=1)
    qb, rb = torch.linalg.qr(stacked_b)
    qas, ras = zip(*(torch.linalg.qr(d.A.float().T) for d in job.deltas), strict=True)
    u, s, vh = torch.linalg.svd(rb @ torch.block_diag(*ras).T, full_matrices=False)
    k = int((s > tol * s.max()).sum()) if s.numel() and float(s.max()) > 0 else 0
    ends = torch.tensor([0] + [d.rank for d in job.deltas]).cumsum(0).tolist()
    vts = [vh[:k, ends[i] : ends[i + 1]] @ qa.T for i, qa in enumerate(qas)]
    return qb @ u[:, :k], s[:k], vts


def merge_module(job: ModuleJob, params: KnotsParams) -> Truncation:
    """Align one module's updates in their shared basis and TIES-merge the aligned coefficients.

    Args:
        job: the module's updates and weights.
        params: validated parameters (``density``, ``lambda``, ``rank``).

    Returns:
        ``λ · U S V_mergedᵀ`` in factored form, truncated to ``rank`` if one is asked.
    """
    u, s, vts = aligned_basis(job)
    trimmed = torch.stack([trim_by_magnitude(vt, params.density) for vt in vts])
    merged_vt = sign_merge(trimmed, torch.ones(len(vts)), params) if s.numel() else vts[0]
    out = LowRank(merged_vt.contiguous(), (u * (params.lam * s)).contiguous())
    return linear_output([(1.0, out)], params.rank, params.energy, job.module)


METHOD = MergeMethod(
    name="knots",
    paper="https://arxiv.org/abs/2410.19735",
    summary="TIES on the experts' coefficients in the shared SVD basis of their side-by-side updates",
    params=KnotsParams,
    merge_module=merge_module,
)
