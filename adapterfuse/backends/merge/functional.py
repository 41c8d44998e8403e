"""Pure tensor building blocks of the merge methods.

Every function here works on one module's update ΔW (or a stack ``[K, out, in]`` of K experts' updates)
and never on the LoRA factors A and B separately: merging A's and B's independently is not a merge of
the updates, because ``(B1 + B2) @ (A1 + A2) != B1 @ A1 + B2 @ A2``. All maths runs in fp32 (inputs of
another floating dtype are used as given; the merge methods cast to fp32 before calling these).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

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
        ``floor(density * numel)``, at least 1 (when ``numel > 0``) and at most ``numel``: the count PEFT's
        ``magnitude_based_pruning`` and mergekit's ``magnitude`` sparsification keep (``int(density * n)``),
        so a trimmed ΔW is the same set of entries in all three.
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(density * numel)))


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
        raise CompatibilityError(
            f"weights must have shape ({deltas.shape[0]},), one per expert, got {tuple(weights.shape)}"
        )
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


SignOn = Literal["weighted", "unweighted"]
"""What TIES' sign election sums: the weighted values (mergekit, adapterfuse) or the unweighted ones (PEFT)."""

Divide = Literal["count", "weight", "none"]
"""What the agreeing entries' sum is divided by: their count (PEFT), the sum of their experts' absolute weights
(mergekit's ``normalize: true``), or nothing (mergekit's ``normalize: false``)."""


def elected_merge_(stack: torch.Tensor, weights: torch.Tensor, sign_on: SignOn, divide: Divide) -> torch.Tensor:
    """TIES' elect-and-merge under an explicit convention, using ``stack`` as scratch space.

    An expert agrees at an entry when its value (weighted or not, as the sign was elected) has the elected
    sign; zero entries never agree. The result is ``sum(w_i x_i over agreeing i)`` divided as ``divide``
    says; 0 where nothing agrees.

    Args:
        stack: ``[K, ...]`` unweighted, already trimmed or dropped expert updates; **overwritten**.
        weights: ``[K]`` per-expert weights.
        sign_on: elect each entry's sign on ``w_i x_i`` (``weighted``) or on ``x_i`` (``unweighted``).
        divide: ``count`` of agreeing experts, ``weight`` (sum of their ``|w_i|``) or ``none``.

    Returns:
        ``[...]`` merged update.
    """
    w = weights.to(stack)
    if sign_on == "weighted":
        stack.mul_(w.reshape(-1, *([1] * (stack.dim() - 1))))
    sign = elect_sign(stack)
    # After `* sign` an entry agrees iff it is > 0; clamping zeroes the others, leaving |x| where it agrees.
    agreeing = stack.mul_(sign).clamp_(min=0)
    total = agreeing.sum(dim=0) if sign_on == "weighted" else torch.tensordot(w, agreeing, dims=1)
    if divide != "none":
        mask = agreeing.sign_()
        denom = mask.sum(dim=0) if divide == "count" else torch.tensordot(w.abs(), mask, dims=1)
        # Where the divisor is 0 the sum is 0 too (or every agreeing weight is 0): divide by 1 there.
        total.div_(denom.masked_fill_(denom == 0, 1.0))
    return total.mul_(sign)


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
