"""Low-rank updates as stacked factors: exact sums, and truncation back to a rank with its error.

A weighted sum of K rank-r updates is exactly one update of rank K·r with its factors stacked
(:func:`stack_factors`; :func:`slot_factors` also records which update each rank slot came from, so
the weights can be applied later, per input). K updates kept apart but run together are stacked along
a new leading axis instead, zero-padded to one rank (:func:`stack_members`).

Truncating a stacked update to rank r needs no full-size SVD: a QR of each stacked factor and an SVD
of the small (K·r)-sized core give the exact truncation (:func:`truncate_factors`); dense updates
(after a sign election or a drop) go through :func:`truncate_dense`. All in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adapterfuse.delta import LowRank
from adapterfuse.errors import CompatibilityError, ConfigError


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


def slot_factors(factors: Sequence[LowRank | None]) -> tuple[LowRank, torch.Tensor]:
    """The members' factors of one module concatenated along the rank axis, and each rank slot's member.

    Args:
        factors: one update per member (``None`` or rank 0 where a member lacks the module; at least one
            must have rank > 0).

    Returns:
        ``(stacked, slots)``: :func:`stack_factors` of the present updates at weight 1 (``[R, in]`` and
        ``[out, R]``, ``R`` the sum of their ranks, fp32), and ``slots`` ``[R]``, the index in ``factors``
        of each rank slot's member. Scaling slot ``j`` by member ``slots[j]``'s weight gives their
        weighted sum.
    """
    present = [(i, f) for i, f in enumerate(factors) if f is not None and f.rank > 0]
    stacked = stack_factors([(1.0, f) for _, f in present])  # weight 1: the weights are applied per input
    slots = torch.cat([torch.full((f.rank,), i, dtype=torch.long) for i, f in present])
    return stacked, slots


Stacked = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Module name -> ``(A [K, r_max, in], B [K, out, r_max])``, fp32."""


def stack_members(members: Sequence[Mapping[str, LowRank]], names: Sequence[str]) -> Stacked:
    """Stack the members' low-rank factors module by module, zero-padding ranks and missing modules.

    Args:
        members: one ``module -> LowRank`` mapping per member (AdaLoRA already folded, see ``Expert.deltas``).
        names: the members' names, for error messages.

    Returns:
        Module -> ``(A, B)`` with ``B[k] @ A[k]`` equal to member ``k``'s ΔW (zero where it lacks the
        module). Modules of rank 0 in every member are left out.

    Raises:
        CompatibilityError: if two members disagree on a module's ΔW shape.
    """
    stacked: Stacked = {}
    k = len(members)
    for module in sorted(set().union(*(m.keys() for m in members))):
        present = [(i, m[module]) for i, m in enumerate(members) if module in m]
        out_dim, in_dim = present[0][1].shape
        for i, d in present:
            if d.shape != (out_dim, in_dim):
                raise CompatibilityError(
                    f"module {module!r}: member {names[i]!r} has ΔW shape {d.shape}, member "
                    f"{names[present[0][0]]!r} has {(out_dim, in_dim)}; expected one shape"
                )
        r_max = max(d.rank for _, d in present)
        if r_max == 0:
            continue
        A = torch.zeros(k, r_max, in_dim, dtype=torch.float32)
        B = torch.zeros(k, out_dim, r_max, dtype=torch.float32)
        for i, d in present:
            A[i, : d.rank] = d.A.float()
            B[i, :, : d.rank] = d.B.float()
        stacked[module] = (A, B)
    return stacked


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


def energy_rank(s: torch.Tensor, energy: float, total: float | None = None) -> int:
    """The smallest ``k >= 1`` whose top-``k`` singular values keep ``energy`` of the squared norm.

    Args:
        s: singular values, descending.
        energy: the share of the squared Frobenius norm to keep, in ``(0, 1]``.
        total: the squared norm (default ``sum(s^2)``; a sketch's ``s`` sums to less than the matrix's).

    Returns:
        ``k`` with ``sum(s[:k]^2) >= energy * total`` (in float64), at most ``s.numel()``; 1 for a zero norm.
    """
    cum = s.double().square().cumsum(0)
    total = float(cum[-1]) if total is None and cum.numel() else (total or 0.0)
    if total <= 0.0:
        return 1
    return min(s.numel(), int((cum < energy * total).sum()) + 1)


