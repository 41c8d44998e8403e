"""Checkpoint averaging: the exact mean of the adapter's ΔW at the last N checkpoints of one run.

A mean of N rank-r LoRA updates is one LoRA of rank ``N·r`` with the factors side by side:
``mean_j B_j A_j = [B_1 … B_N] / N · [A_1; …; A_N]``. Written with ``r' = N·r`` and ``alpha' = N·alpha`` the
scale ``alpha'/r'`` is unchanged, so the saved adapter's ΔW is the mean exactly (no truncation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapterfuse.errors import ConfigError


def average_steps(total: int, count: int, every: int) -> list[int]:
    """The steps (1-based counts) whose adapters are averaged: the last ``count``, ``every`` steps apart.

    Raises:
        ConfigError: the run has fewer than ``(count - 1) · every + 1`` steps.
    """
    steps = [total - j * every for j in reversed(range(count))]
    if steps[0] < 1:
        raise ConfigError(
            f"average_last {count}: needs {(count - 1) * every + 1} training steps at checkpoint_every {every}, "
            f"got {total}; lower average_last or checkpoint_every, or train longer"
        )
    return steps


def stack_snapshots(snapshots: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """PEFT LoRA parameters of rank ``N·r`` whose ΔW is the mean of the ``N`` snapshots' ΔW.

    Args:
        snapshots: the trainable parameters at each averaged step (``…lora_A…`` ``[r, in]``,
            ``…lora_B…`` ``[out, r]``), same names in each.

    Returns:
        ``lora_A`` stacked along the rank (``[N·r, in]``), ``lora_B`` side by side and divided by ``N``.

    Raises:
        ConfigError: no snapshots, or a parameter that is neither a ``lora_A`` nor a ``lora_B``.
    """
    if not snapshots:
        raise ConfigError("checkpoint averaging: no snapshots were taken; expected at least one")
    n, out = len(snapshots), {}
    for name in snapshots[0]:
        parts = [s[name] for s in snapshots]
        if ".lora_A." in name:
            out[name] = torch.cat(parts, dim=0)
        elif ".lora_B." in name:
            out[name] = torch.cat(parts, dim=1) / n
        else:
            raise ConfigError(f"checkpoint averaging: parameter {name!r} is not a LoRA factor; use method 'lora'")
    return out
