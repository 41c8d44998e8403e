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


def kth_smallest(values: torch.Tensor, k: int, sample: int = 4096) -> torch.Tensor:
    """The ``k``-th smallest entry (1-based) of a 1-D tensor: exactly ``values.kthvalue(k).values``, faster.

    A seeded random sample of ``sample`` entries brackets the answer between two of its order statistics
    (a margin of about 2 standard deviations of the sample rank on each side); one pass counts the
    entries below the bracket and gathers the few inside it, and ``kthvalue`` runs on those only. If
    the bracket missed (rare; the sample is random), the full ``kthvalue`` answers. The sample is
    random rather than strided because a low-rank ΔW has row and column structure that a stride aliases.

    Args:
        values: a 1-D tensor without NaN.
        k: the rank, ``1 <= k <= values.numel()``.
        sample: the sample size; small inputs (under 16 samples' worth) use ``kthvalue`` directly.

    Returns:
        A 0-d tensor, the same value ``kthvalue`` returns.
    """
    n = values.numel()
    if n < 16 * sample:
        return values.kthvalue(k).values
    gen = torch.Generator(device=values.device).manual_seed(0)
    drawn = values[torch.randint(n, (sample,), generator=gen, device=values.device)].sort().values
    pos, margin = k / n * sample, 2.0 * math.sqrt(sample) + 2.0
    lo = drawn[max(0, math.floor(pos - margin))]
    hi = drawn[min(sample - 1, math.ceil(pos + margin))]
    below = int(torch.count_nonzero(values < lo))
    window = values[(values >= lo) & (values <= hi)]
    # Everything below `lo` precedes the window and everything above `hi` follows it, so the answer is
    # the window's (k - below)-th smallest whenever that rank falls inside the window.
    if 1 <= k - below <= window.numel():
        return window.kthvalue(k - below).values
    return values.kthvalue(k).values


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries of largest absolute value and zero the rest (TIES "trim").

    Exactly ``n = kept_count(delta.numel(), density)`` entries are kept. The threshold ``t`` is the
    ``(numel - n)``-th smallest ``|x|`` (:func:`kth_smallest`, equal to ``torch.kthvalue``); every entry
    with ``|x| > t`` is kept, and the remaining places go to the entries with ``|x| == t`` in row-major (flattened)
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
    threshold = kth_smallest(mag, flat.numel() - n_keep)
    above = mag > threshold
    # At most n_keep entries lie strictly above the k-th smallest and at least n_keep at or above it,
    # so `missing` is in [0, count(tied)] and the cumsum picks exactly that many tied entries.
    missing = n_keep - int(above.sum())
    keep = above
    if missing:  # only when values repeat at the threshold; the cumsum is the costly part of a trim
        tied = mag == threshold
        keep = above | (tied & (tied.cumsum(0) <= missing))
    return torch.where(keep, flat, 0.0).view_as(delta)


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
    return agreeing_mean_(deltas * weights.to(deltas).reshape(-1, *([1] * (deltas.dim() - 1))), sign)


def agreeing_mean_(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """:func:`disjoint_mean` of an already weighted stack, using ``weighted`` as scratch space.

    Args:
        weighted: ``[K, ...]`` weighted expert updates; **overwritten** (the trailing underscore, as in
            PyTorch's in-place ops). Pass a tensor the caller owns.
        sign: ``[...]`` elected signs (``+1``/``-1``).

    Returns:
        ``[...]``: the sum of the entries whose sign is ``sign`` divided by their count; 0 where none agrees.
    """
    # In place and in float arithmetic: each K-sized temporary or boolean pass cost more than the maths.
    # After `* sign` an entry agrees iff it is > 0 (zeros never agree); clamping drops the others, the sum
    # is then the agreeing magnitudes and `sign_()` turns the kept entries into a count.
    agreeing = weighted.mul_(sign).clamp_(min=0)
    total = agreeing.sum(dim=0)
    count = agreeing.sign_().sum(dim=0)
    # Where nothing agrees the sum is 0, so dividing by max(count, 1) already gives the required 0.
    return total.mul_(sign).div_(count.clamp_(min=1))


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
    if rank >= lr.rank:
        # Nothing to drop; only the norm is needed: ||B A||_F^2 = <B^T B, A A^T> from two small Gram
        # matrices, several times cheaper than the QRs and SVD below.
        norm_sq = float(((lr.B.T @ lr.B) * (lr.A @ lr.A.T)).sum())
        return Truncation(lr, 0.0, math.sqrt(max(norm_sq, 0.0)))
    # B A = Qb (Rb Ra^T) Qa^T with orthonormal Qb, Qa: the SVD of the small core is the SVD of ΔW,
    # so the whole truncation costs O((out + in) R^2) and never forms the [out, in] matrix.
    gram = _gram_triangles(lr)
    if gram is not None:
        return _truncate_via_gram(lr, rank, *gram)
    qb, rb = torch.linalg.qr(lr.B)
    qa, ra = torch.linalg.qr(lr.A.T)
    us, vh, error, norm = _core_truncation(rb, ra, rank)
    return Truncation(LowRank((vh @ qa.T).contiguous(), (qb @ us).contiguous()), error, norm)


def _core_truncation(rb: torch.Tensor, ra: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """SVD of the core ``Rb Ra^T``: its top-``rank`` ``U_k S_k`` and ``V_k^T``, the relative error of dropping
    the rest, and ``||ΔW||_F`` (the core has the singular values of ``B A``)."""
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(rank, s.numel())
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


def _truncate_via_gram(lr: LowRank, rank: int, rb: torch.Tensor, ra: torch.Tensor) -> Truncation:
    """:func:`factor_truncation` given ``Rb`` and ``Ra``: ``Qb = B Rb^-1`` and ``Qa = A^T Ra^-1``, applied by
    triangular solves on ``[R, k]`` blocks so no ``Q`` is ever formed."""
    us, vh, error, norm = _core_truncation(rb, ra, rank)
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
