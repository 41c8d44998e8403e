"""Pure tensor building blocks of the merge methods.

Every function here works on one module's update ΔW (or a stack ``[K, out, in]`` of K experts' updates)
and never on the LoRA factors A and B separately: merging A's and B's independently is not a merge of
the updates, because ``(B1 + B2) @ (A1 + A2) != B1 @ A1 + B2 @ A2``. All maths runs in fp32 (inputs of
another floating dtype are used as given; the merge methods cast to fp32 before calling these).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterfuse.delta import LowRank
from adapterfuse.errors import CompatibilityError, ConfigError


def _check_density(density: float) -> None:
    """Reject densities outside ``(0, 1]`` (NaN included, as every comparison with it is false)."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density!r}; it is the fraction of entries kept")


def kept_count(numel: int, density: float) -> int:
    """How many entries :func:`trim_by_magnitude` keeps out of ``numel``.

    Args:
        numel: the number of entries of the tensor.
        density: the fraction to keep, in ``(0, 1]``.

    Returns:
        ``density * numel`` rounded half up, at least 1 (when ``numel > 0``) and at most ``numel``.
        Rounding (not ``ceil``) keeps binary noise such as ``0.2 * 100 == 20.000000000000004`` from
        keeping one entry too many.
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(density * numel + 0.5)))


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries of largest absolute value and zero the rest (TIES "trim").

    Exactly ``n = kept_count(delta.numel(), density)`` entries are kept. The threshold ``t`` is the
    ``(numel - n)``-th smallest ``|x|`` (``torch.kthvalue``, linear time); every entry with ``|x| > t``
    is kept, and the remaining places go to the entries with ``|x| == t`` in row-major (flattened)
    order, lowest index first. So ties at the threshold are broken by position, deterministically.

    Args:
        delta: the update, any shape.
        density: the fraction of entries to keep, in ``(0, 1]``.

    Returns:
        A tensor of the same shape and dtype; ``delta`` itself when every entry is kept (density 1).

    Raises:
        ConfigError: if ``density`` is not in ``(0, 1]``.
    """
    _check_density(density)
    flat = delta.reshape(-1)
    n_keep = kept_count(flat.numel(), density)
    if n_keep >= flat.numel():
        return delta
    mag = flat.abs()
    threshold = mag.kthvalue(flat.numel() - n_keep).values
    above = mag > threshold
    tied = mag == threshold
    # At most n_keep entries lie strictly above the k-th smallest and at least n_keep at or above it,
    # so `missing` is in [0, count(tied)] and the cumsum picks exactly that many tied entries.
    missing = n_keep - above.sum()
    keep = above | (tied & (tied.cumsum(0) <= missing))
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(delta)


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """Elect each entry's sign by total mass, as TIES does (its "sum" rule).

    Args:
        deltas: ``[K, ...]`` stack of (already weighted) expert updates.

    Returns:
        ``[...]`` tensor of ``+1``/``-1`` in ``deltas``' dtype: the sign of the sum over the K experts,
        with ``+1`` where that sum is exactly zero.
    """
    total = deltas.sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_mean(deltas: torch.Tensor, sign: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES "disjoint merge": mean over only the experts that agree with the elected sign.

    With ``y_i = weights[i] * deltas[i]``, an expert agrees at an entry when ``sign(y_i)`` equals the
    elected sign there; zero entries (trimmed or dropped) never agree. The result is
    ``sum(y_i over agreeing i) / count(agreeing i)``: the weighted sum divided by the *number* of
    agreeing experts, not by the sum of their weights (PEFT's ``disjoint_merge`` semantics). Entries
    where no expert agrees are 0.

    Args:
        deltas: ``[K, ...]`` stack of expert updates (unweighted).
        sign: ``[...]`` elected signs (``+1``/``-1``), e.g. from :func:`elect_sign` on the weighted stack.
        weights: ``[K]`` per-expert weights.

    Returns:
        ``[...]`` merged update.

    Raises:
        CompatibilityError: if ``weights`` does not have one entry per expert.
    """
    if weights.shape != (deltas.shape[0],):
        raise CompatibilityError(f"weights must have shape ({deltas.shape[0]},), one per expert, "
                                 f"got {tuple(weights.shape)}")
    weighted = deltas * weights.to(deltas).reshape(-1, *([1] * (deltas.dim() - 1)))
    agree = weighted.sign() == sign
    total = torch.where(agree, weighted, torch.zeros_like(weighted)).sum(dim=0)
    count = agree.sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE "drop and rescale": keep each entry with probability ``density`` and divide kept ones by it.

    The mask is ``torch.rand(delta.shape, generator=generator, dtype=float32) < density``, drawn on the
    generator's device (then moved to ``delta``'s), so it depends only on the generator's state and the
    shape, never on ``delta``'s dtype or values. The expectation of the result is ``delta``.

    Args:
        delta: the update, any shape.
        density: the keep probability, in ``(0, 1]``.
        generator: the explicit source of randomness; it is advanced by ``delta.numel()`` draws.

    Returns:
        A tensor of the same shape and dtype; ``delta`` itself when ``density == 1`` (nothing drawn).

    Raises:
        ConfigError: if ``density`` is not in ``(0, 1]``.
    """
    _check_density(density)
    if density == 1.0:
        return delta
    draws = torch.rand(delta.shape, generator=generator, device=generator.device, dtype=torch.float32)
    keep = (draws < density).to(delta.device)
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def stack_factors(items: list[tuple[float, LowRank]]) -> LowRank:
    """The exact low-rank form of ``sum(w_i * B_i @ A_i)``: factors concatenated along the rank axis.

    ``B = [w_1 B_1 | w_2 B_2 | ...]`` and ``A = [A_1; A_2; ...]``, so ``B @ A`` is the weighted sum and the
    rank is ``sum(r_i)``. The weight goes into B because B already carries the adapter scale.

    Args:
        items: ``(weight, update)`` pairs, all of the same ΔW shape.

    Returns:
        The stacked update, in fp32.

    Raises:
        ConfigError: if ``items`` is empty.
        CompatibilityError: if the updates' ΔW shapes differ.
    """
    if not items:
        raise ConfigError("stack_factors needs at least one (weight, LowRank) pair, got none")
    shape = items[0][1].shape
    for i, (_, lr) in enumerate(items):
        if lr.shape != shape:
            raise CompatibilityError(f"stack_factors: item {i} has ΔW shape {lr.shape}, expected {shape}")
    B = torch.cat([lr.B.to(torch.float32) * float(w) for w, lr in items], dim=1)
    A = torch.cat([lr.A.to(torch.float32) for _, lr in items], dim=0)
    return LowRank(A, B)


@dataclass(frozen=True)
class Truncation:
    """A rank-truncated update with the numbers needed to report its error.

    Attributes:
        delta: the truncated update.
        error: ``||ΔW - ΔW_r||_F / ||ΔW||_F`` (0 when ``||ΔW|| == 0``).
        norm: ``||ΔW||_F`` of the update *before* truncation, so errors of several modules can be pooled.
    """

    delta: LowRank
    error: float
    norm: float


def _relative(tail_sq: torch.Tensor, norm_sq: torch.Tensor) -> float:
    """``sqrt(tail / norm)`` as a float, 0 for a zero norm and never above 1 from rounding."""
    if float(norm_sq) <= 0.0:
        return 0.0
    return min(1.0, math.sqrt(max(0.0, float(tail_sq) / float(norm_sq))))


def factor_truncation(lr: LowRank, rank: int) -> Truncation:
    """:func:`truncate_factors` that also reports ``||ΔW||_F`` (see :class:`Truncation`).

    Args:
        lr: the update; cast to fp32.
        rank: the rank to keep, ``>= 0``.

    Returns:
        The truncation. When ``rank >= lr.rank`` the delta is ``lr`` (in fp32) unchanged and error is 0.
    """
    lr = lr.to(torch.float32)
    if lr.rank == 0 or min(lr.shape) == 0:
        return Truncation(lr, 0.0, 0.0)
    # B A = Qb (Rb Ra^T) Qa^T with orthonormal Qb, Qa: the SVD of the small core is the SVD of ΔW,
    # so the whole truncation costs O((out + in) R^2) and never forms the [out, in] matrix.
    qb, rb = torch.linalg.qr(lr.B)
    qa, ra = torch.linalg.qr(lr.A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    norm_sq = s.square().sum()
    if rank >= lr.rank:
        return Truncation(lr, 0.0, math.sqrt(float(norm_sq)))
    k = min(rank, s.numel())
    new = LowRank((vh[:k] @ qa.T).contiguous(), (qb @ (u[:, :k] * s[:k])).contiguous())
    return Truncation(new, _relative(s[k:].square().sum(), norm_sq), math.sqrt(float(norm_sq)))


def truncate_factors(lr: LowRank, rank: int) -> tuple[LowRank, float]:
    """Best rank-``rank`` approximation (Frobenius norm) of ``B @ A`` without forming ``B @ A``.

    QR of B (``out x R``) and of ``A^T`` (``in x R``), SVD of the small core ``R_B R_A^T``, top ``rank``
    singular triplets kept. The singular values are folded into B (``B' = U_k S_k``, ``A' = V_k^T`` with
    orthonormal rows), matching the convention that B carries the scale.

    Args:
        lr: the update; cast to fp32.
        rank: the rank to keep, ``>= 0``.

    Returns:
        ``(truncated, relative_error)`` with ``relative_error = sqrt(sum of dropped s^2 / sum of all s^2)``,
        i.e. ``||ΔW - ΔW_r||_F / ||ΔW||_F`` (0 when ΔW is 0). If ``rank >= lr.rank`` the update is
        returned unchanged (in fp32) with error 0.

    Raises:
        ConfigError: if ``rank`` is negative.
    """
    if rank < 0:
        raise ConfigError(f"rank must be >= 0, got {rank}")
    t = factor_truncation(lr, rank)
    return t.delta, t.error


def _randomized_svd(
    d: torch.Tensor, q: int, niter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko-Martinsson-Tropp range finder with ``niter`` power iterations and an explicit generator.

    ``torch.svd_lowrank`` draws its test matrix from the global RNG (no generator argument), which
    would make merges depend on whatever ran before; this draws from ``Generator(seed)`` instead.
    """
    gen = torch.Generator(device=d.device).manual_seed(seed)
    omega = torch.randn(d.shape[1], q, generator=gen, device=d.device, dtype=d.dtype)
    basis = torch.linalg.qr(d @ omega).Q
    for _ in range(niter):
        # Re-orthonormalise after every product so small singular directions are not lost to rounding.
        basis = torch.linalg.qr(d @ torch.linalg.qr(d.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ d, full_matrices=False)
    return basis @ u, s, vh


def dense_truncation(
    delta: torch.Tensor, rank: int, exact: bool = True, seed: int = 0, niter: int = 4, oversample: int = 8
) -> Truncation:
    """:func:`truncate_dense` that also reports ``||ΔW||_F`` (see :class:`Truncation`).

    Args:
        delta: ``[out, in]`` update; cast to fp32.
        rank: the rank to keep, ``>= 0`` (capped at ``min(out, in)``).
        exact: full ``torch.linalg.svd`` if true, else a seeded randomized SVD.
        seed: the randomized SVD's seed (ignored when ``exact``).
        niter: power iterations of the randomized SVD.
        oversample: extra test vectors of the randomized SVD.

    Returns:
        The truncation, singular values folded into B.
    """
    d = delta.to(torch.float32)
    k = min(rank, min(d.shape))
    norm_sq = d.square().sum()
    if exact:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        new = LowRank(vh[:k].contiguous(), (u[:, :k] * s[:k]).contiguous())
        tail_sq = s[k:].square().sum()
    else:
        u, s, vh = _randomized_svd(d, min(k + oversample, min(d.shape)), niter, seed)
        new = LowRank(vh[:k].contiguous(), (u[:, :k] * s[:k]).contiguous())
        # The randomized factors are a projection of ΔW, not its exact SVD: measure the error directly.
        tail_sq = (d - new.B @ new.A).square().sum()
    return Truncation(new, _relative(tail_sq, norm_sq), math.sqrt(float(norm_sq)))


def truncate_dense(
    delta: torch.Tensor, rank: int, exact: bool = True, seed: int = 0
) -> tuple[LowRank, float]:
    """Best (or, with ``exact=False``, near-best) rank-``rank`` factors of a dense update (TIES/DARE outputs).

    ``exact=True`` uses ``torch.linalg.svd``. ``exact=False`` uses a randomized SVD (4 power iterations,
    8 extra test vectors) whose Gaussian test matrix comes from ``torch.Generator().manual_seed(seed)``,
    so the same input and seed always give the same bytes. Singular values are folded into B.

    Args:
        delta: ``[out, in]`` update; cast to fp32.
        rank: the rank to keep, ``>= 0``; values above ``min(out, in)`` keep everything.
        exact: whether to use the full SVD.
        seed: the randomized SVD's seed (ignored when ``exact``).

    Returns:
        ``(factors, relative_error)`` with ``relative_error = ||ΔW - B' A'||_F / ||ΔW||_F`` (0 when ΔW is
        0); from the dropped singular values when exact, measured directly otherwise.

    Raises:
        ConfigError: if ``rank`` is negative or ``delta`` is not a matrix.
    """
    if rank < 0:
        raise ConfigError(f"rank must be >= 0, got {rank}")
    if delta.dim() != 2:
        raise ConfigError(f"truncate_dense needs an [out, in] matrix, got shape {tuple(delta.shape)}")
    t = dense_truncation(delta, rank, exact=exact, seed=seed)
    return t.delta, t.error
