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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adapterfuse.delta import Deltas, LowRank
from adapterfuse.errors import ConfigError
from adapterfuse.lowrank import slot_factors
from adapterfuse.surgery import StackedLoRALinear, replace_linear, shared_copy


def power_prototypes(factors: Sequence[LowRank], iters: int = 2000, tol: float = 1e-12, seed: int = 0) -> torch.Tensor:
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


def mean_subtracted(pool: Sequence[Deltas]) -> list[Deltas]:
    """Each expert's update minus the experts' mean update, exactly, as stacked factors (GenKnowSub).

    For a module the experts ``P`` share, ``ΔW_e − (1/|P|) Σ_j ΔW_j = [B_e | −B_1/|P| | …] [A_e; A_1; …]``:
    the shared component (what every expert learned, "general knowledge") leaves the update, so the
    prototype is the direction the expert changes *differently* from the others.

    Args:
        pool: one ``module -> LowRank`` mapping per expert.

    Returns:
        The residual updates, one mapping per expert (a module only one expert adapts keeps that
        expert's update: there is nothing to subtract it from).
    """
    out: list[Deltas] = [{} for _ in pool]
    for module in sorted(set().union(*(d.keys() for d in pool))):
        present = [(i, d[module]) for i, d in enumerate(pool) if module in d and d[module].rank > 0]
        if len(present) == 1:
            out[present[0][0]][module] = present[0][1]
        if len(present) < 2:
            continue
        A_all = torch.cat([f.A for _, f in present])
        B_all = torch.cat([f.B for _, f in present], dim=1) / len(present)
        for i, f in present:
            out[i][module] = LowRank(torch.cat([f.A, A_all]), torch.cat([f.B, -B_all], dim=1))
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


class ArrowLinear(StackedLoRALinear):
    """A frozen ``nn.Linear`` plus the Arrow-routed fused update of all experts (a per-token
    :class:`~adapterfuse.surgery.StackedLoRALinear`).

    Args:
        base: the base linear layer (shared, never changed).
        factors: one update per expert (``None`` where an expert lacks this module).
        prototypes: ``[E, in]`` (see :func:`arrow_prototypes`).
        top_k: experts per token.
        temperature: this layer's softmax temperature.

    Attributes:
        fused: ``True`` (default) runs the rank-``R`` fused form; ``False`` the per-expert reference.
    """

    def __init__(
        self,
        base: nn.Linear,
        factors: Sequence[LowRank | None],
        prototypes: torch.Tensor,
        top_k: int,
        temperature: float,
    ) -> None:
        stacked, slots = slot_factors(factors)
        device = base.weight.device
        super().__init__(base, stacked.A.to(device), stacked.B.to(device), slots.to(device), weighting="token")
        self.top_k, self.temperature, self.fused = top_k, float(temperature), True
        self.register_buffer("prototypes", prototypes.float().to(device), persistent=False)
        self.ranks = [(e, f.rank) for e, f in enumerate(factors) if f is not None and f.rank > 0]

    def mix_weights(self, h: torch.Tensor) -> torch.Tensor:
        """Each token's routing weights, ``[tokens, E]``, from its input (``h``: ``[tokens, in]``).

        The routing decision is fp32 (a top-k on bf16 cosines would tie often); the low-rank part runs in
        the autocast dtype under autocast, as PEFT's LoRA layers do, and in fp32 otherwise.
        """
        with torch.autocast(device_type=h.device.type, enabled=False):
            return routing_weights(h.float(), self.prototypes, self.top_k, self.temperature)

    def mix(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The fused rank-``R`` update, or with ``fused`` off the same sum expert by expert."""
        return super().mix(h, w) if self.fused else self._reference(h, w)

    def _reference(self, flat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The same sum computed expert by expert (for tests and the benchmark)."""
        out = torch.zeros(flat.shape[0], self.B.shape[0], dtype=flat.dtype, device=flat.device)
        start = 0
        for e, r in self.ranks:
            a, b = self.A[start : start + r], self.B[:, start : start + r]
            part = (flat @ a.T) @ b.T
            out = out + w[:, e : e + 1].to(part.dtype) * part
            start += r
        return out


def layer_temperature(temperature: float | Mapping[str, float], module: str) -> float:
    """A module's temperature: one number for all, or a mapping by module name (``"default"`` otherwise).

    Raises:
        ConfigError: a missing or non-positive temperature.
    """
    t = (
        temperature
        if not isinstance(temperature, Mapping)
        else temperature.get(module, temperature.get("default", 1.0))
    )
    if not float(t) > 0:
        raise ConfigError(f"temperature of {module!r}: expected > 0, got {t}")
    return float(t)


@dataclass(frozen=True)
class ArrowSpec:
    """How Arrow routes (what a saved Arrow predictor records as its router's config).

    Attributes:
        top_k: experts per token.
        temperature: softmax temperature, one number or per module name (``"default"`` for the rest).
        seed: seed of the power iteration that computes the prototypes.
        subtract_mean: compute each prototype from the expert's update minus the experts' mean
            (:func:`mean_subtracted`; GenKnowSub, https://arxiv.org/abs/2505.10939). The update applied is
            unchanged: with weights summing to 1, mean + Σ w_e (ΔW_e − mean) = Σ w_e ΔW_e.
    """

    top_k: int = 1
    temperature: float | Mapping[str, float] = 1.0
    seed: int = 0
    subtract_mean: bool = False


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

    def __init__(
        self,
        model: nn.Module,
        pool: Sequence[Deltas],
        top_k: int = 1,
        temperature: float | Mapping[str, float] = 1.0,
        prototypes: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
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
        shape = next(f.shape for f in factors if f is not None)
        return replace_linear(
            self.model,
            module,
            lambda target: ArrowLinear(target, factors, self.prototypes[module], top_k, temperature),
            shape,
        )

    def set_fused(self, fused: bool) -> None:
        """Switch every layer between the fused form and the per-expert reference."""
        for layer in self.layers.values():
            layer.fused = fused
