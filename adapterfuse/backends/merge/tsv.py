"""``tsv``: Task Singular Vectors merge, each task's singular vectors decorrelated across tasks
(Gargiulo et al., 2025).

Each weighted update is split by its SVD, ``w_i ΔW_i = U_i S_i V_iᵀ``; the tasks' left vectors
``[U_1 … U_K]`` are replaced by the nearest matrix with orthonormal columns (its polar factor), and the
right vectors likewise, so no two tasks write into overlapping directions; the singular values are kept:
``λ · U⊥ diag(S) V⊥ᵀ``. ``keep`` takes each task's top share of singular vectors first (the paper keeps
``1/K``; a LoRA update is already low-rank, so all are kept by default). Each SVD is exact from the
factors (:func:`adapterfuse.lowrank.thin_svd`); the output has rank at most ``sum r_i``, and one expert at
λ = 1 comes back unchanged.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from adapterfuse.backends.merge.common import LinearParams, MergeMethod, ModuleJob, linear_output
from adapterfuse.delta import LowRank
from adapterfuse.lowrank import Truncation, thin_svd


class TsvParams(LinearParams):
    """Parameters of ``tsv``.

    Attributes:
        keep: the share of each task's singular vectors kept (the top ones), in ``(0, 1]``.
    """

    keep: float = Field(default=1.0, gt=0.0, le=1.0)


def polar(m: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns nearest to ``m`` (Frobenius norm): ``P Qᵀ`` from ``m = P Σ Qᵀ``."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def merge_module(job: ModuleJob, params: TsvParams) -> Truncation:
    """Decorrelate one module's task singular vectors and sum the tasks in that basis.

    Args:
        job: the module's updates and weights.
        params: validated parameters (``weights``, ``lambda``, ``keep``, ``rank``).

    Returns:
        ``λ · U⊥ diag(S) V⊥ᵀ`` in factored form, truncated to ``rank`` if one is asked.
    """
    us, ss, vs = [], [], []
    for w, d in zip(job.weights, job.deltas, strict=True):
        u, s, vh = thin_svd(LowRank(d.A, d.B * float(w)))
        k = math.ceil(params.keep * s.numel())
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=0)
    if s.numel():
        u, vh = polar(u), polar(vh.T).T
    merged = LowRank(vh.contiguous(), (u * (params.lam * s)).contiguous())
    return linear_output([(1.0, merged)], params.rank, params.energy, job.module)


METHOD = MergeMethod(
    name="tsv",
    paper="https://arxiv.org/abs/2412.00081",
    summary="lambda * U_perp diag(S) V_perp^T: every task's singular vectors, orthogonalised across tasks",
    params=TsvParams,
    merge_module=merge_module,
)
