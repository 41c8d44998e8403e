"""Model-based clustering (MBC): group experts by the cosine similarity of their ΔW, merge each group.

Similarity is the cosine of the experts' flattened ΔW over all modules. It is computed exactly from
the factors, ``⟨B_i A_i, B_j A_j⟩_F = Σ (B_iᵀB_j) ⊙ (A_iA_jᵀ)``, never forming ΔW; or, as a cheaper
sketch, from a seeded Kronecker random projection ``P ΔW Qᵀ = (P B)(A Qᵀ)`` per module. Experts are
grouped by average-linkage agglomerative clustering on ``1 - cos`` (deterministic: no random step),
each group is merged with a linear merge (``uniform`` averages by default), and a router then routes
across the groups. Fewer groups mean fewer adapters to store and load.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from adapterfuse.backends.merge.registry import merge_deltas
from adapterfuse.backends.route.data import serves
from adapterfuse.base import BaseModel
from adapterfuse.delta import Deltas, peft_from_deltas
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.lowrank import stack_members

LINEAR_MERGES = ("uniform", "task_arithmetic")


def gram_exact(pool: Sequence[Deltas]) -> torch.Tensor:
    """``[E, E]`` Frobenius inner products of the experts' flattened ΔW (fp64), from the factors."""
    stacked = stack_members(list(pool), [f"expert-{i}" for i in range(len(pool))])
    gram = torch.zeros(len(pool), len(pool), dtype=torch.float64)
    for A, B in stacked.values():
        a, b = A.double(), B.double()
        bb = torch.einsum("ior,jos->ijrs", b, b)  # B_iᵀ B_j
        aa = torch.einsum("irn,jsn->ijrs", a, a)  # A_i A_jᵀ
        gram += (bb * aa).sum(dim=(2, 3))
    return gram


def sketch(pool: Sequence[Deltas], size: int = 16, seed: int = 0) -> torch.Tensor:
    """A seeded random-projection sketch of each expert's flattened ΔW.

    Per module, ``vec(P ΔW Qᵀ) / size`` with Gaussian ``P`` (``size x out``) and ``Q`` (``size x in``)
    drawn once for all experts; inner products of sketches estimate those of the ΔW.

    Args:
        pool: the experts' updates.
        size: the sketch side per module (``size²`` numbers per module).
        seed: seed of the projections.

    Returns:
        ``[E, modules * size²]`` fp64.
    """
    if size < 1:
        raise ConfigError(f"sketch size: expected >= 1, got {size}")
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for A, B in stack_members(list(pool), [f"expert-{i}" for i in range(len(pool))]).values():
        P = torch.randn(size, B.shape[1], generator=gen, dtype=torch.float64)
        Q = torch.randn(size, A.shape[2], generator=gen, dtype=torch.float64)
        parts.append(((P @ B.double()) @ (A.double() @ Q.T)).reshape(len(pool), -1) / size)
    return torch.cat(parts, dim=1)


def cosine_matrix(pool: Sequence[Deltas], sketch_size: int | None = None, seed: int = 0) -> torch.Tensor:
    """``[E, E]`` cosine similarity of the experts' flattened ΔW (exact, or from a sketch).

    Args:
        pool: the experts' updates.
        sketch_size: ``None`` for the exact value; else the sketch side (see :func:`sketch`).
        seed: seed of the sketch.
    """
    if sketch_size is None:
        gram = gram_exact(pool)
    else:
        s = sketch(pool, sketch_size, seed)
        gram = s @ s.T
    norm = gram.diagonal().clamp(min=0).sqrt().clamp(min=1e-300)
    return gram / norm[:, None] / norm[None, :]


def cluster_experts(cosine: torch.Tensor, clusters: int) -> list[int]:
    """Average-linkage agglomerative clustering on ``1 - cos``; labels numbered by first appearance.

    Raises:
        ConfigError: ``clusters`` outside ``1 .. E``.
    """
    e = int(cosine.shape[0])
    if isinstance(clusters, bool) or not isinstance(clusters, int) or not 1 <= clusters <= e:
        raise ConfigError(f"mbc clusters: expected an integer in 1 .. {e} (the number of experts), got {clusters!r}")
    if clusters == e:
        return list(range(e))
    if clusters == 1:
        return [0] * e
    from sklearn.cluster import AgglomerativeClustering

    distance = (1.0 - cosine).clamp(min=0).numpy().astype(np.float64)
    raw = AgglomerativeClustering(n_clusters=clusters, metric="precomputed", linkage="average").fit_predict(distance)
    order = list(dict.fromkeys(int(x) for x in raw))  # renumber by first appearance: stable across versions
    return [order.index(int(x)) for x in raw]


def merge_clusters(
    experts: Sequence[Expert],
    labels: Sequence[int],
    base: BaseModel,
    method: str = "uniform",
) -> list[Expert]:
    """One merged expert per cluster (a linear merge of its members' ΔW).

    Args:
        experts: the experts, in the order of ``labels``.
        labels: cluster of each expert (0 .. C-1).
        base: the base (recorded in the merged experts).
        method: ``uniform`` (average) or ``task_arithmetic`` (sum).

    Returns:
        ``C`` in-memory experts named ``cluster-c``; ``meta["tasks"]`` lists the tasks they serve and
        ``meta["members"]`` the merged experts. A one-member cluster keeps that expert's ΔW exactly.

    Raises:
        ConfigError: an unknown merge method.
    """
    if method not in LINEAR_MERGES:
        raise ConfigError(f"mbc merge {method!r}: expected one of {', '.join(LINEAR_MERGES)}")
    out = []
    for c in range(max(labels) + 1):
        members = [e for e, lab in zip(experts, labels, strict=True) if lab == c]
        merged = merge_deltas([e.deltas for e in members], method).deltas
        state, config = peft_from_deltas(merged, base.spec)
        tasks = sorted(set().union(*(serves(e) for e in members)))
        meta = {
            "task": tasks[0] if len(tasks) == 1 else None,
            "tasks": tasks,
            "method": f"mbc-{method}",
            "members": [e.name for e in members],
            "base": base.record(),
        }
        out.append(Expert(name=f"cluster-{c}", config=config, state_dict=state, meta=meta))
    return out


def mbc_pool(
    experts: Sequence[Expert],
    base: BaseModel,
    clusters: int,
    sketch_size: int | None = None,
    seed: int = 0,
    method: str = "uniform",
) -> tuple[list[Expert], list[int]]:
    """Cluster the experts and merge each cluster.

    Returns:
        ``(merged experts, cluster label of each input expert)``.
    """
    labels = cluster_experts(cosine_matrix([e.deltas for e in experts], sketch_size, seed), clusters)
    return merge_clusters(experts, labels, base, method), labels
