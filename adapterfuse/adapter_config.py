"""A PEFT ``adapter_config.json`` read the way PEFT reads it, or refused in one line.

Each field the folding depends on is checked first (type and range, naming the field, the expected and the
actual value), every option that makes the adapter's forward something other than ``x + scale·B·A·x`` on
linear modules is refused by name, and the rest is handed to PEFT's own config class. Ranks, scales and
targets per module then come from PEFT's functions (``get_pattern_key``, ``check_target_module_exists``), so
a regex key in ``rank_pattern`` means here exactly what it means to PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from adapterfuse.errors import ExpertError

PeftType = Literal["LORA", "ADALORA"]
FIX = "re-save the adapter with PEFT, or fix adapter_config.json"

# Options whose non-default value changes what the adapter computes, so ΔW = scale·B·A would be wrong.
_REFUSED: dict[str, str] = {
    "use_dora": "DoRA (use_dora) rescales each column of W + ΔW by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "modules_to_save": "modules_to_save replaces whole modules with trained copies",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "layer_replication": "layer_replication duplicates decoder layers",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) applies the update only after its invocation tokens",
    "use_qalora": "QA-LoRA (use_qalora) pools the input before lora_A",
    "kasa_config": "KaSA (kasa_config) changes the base weight's singular values",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples the update",
    "arrow_config": "Arrow (arrow_config) routes among adapters per token",
    "velora_config": "VeLoRA (velora_config) changes the LoRA layer",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors",
    "target_parameters": "target_parameters puts LoRA on raw parameters, not linear modules",
}
# Initialisations that also change the base weights: the adapter is only right on that changed base
# (PEFT's path_initial_model_for_weight_conversion saves a converted one with init_lora_weights=true).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _fail(name: str, msg: str) -> ExpertError:
    return ExpertError(f"expert {name!r}: adapter_config.json {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _peft_type(config: Mapping[str, Any], name: str) -> PeftType:
    raw = config.get("peft_type", "")
    peft_type = str(getattr(raw, "value", raw)).upper()  # a PeftType enum or its JSON string
    if peft_type not in ("LORA", "ADALORA"):
        raise ExpertError(
            f"expert {name!r}: peft_type must be LORA or ADALORA, got {peft_type!r}; "
            "only LoRA-family adapters can be folded into ΔW"
        )
    return "LORA" if peft_type == "LORA" else "ADALORA"


def _check_rank(config: Mapping[str, Any], field: str, name: str) -> None:
    if field not in config:
        raise _fail(
            name,
            f"has no {field!r}, expected a positive integer (the rank the adapter was trained with; PEFT would "
            f'fall back to its default, which need not be it); add "{field}": N',
        )
    value = config[field]
    if not _is_int(value) or value < 1:
        raise _fail(name, f"field {field!r} is {value!r}, expected a positive integer (the LoRA rank); {FIX}")


def _check_alpha(config: Mapping[str, Any], name: str) -> None:
    if "lora_alpha" not in config:
        raise _fail(name, "has no 'lora_alpha', expected a number >= 0 (the scale's numerator); add it")
    alpha = config["lora_alpha"]
    if not _is_number(alpha):
        raise _fail(name, f"field 'lora_alpha' is {alpha!r}, expected a finite number >= 0; {FIX}")
    if alpha < 0:
        # PEFT would scale by a negative number (LoRA) or by r (AdaLoRA): a sign flip or a silent
        # substitution that no trainer writes, so it is refused rather than guessed.
        raise _fail(
            name,
            f"field 'lora_alpha' is {alpha!r}, expected a number >= 0 (a negative alpha flips or replaces "
            "the update's scale); set the alpha the adapter was trained with",
        )


def _check_patterns(config: Mapping[str, Any], peft_type: PeftType, name: str) -> None:
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise _fail(name, f"field {field!r} is a {type(pattern).__name__}, expected an object; {FIX}")
        for key, value in pattern.items():
            if peft_type == "LORA":
                try:
                    re.compile(key)
                except re.error as e:
                    raise _fail(name, f"{field} key {key!r} is not a regular expression PEFT can match ({e})") from None
            if field == "alpha_pattern":
                ok, want = _is_number(value) and value >= 0, "a finite number >= 0"
            elif peft_type == "LORA":
                ok, want = _is_int(value) and value >= 1, "a positive integer"
            else:
                ok = isinstance(value, list) and all(isinstance(b, (bool, int)) and b in (0, 1) for b in value)
                ok, want = ok and len(value) == config["init_r"], f"a list of init_r={config['init_r']} booleans"
            if not ok:
                raise _fail(name, f"{field}[{key!r}] is {value!r}, expected {want}; {FIX}")


def _check_variants(config: Mapping[str, Any], name: str) -> None:
    for field, why in _REFUSED.items():
        value = config.get(field)
        if value not in (None, False, [], {}, ""):
            raise _fail(
                name,
                f"sets {field}={value!r}: {why}, which cannot be folded into ΔW = scale·B·A exactly; "
                "expected a plain LoRA or AdaLoRA adapter (retrain without it)",
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise _fail(
            name,
            f"sets bias={bias!r}: the adapter also trained the base's biases, which ΔW = scale·B·A does not "
            "carry; expected bias='none' (retrain without it)",
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise _fail(
            name,
            f"sets init_lora_weights={init!r}: that initialisation also changes the base weights, so the "
            "adapter is only right on that changed base; expected a converted adapter (save it with PEFT's "
            "path_initial_model_for_weight_conversion)",
        )


def _peft_config(config: Mapping[str, Any], name: str) -> Any:
    """PEFT's own config object; options this PEFT does not know are refused unless unset."""
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = _peft_type(config, name)
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    active = [k for k in unknown if config[k] not in (None, False, [], {}, "")]
    if active:
        import peft

        raise _fail(
            name,
            f"sets {active[0]}={config[active[0]]!r}, an option PEFT {peft.__version__} does not know (it may "
            "change the forward); expected only PEFT's LoRA/AdaLoRA options; upgrade peft or remove it",
        )
    fields = {k: v for k, v in config.items() if k in known}
    try:
        return PeftConfig.from_peft_type(**fields)
    except Exception as e:  # PEFT's checks raise ValueError, TypeError and others
        raise _fail(name, f"is refused by PEFT's {cls.__name__} ({type(e).__name__}: {e}); {FIX}") from None


