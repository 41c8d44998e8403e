"""The router interface: a batch of input features -> a distribution over the experts; keep the top k.

Every sequence-level router (learned, clustered, a fixed choice) maps features ``[n, d]`` to
probabilities ``[n, E]``. :func:`keep_top_k` keeps each row's ``k`` largest and renormalises them; what
happens next (pooled ensemble or merge) is the predictor's business. Routers save as a JSON-ready
config plus named tensors, and load back through :data:`ROUTERS`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from adapterfuse.errors import ConfigError


def check_top_k(top_k: int, n_experts: int | None = None) -> int:
    """Return ``top_k`` if it is an integer >= 1 (and at most ``n_experts`` when that is known).

    Raises:
        ConfigError: otherwise, naming both numbers.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k: expected an integer >= 1, got {top_k!r}")
    if n_experts is not None and top_k > n_experts:
        raise ConfigError(
            f"top_k: {top_k} is larger than the number of experts to route to ({n_experts}); expected 1 .. {n_experts}"
        )
    return top_k


def keep_top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` most probable experts and their renormalised weights.

    Ties go to the lower expert index (a stable sort), so the choice is deterministic.

    Args:
        probs: ``[n, E]`` router probabilities.
        k: how many to keep (``1 <= k <= E``).

    Returns:
        ``(indices [n, k] long, weights [n, k] fp32 summing to 1 per row)``, best first.

    Raises:
        ConfigError: for a ``k`` out of range.
    """
    check_top_k(k, int(probs.shape[1]))
    return keep_weights(probs, torch.sort(probs.float(), dim=1, descending=True, stable=True)[1], k)


def keep_weights(probs: torch.Tensor, order: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` experts of each row's ``order`` and their ``probs``, renormalised to sum to 1.

    Args:
        probs: ``[n, E]`` router probabilities.
        order: ``[n, E]`` each row's experts, best first.
        k: how many to keep.

    Returns:
        ``(indices [n, k] long, weights [n, k] fp32)``.
    """
    order = order[:, :k]
    values = probs.float().gather(1, order)
    total = values.sum(dim=1, keepdim=True)
    # A row whose kept mass is zero (a router certain of some other expert) falls back to equal weights.
    weights = torch.where(total > 0, values / total.clamp(min=1e-30), torch.full_like(values, 1.0 / k))
    return order, weights


class Standardizer:
    """Per-feature mean and standard deviation, fitted once and applied to every batch.

    Args:
        mean: ``[d]``.
        std: ``[d]`` (clamped away from 0 so constant features stay finite).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean, self.std = mean.float(), std.float().clamp(min=1e-6)

    @classmethod
    def fit(cls, features: torch.Tensor) -> Standardizer:
        """Fit on ``[N, d]`` features."""
        x = features.float()
        return cls(x.mean(dim=0), x.std(dim=0, unbiased=False) if len(x) > 1 else torch.ones(x.shape[1]))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std``."""
        return (features.float() - self.mean) / self.std


class Projection:
    """Standardise, then keep the top principal components of all but the last ``keep`` features.

    A linear router on ~1,000 features fitted on a few hundred inputs spends its capacity on the content
    directions that happen to separate those inputs, and drowns the few features that generalise (the
    text's shape, appended last). Projecting the rest onto its top components first, and passing the
    last ``keep`` features through, leaves the classifier few enough inputs to use them.

    Args:
        scaler: the standardiser of the input features.
        components: ``[d - keep, k]`` orthonormal principal directions (sign fixed: each column's largest
            entry is positive, so a fit is deterministic).
        keep: trailing features passed through (standardised) instead of projected.
    """

    def __init__(self, scaler: Standardizer, components: torch.Tensor, keep: int) -> None:
        self.scaler, self.components, self.keep = scaler, components.float(), int(keep)

    @classmethod
    def fit(cls, features: torch.Tensor, k: int, keep: int = 0) -> Projection:
        """Fit on ``[N, d]`` features.

        Raises:
            ConfigError: ``k`` not in ``1 .. min(N, d - keep)``.
        """
        n, d = features.shape
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(n, d - keep):
            raise ConfigError(
                f"pca: expected an integer in 1 .. {min(n, d - keep)} (validation inputs and projected "
                f"features), got {k!r}"
            )
        scaler = Standardizer.fit(features)
        content = scaler(features)[:, : d - keep]
        _, _, vh = torch.linalg.svd(content - content.mean(dim=0), full_matrices=False)
        top = vh[:k]
        signs = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))
        return cls(scaler, (top * signs).T.contiguous(), keep)

    @property
    def dim(self) -> int:
        """The projected width: ``k + keep``."""
        return int(self.components.shape[1]) + self.keep

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` features -> ``[n, k + keep]``."""
        z = self.scaler(features)
        cut = z.shape[1] - self.keep
        return torch.cat([z[:, :cut] @ self.components, z[:, cut:]], dim=1)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Named tensors to save."""
        return {
            f"{prefix}mean": self.scaler.mean,
            f"{prefix}std": self.scaler.std,
            f"{prefix}components": self.components,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, keep: int) -> Projection:
        """Rebuild from :meth:`tensors`."""
        return cls(
            Standardizer(tensors[f"{prefix}mean"], tensors[f"{prefix}std"]), tensors[f"{prefix}components"], keep
        )


class Router:
    """Base class of sequence-level routers.

    Attributes:
        kind: the name saved in the manifest (the key of :data:`ROUTERS`).
        n_experts: the number of experts it distributes over.
    """

    kind: ClassVar[str] = "router"
    n_experts: int

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """``[n, E]`` probabilities over the experts for ``[n, d]`` features."""
        raise NotImplementedError

    def choose(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``k`` chosen experts and their weights (:func:`keep_top_k` of :meth:`probs`; a router
        with another decision rule overrides this)."""
        return keep_top_k(self.probs(features), k)

    def config(self) -> dict[str, Any]:
        """JSON-ready settings (what :meth:`from_saved` needs besides the tensors)."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors to save."""
        return {}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Router:
        """Rebuild a router from :meth:`config` and :meth:`tensors`."""
        raise NotImplementedError

    def n_params(self) -> int:
        """Numbers the router stores."""
        return sum(t.numel() for t in self.tensors().values())


class FixedRouter(Router):
    """Always the same expert: the reference a router is checked against.

    Args:
        n_experts: the number of experts.
        expert: the index of the expert every input goes to.

    Raises:
        ConfigError: an index out of range.
    """

    kind = "fixed"

    def __init__(self, n_experts: int, expert: int) -> None:
        if not 0 <= expert < n_experts:
            raise ConfigError(f"expert: index {expert} out of range for {n_experts} experts")
        self.n_experts, self.expert = n_experts, expert

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((features.shape[0], self.n_experts))
        out[:, self.expert] = 1.0
        return out

    def config(self) -> dict[str, Any]:
        return {"n_experts": self.n_experts, "expert": self.expert}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FixedRouter:
        return cls(int(config["n_experts"]), int(config["expert"]))


ROUTERS: dict[str, type[Router]] = {FixedRouter.kind: FixedRouter}
"""Saved router kind -> class (the learned and clustered routers register themselves on import)."""


def register(cls: type[Router]) -> type[Router]:
    """Class decorator: make a router kind loadable."""
    ROUTERS[cls.kind] = cls
    return cls


def load_router(kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Router:
    """Rebuild a saved router.

    Raises:
        ConfigError: an unknown kind.
    """
    if kind not in ROUTERS:
        raise ConfigError(f"router kind {kind!r}: unknown; expected one of {', '.join(sorted(ROUTERS))}")
    return ROUTERS[kind].from_saved(config, tensors)
