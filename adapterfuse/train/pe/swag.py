"""SWAG over the adapter (Maddox et al. 2019): a Gaussian over the LoRA factors, fitted along the end of
training, from which K adapters are sampled.

With snapshots θ_1..θ_R of the flattened adapter (taken every ``swag_every`` steps once ``swag_start``
of training is done, at a held learning rate), the posterior is

    N(θ̄, ½·diag(σ²) + DDᵀ / (2(R'-1))),   σ² = mean(θ²) - θ̄²,

where D holds the last ``R' <= swag_rank`` deviations θ_i - θ̄_i (the running mean when θ_i was
taken). A sample is ``θ̄ + c·(σ ⊙ z₁ / √2 + D z₂ / √(2(R'-1)))`` with ``c = swag_scale``; with one
deviation column or fewer the low-rank term is left out (it is undefined), and ``c = 0`` or ``σ = 0``
with no deviation gives the mean exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from adapterfuse.errors import ConfigError

Tensors = dict[str, torch.Tensor]


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated in sorted-name order, fp32, 1-D."""
    return torch.cat([tensors[k].detach().float().reshape(-1) for k in sorted(tensors)])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Tensors:
    """Cut a 1-D vector back into tensors shaped like ``like`` (sorted-name order).

    Raises:
        ConfigError: the vector's size is not the tensors' total size.
    """
    total = sum(t.numel() for t in like.values())
    if total != vector.numel():
        raise ConfigError(f"SWAG vector has {vector.numel()} numbers, the adapter {total}; expected equal sizes")
    out, start = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = vector[start : start + n].reshape(like[k].shape).clone()
        start += n
    return out


@dataclass
class SwagPosterior:
    """The running SWAG statistics of a flattened adapter.

    Attributes:
        mean: θ̄, ``[P]``.
        sq_mean: mean of θ², ``[P]``.
        deviations: ``[R', P]`` the last ``R'`` deviations (oldest first).
        count: snapshots taken.
        rank: the most deviation columns kept.
    """

    mean: torch.Tensor
    sq_mean: torch.Tensor
    deviations: torch.Tensor
    count: int = 0
    rank: int = 10
    _devs: list[torch.Tensor] = field(default_factory=list, repr=False)

    @classmethod
    def empty(cls, size: int, rank: int) -> SwagPosterior:
        """No snapshot yet, for a ``size``-number adapter."""
        return cls(torch.zeros(size), torch.zeros(size), torch.zeros(0, size), 0, rank)

    def collect(self, theta: torch.Tensor) -> None:
        """Add one snapshot (running first and second moments; a deviation column if ``rank > 0``)."""
        theta = theta.detach().float().cpu()  # the statistics live on the CPU, whatever device trains
        n = self.count
        self.mean = (self.mean * n + theta) / (n + 1)
        self.sq_mean = (self.sq_mean * n + theta * theta) / (n + 1)
        self.count = n + 1
        if self.rank > 0:
            rows = [*list(self.deviations), theta - self.mean][-self.rank :]
            self.deviations = torch.stack(rows)

    @property
    def variance(self) -> torch.Tensor:
        """The diagonal σ², clamped at 0 (rounding can make ``E[θ²] - θ̄²`` slightly negative)."""
        return (self.sq_mean - self.mean * self.mean).clamp(min=0)

    def sample(self, k: int, scale: float, seed: int) -> torch.Tensor:
        """Draw ``k`` adapters, ``[k, P]`` (seeded).

        Raises:
            ConfigError: no snapshot was taken.
        """
        if self.count == 0:
            raise ConfigError(
                "SWAG: no snapshot was collected; expected training to run past swag_start "
                "(lower swag_start or swag_every, or train for more steps)"
            )
        gen = torch.Generator().manual_seed(seed)
        size = self.mean.numel()
        std = self.variance.sqrt()
        out = []
        for _ in range(k):
            z1 = torch.randn(size, generator=gen)
            noise = std * z1 / 2**0.5
            cols = self.deviations.shape[0]
            if cols >= 2:
                z2 = torch.randn(cols, generator=gen)
                noise = noise + (self.deviations.T @ z2) / (2 * (cols - 1)) ** 0.5
            out.append(self.mean + scale * noise)
        return torch.stack(out)

    def state(self) -> Tensors:
        """Tensors to save (``swag.mean``, ``swag.sq_mean``, ``swag.deviations``)."""
        return {
            "swag.mean": self.mean.contiguous(),
            "swag.sq_mean": self.sq_mean.contiguous(),
            "swag.deviations": self.deviations.contiguous(),
        }

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], count: int, rank: int) -> SwagPosterior:
        """Rebuild from :meth:`state`."""
        return cls(
            tensors["swag.mean"].float(),
            tensors["swag.sq_mean"].float(),
            tensors["swag.deviations"].float(),
            count,
            rank,
        )


def lr_factor(step: int, total: int, warmup: int, start: int, ratio: float) -> float:
    """SWAG's schedule: linear warm-up, linear decay to ``ratio`` at step ``start``, then held there.

    Snapshots along a decayed-to-zero schedule would barely differ; SWAG needs a held learning rate.
    """
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    if step >= start:
        return ratio
    frac = (step - warmup) / max(start - warmup, 1)
    return 1.0 - (1.0 - ratio) * frac


def snapshot_steps(total: int, start_share: float, every: int) -> set[int]:
    """The (1-based, after the update) steps at which a snapshot is taken; always includes the last."""
    first = int(total * start_share)
    return {s for s in range(first + 1, total + 1) if (s - first - 1) % every == 0} | {total}