@dataclass(frozen=True)
class AdapterConfig:
    """An adapter config checked field by field and read by PEFT's own config class.

    Attributes:
        name: the expert's name (for messages).
        peft_type: ``LORA`` or ``ADALORA``.
        peft: PEFT's ``LoraConfig`` or ``AdaLoraConfig``.
    """

    name: str
    peft_type: PeftType
    peft: Any

    def rank(self, module: str) -> int:
        """The rank PEFT gives ``module``: ``rank_pattern`` (first matching regex key) or ``r``;
        for AdaLoRA the allocated budget (the mask's count) or ``init_r``."""
        if self.peft_type == "ADALORA":
            mask = self._adalora_masks().get(module)
            return self.peft.init_r if mask is None else int(sum(mask))
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(self.peft.rank_pattern.keys(), module)
        return int(self.peft.rank_pattern.get(key, self.peft.r))

    def scale(self, module: str) -> float:
        """The factor PEFT multiplies ``B @ A`` (AdaLoRA: ``B @ (A ⊙ E)``) by for ``module``.

        LoRA: ``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA, per module through the patterns.
        AdaLoRA: ``alpha/(init_r + 1e-5)``, or ``r/(init_r + 1e-5)`` when ``lora_alpha`` is 0, as PEFT does.
        """
        if self.peft_type == "ADALORA":
            alpha = self.peft.lora_alpha
            scaling = alpha if alpha > 0 else float(self.rank(module))
            return scaling / (self.peft.init_r + 1e-5)
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(self.peft.alpha_pattern.keys(), module)
        alpha = self.peft.alpha_pattern.get(key, self.peft.lora_alpha)
        r = self.rank(module)
        return alpha / math.sqrt(r) if self.peft.use_rslora else alpha / r

    def targets(self, module: str) -> bool | None:
        """Whether PEFT would put this adapter on ``module``; ``None`` when the config cannot say
        without the model (``target_modules`` unset or ``all-linear``)."""
        from peft.tuners.tuners_utils import check_target_module_exists

        target = self.peft.target_modules
        if target is None or (isinstance(target, str) and target.lower() == "all-linear"):
            return None
        return bool(check_target_module_exists(self.peft, module))

    def _adalora_masks(self) -> dict[str, list[bool]]:
        """AdaLoRA's ``rank_pattern`` by module (its keys name the ``lora_E`` parameters)."""
        out: dict[str, list[bool]] = {}
        for key, mask in (self.peft.rank_pattern or {}).items():
            parts = key.split(".")
            while parts and parts[-1] in ("default", "lora_E", "lora_A", "lora_B"):
                parts.pop()
            out[".".join(parts)] = list(mask)
        return out


def read_adapter_config(config: Mapping[str, Any], name: str = "adapter") -> AdapterConfig:
    """Check an ``adapter_config.json`` field by field and read it with PEFT's own config class.

    Args:
        config: the config as a dict (or a PEFT config's ``to_dict()``).
        name: the expert's name, used in error messages.

    Returns:
        The checked :class:`AdapterConfig`.

    Raises:
        ExpertError: a peft_type other than LoRA/AdaLoRA; ``r`` (``init_r``) missing or not a positive
            integer; ``lora_alpha`` missing, not a number or negative; a malformed pattern; an option that
            changes the forward (DoRA, ``lora_bias``, ``modules_to_save``, …); or a config PEFT refuses.
    """
    peft_type = _peft_type(config, name)
    _check_rank(config, "r" if peft_type == "LORA" else "init_r", name)
    _check_alpha(config, name)
    if "use_rslora" in config and not isinstance(config["use_rslora"], bool):
        raise _fail(name, f"field 'use_rslora' is {config['use_rslora']!r}, expected true or false; {FIX}")
    _check_patterns(config, peft_type, name)
    _check_variants(config, name)
    return AdapterConfig(name, peft_type, _peft_config(config, name))
