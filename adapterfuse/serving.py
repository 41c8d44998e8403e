"""Whether vLLM can serve a PEFT LoRA folder as written, by vLLM's own loading rules.

vLLM reads ``r``, ``lora_alpha`` and ``target_modules`` (all required), refuses DoRA and
``modules_to_save``, validates ``r`` against ``--max-lora-rank`` (one of :data:`VLLM_MAX_LORA_RANKS`), copies
every module into a slot of that rank, and applies **one** scale, ``lora_alpha / r`` (``/ sqrt(r)`` with
rsLoRA), to every module: it ignores ``rank_pattern`` and ``alpha_pattern``. So a folder is servable when each
module's rank fits the slot and the scale PEFT gives it (patterns included) is that one scale, and when
every adapted module is one vLLM supports for the base's architecture.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterfuse.errors import ConfigError

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (``MaxLoRARanks`` in ``vllm/config/lora.py``)."""

_LLAMA_LIKE = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_LORA_MODULES: dict[str, frozenset[str]] = {
    **dict.fromkeys(
        (
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "GemmaForCausalLM",
            "Gemma2ForCausalLM",
            "GraniteForCausalLM",
        ),
        _LLAMA_LIKE,
    ),
    "Phi3ForCausalLM": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
}
"""Architecture -> the module names vLLM applies LoRA to (its packed ``qkv_proj`` / ``gate_up_proj`` unpacked
into the names PEFT adapters use)."""

KNOWN_BASES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "LlamaForCausalLM"}
"""Bases whose architecture is known without their config on disk (the default base is read from a GGUF file)."""

_PREFIX = "base_model.model."


def slot_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``--max-lora-rank`` that holds ``rank`` (``rank`` itself above 512)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), rank)


@dataclass
class ServingReport:
    """What :func:`check_serving` found.

    Attributes:
        folder: the adapter folder.
        architecture: the base's architecture, if known.
        r: the config's ``r``.
        max_lora_rank: the slot checked against (given, or the smallest vLLM rank holding ``r``).
        ranks: module -> rank of its saved factors.
        problems: one line per rule broken; empty when vLLM can serve the folder as written.
        notes: what could not be checked.
    """

    folder: Path
    architecture: str | None
    r: int | None
    max_lora_rank: int | None
    ranks: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no rule is broken."""
        return not self.problems


def _peft_scale(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """PEFT's rank and scale of one module, resolving patterns with PEFT's own ``get_pattern_key``."""
    from peft.utils.other import get_pattern_key  # lazy: PEFT's import is slow and only this needs it

    patterns = (config.get("rank_pattern") or {}, config.get("alpha_pattern") or {})
    r = int(patterns[0].get(get_pattern_key(list(patterns[0]), module), config["r"]))
    alpha = float(patterns[1].get(get_pattern_key(list(patterns[1]), module), config["lora_alpha"]))
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def _feature_problems(config: Mapping[str, Any]) -> list[str]:
    """The config-level rules: required fields, and the features vLLM refuses."""
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    out = [f"adapter_config.json: missing required field(s) {missing}; vLLM cannot read the adapter"] if missing else []
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        out.append(f"peft_type: expected LORA, got {peft_type}; fold it to a LoRA first (adapterfuse merge of one)")
    if config.get("use_dora"):
        out.append("use_dora: true; vLLM does not serve DoRA adapters (merge them into the base instead)")
    if config.get("modules_to_save"):
        out.append(f"modules_to_save: {config['modules_to_save']}; vLLM only supports modules_to_save being None")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        out.append(f"bias: {config.get('bias')!r}, lora_bias: {config.get('lora_bias')!r}; vLLM expects no bias")
    return out


def _module_problems(report: ServingReport, config: Mapping[str, Any], shapes: Mapping[str, list[int]]) -> None:
    """The per-module rules: tensor names, supported modules, rank within ``r`` and the slot, one scale."""
    supported = VLLM_LORA_MODULES.get(report.architecture or "")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    one_scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    for key, shape in sorted(shapes.items()):
        stem = key.removeprefix(_PREFIX).removesuffix(".weight")
        module, _, part = stem.rpartition(".")
        if part not in ("lora_A", "lora_B"):
            report.problems.append(f"tensor {key!r}: expected only lora_A and lora_B weights, got {part!r}")
        elif part == "lora_A":
            report.ranks[module] = int(shape[0])
    for module, rank in report.ranks.items():
        name = module.rsplit(".", 1)[-1]
        if supported is not None and name not in supported:
            report.problems.append(
                f"module {module!r}: vLLM applies LoRA to {sorted(supported)} on {report.architecture}, not {name!r}"
            )
        peft_r, peft_scale = _peft_scale(config, module)
        if peft_r != rank:
            report.problems.append(f"module {module!r}: lora_A has rank {rank} but the config resolves r={peft_r}")
        if rank > r or (report.max_lora_rank is not None and rank > report.max_lora_rank):
            report.problems.append(
                f"module {module!r}: rank {rank} exceeds r={r} (slot {report.max_lora_rank}); vLLM validates only "
                "r and then cannot copy this module into its slot; write r >= every module's rank"
            )
        if not math.isclose(peft_scale, one_scale, rel_tol=1e-6):
            report.problems.append(
                f"module {module!r}: PEFT scales it by {peft_scale:g}, vLLM by lora_alpha/r = {one_scale:g}; "
                "give every module the same scale (alpha_pattern)"
            )


def _architecture(config: Mapping[str, Any]) -> str | None:
    """The base's architecture from its config, when the base is a local folder or in the Hub cache."""
    spec = config.get("base_model_name_or_path")
    if not spec or spec in KNOWN_BASES:
        return KNOWN_BASES.get(spec or "")
    try:
        from transformers import AutoConfig

        archs = AutoConfig.from_pretrained(spec, local_files_only=True).architectures or []
    except (OSError, ValueError):
        return None
    return archs[0] if archs else None


