"""Model surgery: the base's linear modules by name, a weight-sharing copy, and low-rank layers installed in it.

Every way of running several low-rank updates over one frozen base works the same way: a copy of the
module tree that shares every weight with the base (:func:`shared_copy`: no second base in memory,
the caller's model untouched), in which chosen ``nn.Linear`` modules are swapped by name for layers
that add updates to the frozen linear's output (:func:`replace_linear`). The layer that adds K
members' updates at once is :class:`StackedLoRALinear`; its three weightings cover a batch whose row
blocks belong to one member each (an ensemble), a per-row linear merge (a router's weights per input)
and a per-token one (Arrow). The factors are set up once; nothing is merged into or out of a base
weight per batch.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Literal, TypeVar

import torch
from torch import nn

from adapterfuse.errors import CompatibilityError, ConfigError

Weighting = Literal["member", "row", "token"]
WEIGHTINGS: tuple[Weighting, ...] = ("member", "row", "token")
Layer = TypeVar("Layer", bound=nn.Module)


def linear_modules(model: nn.Module, suffixes: Sequence[str] | None = None) -> list[str]:
    """Names of the decoder's ``nn.Linear`` modules (the LM head excluded), optionally by name suffix.

    Args:
        model: a causal LM.
        suffixes: keep only modules whose last name part is one of these (e.g. ``("q_proj", "v_proj")``).

    Returns:
        The module names, in model order.
    """
    head = model.get_output_embeddings()
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head and (suffixes is None or name.rpartition(".")[2] in suffixes)
    ]


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``.

    The copy's modules can be swapped freely without touching the caller's model, and no weight is
    duplicated (the base is frozen, so sharing is safe).

    Args:
        model: the module to copy.

    Returns:
        The copy (its tensors are ``model``'s own).
    """
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def replace_linear(
    model: nn.Module, module: str, build: Callable[[nn.Linear], Layer], shape: tuple[int, int] | None = None
) -> Layer:
    """Swap the ``nn.Linear`` named ``module`` for ``build(that_linear)``.

    Args:
        model: the model to change in place (normally a :func:`shared_copy`).
        module: the dotted module name, e.g. ``model.layers.0.self_attn.q_proj``.
        build: makes the new layer from the linear it replaces (which it normally wraps).
        shape: the update's ``(out, in)``; checked against the linear's weight when given.

    Returns:
        The new layer, now in ``model``.

    Raises:
        CompatibilityError: the module does not exist, is not ``nn.Linear``, or has another shape.
    """
    try:
        target = model.get_submodule(module)
    except AttributeError:
        raise CompatibilityError(
            f"module {module!r}: not found in the base model; expected a linear module of "
            "this base (adapters trained on it)"
        ) from None
    if not isinstance(target, nn.Linear):
        raise CompatibilityError(
            f"module {module!r}: is a {type(target).__name__}, expected nn.Linear; only linear layers are adapted"
        )
    if shape is not None and tuple(target.weight.shape) != tuple(shape):
        raise CompatibilityError(
            f"module {module!r}: base weight is {tuple(target.weight.shape)}, the update's ΔW "
            f"is {tuple(shape)}; expected adapters trained on this base"
        )
    layer = build(target)
    model.set_submodule(module, layer)
    return layer


