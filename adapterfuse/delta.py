"""LoRA algebra: every adapter as per-module low-rank updates ΔW = B·A.

A LoRA module's update is ``scale · B @ A``; an AdaLoRA module's is ``scale/ranknum · B @ (A ⊙ E)``.
Both are folded here into one form, :class:`LowRank`, whose ``B @ A`` *is* ΔW (the scale is folded
into ``B``), so everything downstream (merging, ensembling, routing) works on ΔW exactly and never
has to know which adapter type it came from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

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


def _module_pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank/alpha patterns: the longest pattern key that the module name ends with wins."""
    if not pattern:
        return default
    hits = [k for k in pattern if module == k or module.endswith("." + k)]
    return pattern[max(hits, key=len)] if hits else default


def lora_scale(config: Mapping[str, Any], module: str) -> float:
    """The scale PEFT applies to ``B @ A`` for one LoRA module.

    Args:
        config: the adapter's ``adapter_config.json`` as a dict.
        module: the module's name inside the base model.

    Returns:
        ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, honouring rank and alpha patterns.
    """
    r = _module_pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _module_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A[.weight]`` -> (module, "lora_A")."""
    stem = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    stem = stem.removesuffix(".weight")
    module, _, part = stem.rpartition(".")
    return module, part


def deltas_from_peft(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], name: str = "adapter"
) -> Deltas:
    """Fold a saved PEFT LoRA or AdaLoRA adapter into per-module ΔW factors, in fp32.

    Args:
        state_dict: the adapter's tensors as saved by PEFT (``adapter_model.safetensors``).
        config: its ``adapter_config.json`` as a dict.
        name: the adapter's name, used in error messages.

    Returns:
        Module name -> :class:`LowRank` with ``B @ A == ΔW``. AdaLoRA ranks pruned to zero
        (``E == 0``) are dropped, so each module keeps only its allocated rank.

    Raises:
        ExpertError: for an unsupported adapter type (DoRA, embeddings, other PEFT methods) or a
            module whose factors are missing or of mismatched shapes.
    """
    raw_type = config.get("peft_type", "")
    peft_type = str(getattr(raw_type, "value", raw_type)).upper()  # a PeftType enum or its JSON string
    if peft_type not in ("LORA", "ADALORA"):
        raise ExpertError(
            f"expert {name!r}: peft_type must be LORA or ADALORA, got {peft_type!r}; "
            "only LoRA-family adapters can be folded into ΔW"
        )
    if config.get("use_dora"):
        raise ExpertError(
            f"expert {name!r}: DoRA adapters are not supported (use_dora=true); "
            "train a plain LoRA or AdaLoRA adapter instead"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, part = _split_key(key)
        if part not in ("lora_A", "lora_B", "lora_E"):
            raise ExpertError(
                f"expert {name!r}: unexpected tensor {key!r}; expected only lora_A, "
                "lora_B (and lora_E for AdaLoRA) tensors of linear modules"
            )
        parts.setdefault(module, {})[part] = tensor.detach().to(torch.float32)
    # fan_in_fan_out (Conv1D bases) only transposes the *base* weight; lora_A is [r, in] and lora_B
    # [out, r] either way, so B @ A is ΔW in the nn.Linear orientation for every base.
    deltas: Deltas = {}
    for module in sorted(parts):
        got = parts[module]
        if "lora_A" not in got or "lora_B" not in got:
            raise ExpertError(
                f"expert {name!r}: module {module!r} has {sorted(got)}, expected both "
                "lora_A and lora_B; the adapter file is incomplete"
            )
        A, B = got["lora_A"], got["lora_B"]
        if peft_type == "ADALORA":
            E = got.get("lora_E")
            if E is None:
                raise ExpertError(f"expert {name!r}: AdaLoRA module {module!r} lacks lora_E")
            keep = E.flatten() != 0
            scale = config["lora_alpha"] / (config["init_r"] + 1e-5)
            A, B = (A * E)[keep], B[:, keep] * scale
        else:
            B = B * lora_scale(config, module)
        if A.shape[0] != B.shape[1]:
            raise ExpertError(
                f"expert {name!r}: module {module!r} has lora_A rank {A.shape[0]} but "
                f"lora_B rank {B.shape[1]}; expected equal ranks"
            )
        deltas[module] = LowRank(A.contiguous(), B.contiguous())
    return deltas


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
