"""LoRA algebra: every adapter as per-module low-rank updates ΔW = B·A.

A LoRA module's update is ``scale · B @ A``; an AdaLoRA module's is ``scale/ranknum · B @ (A ⊙ E)``.
Both are folded here into one form, :class:`LowRank`, whose ``B @ A`` *is* ΔW (the scale is folded
into ``B``), so everything downstream (merging, ensembling, routing) works on ΔW exactly and never
has to know which adapter type it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adapterfuse.adapter_config import AdapterConfig, read_adapter_config
from adapterfuse.errors import ExpertError
from adapterfuse.serving import slot_rank

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LowRank:
    """One module's update ΔW = B @ A, in the ``nn.Linear`` orientation ``[out, in]``.

    Attributes:
        A: ``[r, in]`` factor.
        B: ``[out, r]`` factor, with the adapter's scale already folded in.
    """

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        """The number of rank-one terms (rows of A)."""
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of ΔW, ``(out, in)``."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Form ΔW explicitly (for references, tests and non-linear merges)."""
        return self.B.to(dtype) @ self.A.to(dtype)

    def to(self, dtype: torch.dtype) -> LowRank:
        """The same update with both factors cast to ``dtype``."""
        return LowRank(self.A.to(dtype), self.B.to(dtype))


Deltas = dict[str, LowRank]
"""Module name (as in the base model, e.g. ``model.layers.0.self_attn.q_proj``) -> its update."""


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A[.weight]`` -> (module, "lora_A")."""
    stem = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    stem = stem.removesuffix(".weight")
    module, _, part = stem.rpartition(".")
    return module, part


# Tensors of the variants that cannot be folded exactly, named so the refusal says which one it is.
_VARIANT_TENSORS = {
    "lora_embedding_A": "LoRA on an embedding",
    "lora_embedding_B": "LoRA on an embedding",
    "lora_magnitude_vector": "DoRA (a magnitude vector)",
    "bias": "lora_bias (a bias on lora_B)",
}


def _refuse_variants(state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    """Name the variant a tensor belongs to (embedding LoRA, DoRA, lora_bias) before anything else is said."""
    for key in state_dict:
        module, part = _split_key(key)
        variant = _VARIANT_TENSORS.get(part) if part != "bias" or module.endswith(".lora_B") else None
        variant = variant or _VARIANT_TENSORS.get(module.rpartition(".")[2])
        if variant:
            raise ExpertError(
                f"expert {name!r}: tensor {key!r} belongs to {variant}, which cannot be folded into ΔW "
                "exactly; expected a plain LoRA or AdaLoRA adapter on linear modules"
            )


def _group(state_dict: Mapping[str, torch.Tensor], name: str) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors by module and part; refuses any tensor that is not a floating LoRA/AdaLoRA factor."""
    _refuse_variants(state_dict, name)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, part = _split_key(key)
        if part not in ("lora_A", "lora_B", "lora_E"):
            raise ExpertError(
                f"expert {name!r}: unexpected tensor {key!r}; expected only lora_A, lora_B (and lora_E "
                "for AdaLoRA) tensors of linear modules"
            )
        if not tensor.is_floating_point():
            raise ExpertError(
                f"expert {name!r}: tensor {key!r} has dtype {tensor.dtype}, expected a floating-point "
                "factor; re-save the adapter with PEFT"
            )
        parts.setdefault(module, {})[part] = tensor.detach().to(torch.float32)
    return parts


def _check_shapes(module: str, got: dict[str, torch.Tensor], spec: AdapterConfig) -> None:
    """The factors' shapes must agree with each other and with the rank PEFT resolves for the module."""
    name = spec.name
    need = ("lora_A", "lora_B", "lora_E") if spec.peft_type == "ADALORA" else ("lora_A", "lora_B")
    missing = [p for p in need if p not in got]
    if missing:
        raise ExpertError(
            f"expert {name!r}: module {module!r} has {sorted(got)}, expected {list(need)}; "
            "the adapter file is incomplete"
        )
    r = spec.rank(module)
    wants = {"lora_A": (r, None), "lora_B": (None, r)}
    if spec.peft_type == "ADALORA":
        wants["lora_E"] = (r, 1)
    for part, want in wants.items():
        shape = tuple(got[part].shape)
        fits = len(shape) == 2 and all(w is None or w == s for w, s in zip(want, shape, strict=True))
        if not fits:
            shown = ", ".join("*" if w is None else str(w) for w in want)
            raise ExpertError(
                f"expert {name!r}: module {module!r}: {part} has shape {list(shape)}, expected [{shown}] "
                f"for the rank {r} that adapter_config.json gives this module; fix r/rank_pattern or "
                "re-save the adapter with PEFT"
            )