def blockwise_lowrank(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Each of K contiguous row blocks through its own low-rank update: ``h_k A_kᵀ B_kᵀ``.

    Two batched matmuls over all members; no loop, gather or scatter.

    Args:
        h: ``[K*n, ..., in]`` inputs, rows ``k*n .. (k+1)*n - 1`` belonging to member ``k``.
        A: ``[K, r, in]``.
        B: ``[K, out, r]``.

    Returns:
        ``[K, n*..., out]``.

    Raises:
        ConfigError: if the rows are not a multiple of K.
    """
    k = int(A.shape[0])
    if h.shape[0] % k:
        raise ConfigError(
            f"stacked forward: {h.shape[0]} rows is not a multiple of K={k} members; expected "
            "member-contiguous rows (the batch replicated once per member)"
        )
    h = h.reshape(k, -1, h.shape[-1])
    return torch.bmm(torch.bmm(h, A.transpose(1, 2)), B.transpose(1, 2))


class StackedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus the low-rank updates of K members, weighted per member, per row or per token.

    - ``"member"``: the batch is K contiguous blocks of rows and block ``k`` gets member ``k``'s update
      (:func:`blockwise_lowrank`). ``A`` is ``[K, r, in]``, ``B`` ``[K, out, r]`` (ranks zero-padded,
      see :func:`adapterfuse.lowrank.stack_members`).
    - ``"row"``: each batch row gets ``Σ_k w[row, k] ΔW_k``, at weights set in :attr:`weights` before the
      pass. ``A`` is ``[R, in]`` and ``B`` ``[out, R]``, the members' factors concatenated along the rank
      axis, and ``slots`` ``[R]`` the member of each rank slot (:func:`adapterfuse.lowrank.slot_factors`):
      the weights scale the rank-space activations slot by slot, so all members cost two matmuls.
    - ``"token"``: as ``"row"``, with each token's weights from :meth:`mix_weights` (a router overrides it).

    Under autocast the low-rank matmuls run in the autocast dtype, as PEFT's LoRA layers do (an fp32 detour,
    casting every activation up and back, measured slower than K separate PEFT passes); without autocast,
    or with ``fp32``, they run in fp32.

    Args:
        base: the base linear layer (its weights are shared, never changed).
        A: the ``A`` factors (fp32; shape by weighting, above).
        B: the ``B`` factors, scale folded in.
        slots: ``[R]`` the member of each rank slot (``"row"`` and ``"token"`` only).
        weighting: ``"member"``, ``"row"`` or ``"token"``.
        fp32: compute the low-rank part in fp32 even under autocast.

    Attributes:
        weights: ``[n, K]`` the rows' weights for ``"row"``; ``None`` until set.
        dropout: ``"member"`` only: the probability of zeroing each input of the low-rank part (test-time
            dropout, one mask per row); 0 (the default) leaves the layer deterministic.
        generator: the random generator of those masks (seeded by the caller).

    Raises:
        ConfigError: an unknown weighting, or ``slots`` missing for a weighted layer.
    """

    def __init__(
        self,
        base: nn.Linear,
        A: torch.Tensor,
        B: torch.Tensor,
        slots: torch.Tensor | None = None,
        weighting: Weighting = "member",
        fp32: bool = False,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting {weighting!r}: unknown; expected one of {', '.join(WEIGHTINGS)}")
        if weighting != "member" and slots is None:
            raise ConfigError(f"weighting {weighting!r}: expected the rank slots' members (slots), got None")
        self.base, self.weighting, self.fp32 = base, weighting, fp32
        # Buffers, not parameters: they move with .to() but are never trained or saved with the model.
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("slots", slots, persistent=False)
        self.weights: torch.Tensor | None = None
        # Test-time dropout on the low-rank input ("member" weighting): off unless an MC-dropout predictor sets it.
        self.dropout: float = 0.0
        self.generator: torch.Generator | None = None

    @property
    def k(self) -> int:
        """The number of members of a ``"member"`` layer (the leading axis of ``A``)."""
        return int(self.A.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus each row's (or token's) update; ``x`` is ``[rows, ..., in]``."""
        y = self.base(x)  # one matmul for every row (bf16 under autocast)
        context = torch.autocast(device_type=x.device.type, enabled=False) if self.fp32 else nullcontext()
        with context:
            if self.weighting == "member":
                h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.A.dtype)
                if self.dropout:  # MC-dropout: each row's own mask on the adapter's input, as PEFT's lora_dropout
                    keep = 1.0 - self.dropout
                    h = h * torch.empty_like(h).bernoulli_(keep, generator=self.generator).div_(keep)
                low = blockwise_lowrank(h, self.A, self.B)
            else:
                # [n, T, in] for weights per row, [n*T, in] for weights per token
                h = x.reshape(x.shape[0], -1, x.shape[-1]) if self.weighting == "row" else x.reshape(-1, x.shape[-1])
                w = self.mix_weights(h)
                if not torch.is_autocast_enabled(x.device.type):
                    h = h.to(self.A.dtype)  # e.g. a bf16-loaded base without autocast: the factors stay fp32
                low = self.mix(h, w)
        return y + low.view(y.shape).to(y.dtype)

    def mix_weights(self, h: torch.Tensor) -> torch.Tensor:
        """The members' weights of each row of ``h`` (``[n, T, in]``), ``[n, K]``: :attr:`weights`.

        Raises:
            ConfigError: the weights are not set, or not one row per batch row.
        """
        if self.weights is None or self.weights.shape[0] != h.shape[0]:
            got = None if self.weights is None else tuple(self.weights.shape)
            raise ConfigError(
                f"row weights: expected one row of member weights per batch row ({h.shape[0]}), got "
                f"{got}; set the layer's weights before the forward pass"
            )
        return self.weights

    def mix(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``Σ_k w[:, k] ΔW_k h`` as one rank-``R`` update: the rank-space activations scaled slot by slot.

        Args:
            h: ``[n, T, in]`` (weights per row) or ``[tokens, in]`` (weights per token).
            w: ``[n, K]`` or ``[tokens, K]``, fp32.

        Returns:
            ``[n, T, out]`` or ``[tokens, out]``.
        """
        a = h @ self.A.T
        scale = w[:, self.slots]
        return (a * (scale.unsqueeze(1) if a.dim() == 3 else scale).to(a.dtype)) @ self.B.T
