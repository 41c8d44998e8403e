"""``task_arithmetic``: ``ΔW = λ · sum_i w_i ΔW_i`` (Ilharco et al., 2022).

Negative weights subtract a task ("forgetting by negation"). The output is exact (rank ``sum r_i``)
unless a smaller ``rank`` is asked, in which case it is the best rank-``rank`` approximation.
"""

from __future__ import annotations

from adapterfuse.backends.merge.common import LinearParams, MergeMethod, ModuleJob, linear_output
from adapterfuse.lowrank import Truncation


def merge_module(job: ModuleJob, params: LinearParams) -> Truncation:
    """Sum one module's weighted updates and scale by λ.

    Args:
        job: the module's updates and weights.
        params: validated parameters (``weights`` resolved, ``lambda``, ``rank``).

    Returns:
        The scaled sum in factored form; with one expert, weight 1 and λ 1, that expert's factors exactly.
    """
    items = [(params.lam * w, d) for w, d in zip(job.weights, job.deltas, strict=True)]
    return linear_output(items, params.rank, params.energy, job.module)


METHOD = MergeMethod(
    name="task_arithmetic",
    paper="https://arxiv.org/abs/2212.04089",
    summary="lambda * sum(w_i ΔW_i), negative weights allowed; exact, rank sum(r_i)",
    params=LinearParams,
    merge_module=merge_module,
)