def factor_truncation(lr: LowRank, rank: int, energy: float | None = None) -> Truncation:
    """:func:`truncate_factors` that also reports ``||ΔW||_F`` (see :class:`Truncation`).

    Args:
        lr: the update; cast to fp32.
        rank: the rank to keep, ``>= 0``; ignored when ``energy`` is given.
        energy: keep the smallest rank holding this share of ``||ΔW||_F^2`` (:func:`energy_rank`) instead.

    Returns:
        The truncation. When ``rank >= lr.rank`` the delta is ``lr`` (in fp32) unchanged and error is 0.
    """
    lr = lr.to(torch.float32)
    if lr.rank == 0 or min(lr.shape) == 0:
        return Truncation(lr, 0.0, 0.0)
    if energy is None and rank >= lr.rank:
        # Nothing to drop; only the norm is needed: ||B A||_F^2 = <B^T B, A A^T> from two small Gram
        # matrices, several times cheaper than the QRs and SVD below.
        norm_sq = float(((lr.B.T @ lr.B) * (lr.A @ lr.A.T)).sum())
        return Truncation(lr, 0.0, math.sqrt(max(norm_sq, 0.0)))
    # B A = Qb (Rb Ra^T) Qa^T with orthonormal Qb, Qa: the SVD of the small core is the SVD of ΔW,
    # so the whole truncation costs O((out + in) R^2) and never forms the [out, in] matrix.
    gram = _gram_triangles(lr)
    if gram is not None:
        return _truncate_via_gram(lr, rank, *gram, energy=energy)
    qb, rb = torch.linalg.qr(lr.B)
    qa, ra = torch.linalg.qr(lr.A.T)
    us, vh, error, norm = _core_truncation(rb, ra, rank, energy)
    return Truncation(LowRank((vh @ qa.T).contiguous(), (qb @ us).contiguous()), error, norm)


