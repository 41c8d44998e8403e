"""``uniform``: the model-soup average of the experts' updates (Wortsman et al., 2022).

``ΔW = sum_i w_i ΔW_i / sum_i w_i`` with all ``w_i = 1`` by default, i.e. the plain mean. An expert that
lacks a module counts as a zero update there, so the mean divides by every expert's weight, not only by
those that have the module. The output is exact (rank ``sum r_i``) unless a smaller ``rank`` is asked.
"""

from __future__ import annotations

from adapterfuse.backends.merge.common import MergeMethod, ModuleJob, UniformParams, linear_output
from adapterfuse.lowrank import Truncation


def merge_module(job: ModuleJob, params: UniformParams) -> Truncation:
    """Average one module's updates.

    Args:
        job: the module's updates and weights.
        params: validated parameters (``weights`` resolved, ``rank``).

    Returns:
        The mean in factored form; with one expert of weight 1, that expert's factors exactly.
    """
    total = sum(job.all_weights)
    items = [(w / total, d) for w, d in zip(job.weights, job.deltas, strict=True)]
    return linear_output(items, params.rank, params.energy, job.module)


METHOD = MergeMethod(
    name="uniform",
    paper="https://arxiv.org/abs/2203.05482",
    summary="mean of the experts' ΔW (weighted mean if weights are given); exact, rank sum(r_i)",
    params=UniformParams,
    merge_module=merge_module,
)