def deltas_from_peft(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], name: str = "adapter"
) -> Deltas:
    """Fold a saved PEFT LoRA or AdaLoRA adapter into per-module ΔW factors, in fp32, exactly as PEFT scales it.

    The config is read by :func:`~adapterfuse.adapter_config.read_adapter_config` (PEFT's own pattern
    matching, rsLoRA, ``lora_alpha = 0``, AdaLoRA budgets); every module's factors must have the rank
    PEFT resolves for it, and every module must be one the config targets.

    Args:
        state_dict: the adapter's tensors as saved by PEFT (``adapter_model.safetensors``).
        config: its ``adapter_config.json`` as a dict.
        name: the adapter's name, used in error messages.

    Returns:
        Module name -> :class:`LowRank` with ``B @ A == ΔW``. AdaLoRA ranks pruned to zero
        (``E == 0``) are dropped, so each module keeps only its allocated rank.

    Raises:
        ExpertError: an unsupported adapter type or variant (DoRA, embeddings, ``lora_bias``, other PEFT
            methods), a bad config field, a module the config does not target, or factors that are missing,
            not floating point, or of another shape than the resolved rank.
    """
    spec = read_adapter_config(config, name)
    parts = _group(state_dict, name)
    # fan_in_fan_out (Conv1D bases) only transposes the *base* weight; lora_A is [r, in] and lora_B
    # [out, r] either way, so B @ A is ΔW in the nn.Linear orientation for every base.
    deltas: Deltas = {}
    for module in sorted(parts):
        if spec.targets(module) is False:
            raise ExpertError(
                f"expert {name!r}: has tensors for module {module!r}, which target_modules "
                f"{_shown(spec.peft.target_modules)} does not cover; expected tensors only for targeted "
                "modules (add it to target_modules or remove its tensors)"
            )
        got = parts[module]
        _check_shapes(module, got, spec)
        A, B = got["lora_A"], got["lora_B"]
        if spec.peft_type == "ADALORA":
            E = got["lora_E"]
            keep = E.flatten() != 0
            A, B = (A * E)[keep], B[:, keep] * spec.scale(module)
        else:
            B = B * spec.scale(module)
        deltas[module] = LowRank(A.contiguous(), B.contiguous())
    return deltas


def _shown(target: Any) -> str:
    return repr(sorted(target)) if isinstance(target, (set, list, tuple)) else repr(target)


def peft_from_deltas(
    deltas: Mapping[str, LowRank],
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Write per-module ΔW factors as a plain PEFT LoRA adapter that ``PeftModel`` loads.

    Each module keeps its own rank through ``rank_pattern``; ``alpha_pattern`` makes every scale 1,
    so the saved ``B @ A`` is ΔW exactly. ``r`` is the smallest rank vLLM accepts as ``--max-lora-rank``
    that holds every module's rank (:func:`adapterfuse.serving.slot_rank`), with ``lora_alpha = r``: vLLM
    reads only ``r`` and ``lora_alpha``, and applies their scale 1 to every module, which is PEFT's scale
    too. Modules of rank 0 are left out.

    Args:
        deltas: module name -> update.
        base_model_name_or_path: recorded in the config, as PEFT does.
        dtype: the dtype of the saved factors.

    Returns:
        ``(state_dict, adapter_config)`` ready for ``safetensors.torch.save_file`` and JSON.

    Raises:
        ExpertError: if no module has a non-zero rank.
    """
    kept = {m: d for m, d in sorted(deltas.items()) if d.rank > 0}
    if not kept:
        raise ExpertError("the adapter to write has no module of rank > 0; nothing to save")
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, d in kept.items():
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = d.A.to(dtype).contiguous()
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = d.B.to(dtype).contiguous()
        ranks[module] = d.rank
    default_r = slot_rank(max(ranks.values()))
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": default_r,
        "lora_alpha": default_r,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(kept),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "rank_pattern": {m: r for m, r in ranks.items() if r != default_r},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != default_r},
        "inference_mode": True,
    }
    return state, config


def module_names(state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    """The modules a saved adapter has tensors for (named as in the base model)."""
    return {_split_key(key)[0] for key in state_dict}
