"""Arrow: zero-shot, per-token, per-layer routing by each expert's top right singular vector.

For every adapted linear layer, expert ``e``'s prototype ``p_e`` is the top right singular vector of
its ``ΔW_e = B_e A_e``: the input direction it changes most. A token with input ``x`` is routed to the
``k`` experts with the largest ``|cos(x, p_e)|`` (the sign of a singular vector is arbitrary), weighted
by a softmax over those ``k`` at a temperature. No training data is used.

The prototype comes from power iteration on the factors: ``ΔWᵀΔW = Aᵀ(BᵀB)A``, and for ``v = Aᵀs`` the
eigen-equation reduces to ``(BᵀB)(AAᵀ) s = λ s``, an ``r x r`` problem; ``ΔW`` is never formed.

The routed layer is one fused low-rank update of rank ``R = Σ r_e``: ``A = [A_1; …; A_E]`` (``[R, in]``)
and ``B = [B_1 | … | B_E]`` (``[out, R]``), and the per-token routing weights multiply the rank-space
activations ``xAᵀ`` slot by slot (each slot scaled by its expert's weight) before ``B``. That is
exactly ``Σ_e w_e(x) ΔW_e x``, in two matmuls for all experts, and works for experts of different ranks.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adapterfuse.delta import Deltas, LowRank
from adapterfuse.errors import CompatibilityError, ConfigError


def power_prototypes(factors: Sequence[LowRank], iters: int = 2000, tol: float = 1e-12,
                     seed: int = 0) -> torch.Tensor:
    """Top right singular vectors of several ``ΔW = B A`` of one input size, by power iteration.

    Args:
        factors: the updates (ranks may differ; they are zero-padded, which changes nothing).
        iters: the most iterations.
        tol: stop when every iterate moved less than this (unit vectors).
        seed: seed of the start vectors.

    Returns:
        ``[P, in]`` fp32 unit vectors (a zero row for an update that is exactly zero).
    """
    r = max(max(f.rank for f in factors), 1)
    in_dim = int(factors[0].A.shape[1])
    A = torch.zeros(len(factors), r, in_dim, dtype=torch.float64)
    B_gram = torch.zeros(len(factors), r, r, dtype=torch.float64)
    for i, f in enumerate(factors):
        A[i, : f.rank] = f.A.double()
        b = f.B.double()
        B_gram[i, : f.rank, : f.rank] = b.T @ b
    M = B_gram @ (A @ A.transpose(1, 2))  # (BᵀB)(AAᵀ): r x r per update
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(len(factors), r, 1, generator=gen, dtype=torch.float64)
    s = s / s.norm(dim=1, keepdim=True)
    for _ in range(iters):
        t = M @ s
        t = t / t.norm(dim=1, keepdim=True).clamp(min=1e-300)
        moved = float((t - s).norm(dim=1).max())
        s = t
        if moved < tol:
            break
    v = (A.transpose(1, 2) @ s).squeeze(-1)  # Aᵀ s: back to input space
    return (v / v.norm(dim=1, keepdim=True).clamp(min=1e-300)).float()


def arrow_prototypes(pool: Sequence[Deltas], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every module's ``[E, in]`` prototypes (a zero row where an expert lacks the module).

    Args:
        pool: one ``module -> LowRank`` mapping per expert.
        seed: seed of the power iteration's start vectors.

    Returns:
        Module -> prototypes.
    """
    modules = sorted(set().union(*(d.keys() for d in pool)))
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        present = [(i, d[module]) for i, d in enumerate(pool) if module in d and d[module].rank > 0]
        in_dim = next(iter(present))[1].A.shape[1] if present else 0
        protos = torch.zeros(len(pool), in_dim)
        if present:
            protos[[i for i, _ in present]] = power_prototypes([f for _, f in present], seed=seed)
        out[module] = protos
    return out