def check_serving(
    folder: str | Path, max_lora_rank: int | None = None, architecture: str | None = None
) -> ServingReport:
    """Check a PEFT LoRA folder against vLLM's loading rules (see the module docstring).

    Args:
        folder: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        max_lora_rank: the ``--max-lora-rank`` vLLM will run with (default: the smallest it accepts that holds
            ``r``).
        architecture: the base's architecture, e.g. ``LlamaForCausalLM`` (default: read from the base's config
            when it is available offline; otherwise module names are not checked and a note says so).

    Returns:
        The report; ``report.ok`` when vLLM can serve the folder as written.

    Raises:
        ConfigError: a folder without the two files, an unreadable config, or a ``max_lora_rank`` vLLM refuses.
    """
    from safetensors import safe_open  # lazy: only the check reads tensor shapes

    path = Path(folder)
    files = [path / "adapter_config.json", path / "adapter_model.safetensors"]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ConfigError(f"{path}: missing {absent}; expected a PEFT LoRA adapter folder (adapterfuse merge --out)")
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise ConfigError(f"max_lora_rank: expected one of {list(VLLM_MAX_LORA_RANKS)} (vLLM's), got {max_lora_rank}")
    try:
        config = json.loads(files[0].read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{files[0]}: not readable JSON ({e}); rewrite the adapter config") from None
    report = ServingReport(path, architecture or _architecture(config), config.get("r"), max_lora_rank)
    report.problems += _feature_problems(config)
    if report.architecture not in VLLM_LORA_MODULES:
        report.notes.append(f"architecture {report.architecture or 'unknown'}: module names not checked")
    if "r" not in config or "lora_alpha" not in config:
        return report
    if report.max_lora_rank is None:
        report.max_lora_rank = slot_rank(int(config["r"]))
    if int(config["r"]) > report.max_lora_rank:
        report.problems.append(f"r: {config['r']} exceeds max_lora_rank {report.max_lora_rank}; vLLM refuses it")
    with safe_open(str(files[1]), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    _module_problems(report, config, shapes)
    return report
