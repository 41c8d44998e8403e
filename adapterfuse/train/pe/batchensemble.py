"""BatchEnsemble / TabM LoRA (Wen et al. 2020; Gorishniy et al. 2024): one shared LoRA per module plus
per-member rank-1 vectors, all members trained in one batched pass.

Member ``k``'s update of a module is ``s_k ⊙ (B·A·(r_k ⊙ x))``. The extra cost per member is
``in + out`` numbers per module, against ``r·(in + out)`` for an independent LoRA member. Trained
members export exactly as K ordinary LoRA members (``A_k = A·diag(r_k)``, ``B_k = diag(s_k)·B``, see
:func:`adapterfuse.train.pe.layers.member_factors`), which the ensemble backend runs and pools.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from adapterfuse.train.pe.layers import MemberLoRALinear


def layout(modules: Sequence[str]) -> dict[str, str]:
    """Every adapted module in ``batchensemble`` mode."""
    return dict.fromkeys(modules, "batchensemble")


@torch.no_grad()
def init_rank1(layers: Mapping[str, MemberLoRALinear], jitter: float, seed: int) -> None:
    """Set every ``r``, ``s`` entry to ``1 ± jitter`` with a seeded random sign.

    Near 1, so every member starts close to the shared LoRA (and trains as fast); the random signs make
    the members differ from the first step. ``jitter = 0`` makes every member the shared LoRA.

    Args:
        layers: the installed layers (only ``batchensemble`` ones are touched).
        jitter: the size of the deviation from 1.
        seed: the seed of the signs.
    """
    gen = torch.Generator().manual_seed(seed + 7919)  # apart from the factors' stream
    for layer in layers.values():
        if layer.mode != "batchensemble":
            continue
        for p in (layer.r, layer.s):
            signs = torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1
            p.copy_(1.0 + jitter * signs)


def split_rows(rows: Sequence[int], k: int) -> list[int]:
    """Cut one step's batch into ``k`` equal member blocks (``be_data='split'``), member-contiguous.

    Member ``j`` gets rows ``j, j+k, j+2k …``; when the batch does not divide by ``k``, the short blocks
    are filled cyclically from the start of the batch, so every block has the same size (a batched
    pass needs equal blocks) and no row is dropped.

    Args:
        rows: the step's example indices (at least ``k``).
        k: the number of members.

    Returns:
        ``k * ceil(len(rows) / k)`` indices, block ``j`` for member ``j``.
    """
    size = -(-len(rows) // k)
    padded = list(rows) + [rows[i % len(rows)] for i in range(size * k - len(rows))]
    return [padded[j + k * i] for j in range(k) for i in range(size)]