def routing_weights(x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Per-token weights over experts: softmax over the top-k ``|cos(x, p_e)| / T``, zero elsewhere.

    Args:
        x: ``[N, in]`` token inputs (fp32).
        prototypes: ``[E, in]`` unit vectors (zero rows mark experts without this module: never chosen).
        top_k: experts kept per token (at most the experts present).
        temperature: ``T > 0``.

    Returns:
        ``[N, E]`` weights, each row summing to 1 over its ``k`` experts.
    """
    present = prototypes.norm(dim=1) > 0
    k = min(top_k, int(present.sum()))
    cos = (x @ prototypes.T).abs() / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    logits = torch.where(present, cos / temperature, torch.full_like(cos, float("-inf")))
    values, index = torch.sort(logits, dim=1, descending=True, stable=True)
    weights = torch.zeros_like(cos)
    return weights.scatter_(1, index[:, :k], torch.softmax(values[:, :k], dim=1))


class ArrowLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the Arrow-routed fused update of all experts.

    Args:
        base: the base linear layer (shared, never changed).
        factors: one update per expert (``None`` where an expert lacks this module).
        prototypes: ``[E, in]`` (see :func:`arrow_prototypes`).
        top_k: experts per token.
        temperature: this layer's softmax temperature.

    Attributes:
        fused: ``True`` (default) runs the rank-``R`` fused form; ``False`` the per-expert reference.
    """

    def __init__(self, base: nn.Linear, factors: Sequence[LowRank | None], prototypes: torch.Tensor, top_k: int,
                 temperature: float) -> None:
        super().__init__()
        self.base, self.top_k, self.temperature, self.fused = base, top_k, float(temperature), True
        present = [(e, f) for e, f in enumerate(factors) if f is not None and f.rank > 0]
        device = base.weight.device
        # Buffers, not parameters: they follow .to() but are neither trained nor saved with the model.
        self.register_buffer("A", torch.cat([f.A.float() for _, f in present]).to(device), persistent=False)
        self.register_buffer("B", torch.cat([f.B.float() for _, f in present], dim=1).to(device), persistent=False)
        slots = torch.cat([torch.full((f.rank,), e, dtype=torch.long) for e, f in present])
        self.register_buffer("slot_expert", slots.to(device), persistent=False)
        self.register_buffer("prototypes", prototypes.float().to(device), persistent=False)
        self.ranks = [(e, f.rank) for e, f in present]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + Σ_e w_e(x) ΔW_e x`` per token."""
        y = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        # The routing decision is fp32 (a top-k on bf16 cosines would tie often). The low-rank part runs
        # in the autocast dtype under autocast, as PEFT's LoRA layers do, and in fp32 otherwise.
        with torch.autocast(device_type=x.device.type, enabled=False):
            w = routing_weights(flat.float(), self.prototypes, self.top_k, self.temperature)
        if not torch.is_autocast_enabled(x.device.type):
            flat = flat.to(self.A.dtype)
        low = self._fused(flat, w) if self.fused else self._reference(flat, w)
        return y + low.view(y.shape).to(y.dtype)

    def _fused(self, flat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One rank-``R`` update, the routing weights applied slot by slot in rank space."""
        h = flat @ self.A.T
        return (h * w[:, self.slot_expert].to(h.dtype)) @ self.B.T

    def _reference(self, flat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The same sum computed expert by expert (for tests and the benchmark)."""
        out = torch.zeros(flat.shape[0], self.B.shape[0], dtype=flat.dtype, device=flat.device)
        start = 0
        for e, r in self.ranks:
            a, b = self.A[start:start + r], self.B[:, start:start + r]
            part = (flat @ a.T) @ b.T
            out = out + w[:, e:e + 1].to(part.dtype) * part
            start += r
        return out


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer (modules can then be swapped)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def layer_temperature(temperature: float | Mapping[str, float], module: str) -> float:
    """A module's temperature: one number for all, or a mapping by module name (``"default"`` otherwise).

    Raises:
        ConfigError: a missing or non-positive temperature.
    """
    t = temperature if not isinstance(temperature, Mapping) else temperature.get(module,
                                                                                 temperature.get("default", 1.0))
    if not float(t) > 0:
        raise ConfigError(f"temperature of {module!r}: expected > 0, got {t}")
    return float(t)


class ArrowModel:
    """A private copy of the base whose adapted linears are :class:`ArrowLinear` layers.

    Args:
        model: the base causal LM (never modified; the copy shares its weights).
        pool: one ``module -> LowRank`` mapping per expert.
        top_k: experts per token.
        temperature: softmax temperature, one number or per module name.
        prototypes: precomputed prototypes (e.g. loaded); computed when ``None``.
        seed: seed of the power iteration.

    Raises:
        ConfigError: no experts, a bad top_k or temperature.
        CompatibilityError: a module missing from the base, not linear, or of another shape.
    """

    def __init__(self, model: nn.Module, pool: Sequence[Deltas], top_k: int = 1,
                 temperature: float | Mapping[str, float] = 1.0, prototypes: Mapping[str, torch.Tensor] | None = None,
                 seed: int = 0) -> None:
        if not pool:
            raise ConfigError("arrow: expected at least one expert, got none")
        if top_k < 1 or top_k > len(pool):
            raise ConfigError(f"top_k: expected 1 .. {len(pool)} (the number of experts), got {top_k}")
        self.prototypes = dict(prototypes) if prototypes is not None else arrow_prototypes(pool, seed)
        self.model = shared_copy(model).eval()
        self.layers: dict[str, ArrowLinear] = {}
        for module in sorted(set().union(*(d.keys() for d in pool))):
            factors = [d.get(module) for d in pool]
            if all(f is None or f.rank == 0 for f in factors):
                continue
            self.layers[module] = self._install(module, factors, top_k, layer_temperature(temperature, module))

    def _install(self, module: str, factors: list[LowRank | None], top_k: int, temperature: float) -> ArrowLinear:
        try:
            target = self.model.get_submodule(module)
        except AttributeError:
            raise CompatibilityError(f"module {module!r}: not found in the base model; expected experts trained "
                                     "on this base") from None
        if not isinstance(target, nn.Linear):
            raise CompatibilityError(f"module {module!r}: is a {type(target).__name__}, expected nn.Linear")
        shape = next(f.shape for f in factors if f is not None)
        if tuple(target.weight.shape) != shape:
            raise CompatibilityError(f"module {module!r}: base weight is {tuple(target.weight.shape)}, the experts' "
                                     f"ΔW is {shape}; expected the same base")
        layer = ArrowLinear(target, factors, self.prototypes[module], top_k, temperature)
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
        return layer

    def set_fused(self, fused: bool) -> None:
        """Switch every layer between the fused form and the per-expert reference."""
        for layer in self.layers.values():
            layer.fused = fused