def _core_truncation(
    rb: torch.Tensor, ra: torch.Tensor, rank: int, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """SVD of the core ``Rb Ra^T``: its top-``k`` ``U_k S_k`` and ``V_k^T`` (``k`` = ``rank``, or the
    :func:`energy_rank` when ``energy`` is given), the relative error of dropping the rest, and ``||ΔW||_F``
    (the core has the singular values of ``B A``)."""
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = energy_rank(s, energy) if energy is not None else min(rank, s.numel())
    norm_sq = s.square().sum()
    return u[:, :k] * s[:k], vh[:k], _relative(s[k:].square().sum(), norm_sq), math.sqrt(float(norm_sq))


def _gram_triangles(lr: LowRank) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The R factors of ``B = Qb Rb`` and ``A^T = Qa Ra`` as Cholesky factors of their Gram matrices.

    Two ``[R, R]`` Gram products (fp32) and Choleskys (fp64) cost about 0.7 of two Householder QRs here.
    The Gram squares the condition number, so it is refused (``None``: use QR) when a factor is
    rank-deficient or its triangle's diagonal spans more than a factor 100 (a condition number of about
    100 or more).
    """
    out = []
    for m in (lr.B, lr.A.T):
        if m.shape[0] < m.shape[1]:
            return None
        r, info = torch.linalg.cholesky_ex((m.T @ m).double(), upper=True)
        d = r.diagonal().abs()
        if int(info) != 0 or not float(d.min()) > 1e-2 * float(d.max()):
            return None
        out.append(r)
    return out[0], out[1]


def _truncate_via_gram(
    lr: LowRank, rank: int, rb: torch.Tensor, ra: torch.Tensor, energy: float | None = None
) -> Truncation:
    """:func:`factor_truncation` given ``Rb`` and ``Ra``: ``Qb = B Rb^-1`` and ``Qa = A^T Ra^-1``, applied by
    triangular solves on ``[R, k]`` blocks so no ``Q`` is ever formed."""
    us, vh, error, norm = _core_truncation(rb, ra, rank, energy)
    left = torch.linalg.solve_triangular(rb, us, upper=True)  # Rb^-1 U_k S_k
    right = torch.linalg.solve_triangular(ra, vh.T, upper=True)  # Ra^-1 V_k
    return Truncation(LowRank((right.T.float() @ lr.A).contiguous(), (lr.B @ left.float()).contiguous()), error, norm)


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


def _randomized_svd(d: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def truncate_dense(delta: torch.Tensor, rank: int, exact: bool = True, seed: int = 0) -> tuple[LowRank, float]:
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


def thin_svd(lr: LowRank, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact SVD of ``B @ A`` from a QR of each factor and an SVD of the ``[R, R]`` core, in fp32.

    Args:
        lr: the update.
        tol: singular values at or below ``tol`` times the largest are dropped (numerically zero: a
            stacked update's rank can be below its stacked rank).

    Returns:
        ``(U [out, k], S [k], Vh [k, in])`` with ``B @ A = U diag(S) Vh`` and ``S`` descending.
    """
    lr = lr.to(torch.float32)
    qb, rb = torch.linalg.qr(lr.B)
    qa, ra = torch.linalg.qr(lr.A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = int((s > tol * s.max()).sum()) if s.numel() and float(s.max()) > 0 else 0
    return qb @ u[:, :k], s[:k], vh[:k] @ qa.T


def dense_energy_truncation(
    delta: torch.Tensor, energy: float, exact: bool = False, seed: int = 0, start: int = 16
) -> Truncation:
    """The smallest-rank truncation of a dense update that keeps ``energy`` of ``||ΔW||_F^2``.

    A seeded randomized SVD (:func:`dense_truncation`'s) of ``start`` + 8 vectors grows (at least doubling,
    more when the share it holds says so) until its singular values hold the share; the top ``k`` of them
    then keep it by construction (their factors are an orthogonal projection of ΔW, so the error
    ``sqrt(1 - kept share)`` is at most ``sqrt(1 - energy)``, and it is measured directly). Once the sketch
    would pass half of ``min(out, in)`` a full SVD is the cheaper one, and it (or ``exact``) picks ``k``
    from the exact singular values.

    Args:
        delta: ``[out, in]`` update; cast to fp32.
        energy: the share of the squared Frobenius norm to keep, in ``(0, 1]``.
        exact: use the full SVD from the start.
        seed: the randomized SVD's seed.
        start: the first sketch's rank (e.g. the experts' stacked rank).

    Returns:
        The truncation, singular values folded into B.
    """
    d = delta.to(torch.float32)
    norm_sq = float(d.double().square().sum())
    full = min(d.shape)
    q = min(full, max(1, start) + 8)
    while not exact and 2 * q <= full:
        u, s, vh = _randomized_svd(d, q, 4, seed)
        captured = float(s.double().square().sum())
        if captured >= energy * norm_sq:
            k = energy_rank(s, energy, norm_sq)
            new = LowRank(vh[:k].contiguous(), (u[:, :k] * s[:k]).contiguous())
            return Truncation(new, _relative((d - new.B @ new.A).square().sum(), d.square().sum()), norm_sq**0.5)
        # The top q directions hold the most energy per direction, so the rank holding the share is at least
        # q * energy * ||ΔW||^2 / captured: a near-flat spectrum (a sign-elected ΔW) goes to the full SVD at once.
        q = max(2 * q, math.ceil(q * energy * norm_sq / max(captured, 1e-30)) + 8)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = energy_rank(s, energy)
    new = LowRank(vh[:k].contiguous(), (u[:, :k] * s[:k]).contiguous())
    return Truncation(new, _relative(s[k:].square().sum(), s.square().sum()), norm_sq**0.5)


def dense_factors(delta: torch.Tensor) -> Truncation:
    """A dense update as exact factors of rank ``min(out, in)``, with no SVD and no error.

    ``B = ΔW, A = I`` when ``in <= out``, else ``B = I, A = ΔW``: the adapter is as large as ΔW itself.

    Args:
        delta: ``[out, in]`` update; cast to fp32.

    Returns:
        The factors with error 0 and the norm of ΔW.
    """
    d = delta.to(torch.float32).contiguous()
    out_dim, in_dim = d.shape
    if in_dim <= out_dim:
        lr = LowRank(torch.eye(in_dim, dtype=torch.float32, device=d.device), d)
    else:
        lr = LowRank(d, torch.eye(out_dim, dtype=torch.float32, device=d.device))
    return Truncation(lr, 0.0, float(d.double().square().sum()) ** 0.5)
