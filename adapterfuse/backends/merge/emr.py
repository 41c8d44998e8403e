"""EMR-Merging: one elected update, and for each task a mask and a rescaler (Huang et al., 2024,
https://arxiv.org/abs/2405.17461).

Per module, the experts' updates ``τ_1 … τ_K`` give one *unified* update: each entry takes the sign of
the experts' sum and, among the experts agreeing with that sign, the largest magnitude. Task ``k`` then
keeps the entries where the unified update agrees with its own (a mask ``M_k``) and rescales them so
that the total magnitude is its own: ``λ_k = Σ|τ_k| / Σ|M_k ⊙ τ_uni|``, summed over every module.
Task ``k``'s update is ``λ_k M_k ⊙ τ_uni``: no tuning, no data, but the task must be known at inference,
so :func:`emr_experts` gives one expert per task for a router to choose from (``route(..., emr=True)``).

A masked update is dense and close to full rank; each one is written as a LoRA of the smallest rank
per module that keeps ``energy`` of it (``energy=1`` keeps all of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adapterfuse.base import BaseModel
from adapterfuse.delta import Deltas, LowRank, peft_from_deltas
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.lowrank import dense_energy_truncation

PAPER = "https://arxiv.org/abs/2405.17461"


def elect_unified(tau: torch.Tensor) -> torch.Tensor:
    """The unified update of ``[K, out, in]`` updates: the sign of their sum, the largest agreeing magnitude."""
    sign = torch.sign(tau.sum(dim=0))
    agreeing = torch.where(torch.sign(tau) == sign, tau.abs(), torch.zeros_like(tau))
    return sign * agreeing.amax(dim=0)


def task_masks(tau: torch.Tensor, unified: torch.Tensor) -> torch.Tensor:
    """``[K, out, in]`` bool: where each task's update has the unified update's sign (both non-zero)."""
    return tau * unified > 0


def _stack(members: Sequence[Deltas], module: str) -> torch.Tensor:
    """The ``[K, out, in]`` fp32 updates of one module (zero for an expert without it)."""
    shape = next(d[module].shape for d in members if module in d)
    return torch.stack([d[module].dense() if module in d else torch.zeros(shape) for d in members])


def emr_scales(members: Sequence[Deltas]) -> list[float]:
    """Each task's rescaler ``λ_k = Σ|τ_k| / Σ|M_k ⊙ τ_uni|``, the sums running over every module."""
    own = torch.zeros(len(members), dtype=torch.float64)
    kept = torch.zeros(len(members), dtype=torch.float64)
    for module in sorted(set().union(*(d.keys() for d in members))):
        tau = _stack(members, module)
        unified = elect_unified(tau)
        own += tau.abs().flatten(1).sum(dim=1).double()
        kept += (task_masks(tau, unified) * unified.abs()).flatten(1).sum(dim=1).double()
    return [float(o / k) if k > 0 else 0.0 for o, k in zip(own, kept, strict=True)]


def emr_updates(members: Sequence[Deltas], energy: float = 0.9) -> tuple[list[Deltas], dict[str, Any]]:
    """Every task's EMR update ``λ_k M_k ⊙ τ_uni``, per module as a LoRA keeping ``energy`` of it.

    Args:
        members: each expert's updates (``module -> LowRank``).
        energy: the share of each masked update's squared norm its LoRA keeps, in ``(0, 1]``.

    Returns:
        ``(updates, report)``: one ``module -> LowRank`` per task, and ``{"scales", "ranks", "paper"}``
        (each task's rescaler and its modules' ranks).

    Raises:
        ConfigError: no experts, or ``energy`` outside ``(0, 1]``.
    """
    if not members:
        raise ConfigError("emr: expected at least one expert, got none")
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"emr energy: expected a share in (0, 1], got {energy}")
    scales = emr_scales(members)
    out: list[Deltas] = [{} for _ in members]
    for module in sorted(set().union(*(d.keys() for d in members))):
        tau = _stack(members, module)
        unified = elect_unified(tau)
        for k, mask in enumerate(task_masks(tau, unified)):
            update = scales[k] * torch.where(mask, unified, torch.zeros_like(unified))
            if update.any():
                out[k][module] = dense_energy_truncation(update, energy).delta
    ranks = [{m: lr.rank for m, lr in d.items()} for d in out]
    return out, {"scales": scales, "ranks": ranks, "energy": energy, "paper": PAPER}


def emr_experts(experts: Sequence[Expert], base: BaseModel, energy: float = 0.9) -> tuple[list[Expert], dict[str, Any]]:
    """One in-memory expert per task holding its EMR update (see :func:`emr_updates`).

    Args:
        experts: the task experts.
        base: the base they were trained on (recorded in the new experts).
        energy: see :func:`emr_updates`.

    Returns:
        ``(experts, report)``: ``<name>-emr`` experts serving the same tasks, and the report.
    """
    updates, report = emr_updates([e.deltas for e in experts], energy)
    out = []
    for expert, deltas in zip(experts, updates, strict=True):
        if not deltas:  # nothing of this task survived the election: keep one zero module so it loads
            module, lr = next(iter(expert.deltas.items()))
            deltas = {module: LowRank(torch.zeros(1, lr.shape[1]), torch.zeros(lr.shape[0], 1))}
        state, config = peft_from_deltas(deltas, base.spec)
        meta = {
            "task": expert.task,
            "method": "emr",
            "members": [e.name for e in experts],
            "base": base.record(),
        }
        out.append(Expert(name=f"{expert.name}-emr", config=config, state_dict=state, meta=meta))
    return out, report
