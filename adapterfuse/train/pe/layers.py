"""Trainable LoRA layers whose batch rows belong to K members, and the maths shared by every kind.

A module is adapted in one of three modes:

- ``shared``: one LoRA ``(A [r, in], B [out, r])`` for every row (MIMO, SWAG, CAMERO's bottom layers);
- ``batchensemble``: the shared ``A``, ``B`` plus per-member rank-1 vectors ``r [K, in]``, ``s [K, out]``;
  member ``k``'s update is ``s_k ⊙ (B·A·(r_k ⊙ x))``, i.e. a LoRA with ``A_k = A·diag(r_k)`` and
  ``B_k = diag(s_k)·B``;
- ``independent``: member ``k`` has its own ``A_k``, ``B_k`` (CAMERO's top layers).

As in :mod:`adapterfuse.backends.ensemble.batched`, rows are member-contiguous: with K members the batch holds
``K*n`` rows and rows ``k*n .. (k+1)*n - 1`` belong to member ``k``. The factors are fp32 parameters.
Under autocast the low-rank matmuls run in the autocast dtype, as PEFT's LoRA layers do, so a
parameter-efficient ensemble and the plain LoRA it is measured against pay the same per matmul;
without autocast everything is fp32 and matches PEFT exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapterfuse.delta import Deltas, LowRank
from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.surgery import blockwise_lowrank, linear_modules, replace_linear

MODES = ("shared", "batchensemble", "independent")
Tensors = dict[str, torch.Tensor]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(module: str) -> int | None:
    """The decoder layer a module belongs to (``model.layers.3.mlp.up_proj`` -> 3), or ``None``."""
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


def target_modules(model: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """The decoder's linear modules whose last name part is in ``suffixes``.

    Raises:
        ConfigError: if none matches.
    """
    names = linear_modules(model, tuple(suffixes))
    if not names:
        raise ConfigError(
            f"target_modules {list(suffixes)}: no linear module of the base matches; expected "
            "names such as q_proj, v_proj"
        )
    return names


class MemberLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update in one of :data:`MODES`.

    Args:
        base: the frozen linear layer (shared, never changed).
        mode: ``shared``, ``batchensemble`` or ``independent``.
        k: the number of members (the rows are ``k`` contiguous blocks unless ``mode`` is ``shared``).
        rank: the LoRA rank.
        scale: ``alpha / rank``, applied to ``B·A``.
        dropout: dropout on the layer input of the low-rank path while training (as PEFT's ``lora_dropout``).
        generator: the seeded generator ``A`` is drawn from (``B`` starts at zero, as in LoRA).
    """

    def __init__(
        self, base: nn.Linear, mode: str, k: int, rank: int, scale: float, dropout: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        self.base, self.mode, self.k, self.scale, self.dropout = base, mode, k, scale, dropout
        out_dim, in_dim = base.weight.shape
        lead = (k,) if mode == "independent" else ()
        bound = 1.0 / math.sqrt(in_dim)  # PEFT's kaiming_uniform(a=sqrt(5)) bound for lora_A
        self.A = nn.Parameter(torch.rand(*lead, rank, in_dim, generator=generator) * 2 * bound - bound)
        self.B = nn.Parameter(torch.zeros(*lead, out_dim, rank))
        if mode == "batchensemble":
            self.r = nn.Parameter(torch.ones(k, in_dim))
            self.s = nn.Parameter(torch.ones(k, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus each row's member update; ``x`` is ``[rows, ..., in]``."""
        y = self.base(x)
        # Without autocast a bf16-loaded base's input is cast up to the fp32 factors; under autocast the
        # matmuls below run in bf16 (PEFT's choice), an fp32 detour measured slower than K PEFT passes.
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.A.dtype)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, training=True)
        if self.mode == "shared":
            low = (h @ self.A.T) @ self.B.T
        else:
            if self.mode == "independent":
                low = blockwise_lowrank(h, self.A, self.B)
            else:
                if x.shape[0] % self.k:
                    raise ConfigError(
                        f"member forward: {x.shape[0]} rows is not a multiple of K={self.k}; "
                        "expected member-contiguous rows"
                    )
                h = h.reshape(self.k, -1, h.shape[-1])
                low = ((h * self.r[:, None, :]) @ self.A.T) @ self.B.T * self.s[:, None, :]
        return y + (low * self.scale).reshape(y.shape).to(y.dtype)

    def tensors(self) -> Tensors:
        """The trainable tensors by short name (``A``, ``B``, and ``r``, ``s`` for BatchEnsemble)."""
        return {n: p for n, p in self.named_parameters(recurse=False)}


def member_factors(mode: str, tensors: Mapping[str, torch.Tensor], k: int, scale: float) -> list[LowRank]:
    """Each member's update of one module as an ordinary LoRA factor pair (scale folded into ``B``).

    Args:
        mode: the module's mode.
        tensors: its ``A``, ``B`` (and ``r``, ``s``) as trained.
        k: the number of members.
        scale: ``alpha / rank``.

    Returns:
        ``k`` :class:`LowRank` with ``B_k @ A_k`` equal to member ``k``'s ΔW (BatchEnsemble:
        ``A_k = A·diag(r_k)``, ``B_k = diag(s_k)·B``).
    """
    A, B = tensors["A"].detach().float(), tensors["B"].detach().float() * scale
    if mode == "shared":
        return [LowRank(A.clone(), B.clone()) for _ in range(k)]
    if mode == "independent":
        return [LowRank(A[i].clone(), B[i].clone()) for i in range(k)]
    r, s = tensors["r"].detach().float(), tensors["s"].detach().float()
    return [LowRank((A * r[i][None, :]).contiguous(), (s[i][:, None] * B).contiguous()) for i in range(k)]


def member_deltas(layout: Mapping[str, str], tensors: Mapping[str, torch.Tensor], k: int, scale: float) -> list[Deltas]:
    """Every member as ``module -> LowRank`` from flat tensors named ``<module>.<A|B|r|s>``.

    Raises:
        CompatibilityError: a tensor the layout needs is missing.
    """
    out: list[Deltas] = [{} for _ in range(k)]
    for module, mode in sorted(layout.items()):
        names = ("A", "B", "r", "s") if mode == "batchensemble" else ("A", "B")
        missing = [f"{module}.{n}" for n in names if f"{module}.{n}" not in tensors]
        if missing:
            raise CompatibilityError(
                f"module {module!r}: tensors {missing} missing; the saved weights do not "
                "match the layout in the manifest"
            )
        for i, d in enumerate(member_factors(mode, {n: tensors[f"{module}.{n}"] for n in names}, k, scale)):
            out[i][module] = d
    return out


def install(
    model: nn.Module, layout: Mapping[str, str], k: int, rank: int, scale: float, dropout: float, seed: int
) -> dict[str, MemberLoRALinear]:
    """Swap every module of ``layout`` for a :class:`MemberLoRALinear` of its mode (seeded init).

    Args:
        model: a private copy of the base (modified in place).
        layout: module name -> mode.
        k, rank, scale, dropout: see :class:`MemberLoRALinear`.
        seed: the seed of the factors' initialisation.

    Returns:
        Module name -> the installed layer, in sorted order.

    Raises:
        CompatibilityError: a module missing or not ``nn.Linear``.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    layers: dict[str, MemberLoRALinear] = {}
    for module in sorted(layout):
        layers[module] = replace_linear(
            model,
            module,
            lambda target, mode=layout[module]: MemberLoRALinear(target, mode, k, rank, scale, dropout, gen).to(device),
        )
    return layers


def flat_tensors(layers: Mapping[str, MemberLoRALinear]) -> Tensors:
    """The installed layers' trainable tensors as ``<module>.<name>`` (detached fp32 copies)."""
    return {
        f"{m}.{n}": t.detach().float().clone().contiguous()
        for m, layer in layers.items()
        for n, t in layer.tensors().items()
    }


@torch.no_grad()
def load_flat(layers: Mapping[str, MemberLoRALinear], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``<module>.<name>`` tensors into the installed layers (shapes must match)."""
    for m, layer in layers.items():
        for n, p in layer.tensors().items():
            p.copy_(tensors[f"{m}.{n}"])


def trained_params(layers: Mapping[str, MemberLoRALinear]) -> int:
    """The number of trained parameters."""
    return sum(p.numel() for layer in layers.values() for p in layer.tensors().values())
