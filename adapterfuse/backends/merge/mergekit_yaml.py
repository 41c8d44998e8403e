"""mergekit's YAML config format as an entry to LoRA merges: the file names adapters, the output is an adapter.

A mergekit config (``merge_method``, ``models`` with per-model ``parameters``, global ``parameters``,
``base_model``, ``dtype``) is read by a frozen pydantic model that refuses unknown keys, then translated
into a :class:`~adapterfuse.backends.merge.config.MergeConfig` and a list of adapters, before any
weight is read. The translation keeps mergekit's meaning where a LoRA merge can express it exactly and
refuses, naming the setting, where it cannot:

- ``linear`` is the weighted mean (``uniform``); with ``normalize: false`` mergekit also scales the
  base weights by the sum of the weights, which an adapter can only express when that sum is 1.
- ``task_arithmetic`` and ``dare_linear`` are λ·Σ wᵢ·ΔWᵢ; ``normalize: true`` divides the weights by
  their sum first, as mergekit does.
- ``ties`` and ``dare_ties`` average the agreeing entries. mergekit divides by the sum of the agreeing
  weights (``normalize: true``) or not at all; adapterfuse divides by their count. The two agree when
  every weight is the same positive number (or with one adapter), so only those configs are taken.
- ``density`` defaults to 1 (nothing dropped), as in mergekit; it is one number for all adapters.
- Values that vary by layer or tensor (gradients, ``filter`` lists) and mergekit's other methods,
  ``slices``, ``modules`` and tokenizer settings have no LoRA counterpart and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel as PydanticModel
from pydantic import ConfigDict, Field, ValidationError

from adapterfuse.backends.merge.adapter import MergedAdapter
from adapterfuse.backends.merge.api import merge
from adapterfuse.backends.merge.config import MergeConfig
from adapterfuse.backends.options import validate_options
from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.tasks.spec import TaskData

METHODS: dict[str, str] = {
    "linear": "uniform",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
}
"""mergekit method -> the adapterfuse method that computes it on ΔW."""

OTHER_MERGEKIT_METHODS = tuple(
    "slerp nuslerp multislerp karcher model_stock arcee_fusion passthrough breadcrumbs breadcrumbs_ties della "
    "della_linear sce ram ramplus_tl nearswap".split()
)
"""mergekit's methods that have no adapterfuse counterpart (refused by name)."""

_SIGN = ("ties", "dare_ties")
_DARE = ("dare_linear", "dare_ties")
# What mergekit reads per model (and, as a default for every model, from the global parameters) and what
# it reads globally only; ``rank``, ``seed`` and ``exact_svd`` are adapterfuse's own global parameters.
_PER_MODEL: dict[str, tuple[str, ...]] = {m: ("weight",) if m == "linear" else ("weight", "density") for m in METHODS}
_GLOBAL: dict[str, tuple[str, ...]] = {
    "linear": ("normalize", "rank"),
    "task_arithmetic": ("int8_mask", "normalize", "rescale", "lambda", "rank"),
    **{m: ("int8_mask", "normalize", "rescale", "lambda", "rank", "seed", "exact_svd") for m in ("ties", *_DARE)},
}
_NORMALIZE_DEFAULT = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False}


class MergekitModel(PydanticModel):
    """One entry of ``models``: an adapter folder or Hub id (``base+adapter`` accepted) and its parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    parameters: dict[str, Any] | None = None


class MergekitConfig(PydanticModel):
    """A mergekit config, as far as a LoRA merge reads it.

    Attributes:
        merge_method: ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear`` or ``dare_ties``.
        models: the adapters to merge, each with ``weight`` (required, as in mergekit) and ``density``.
        base_model: the base the adapters were trained on (used as the base when one is needed).
        parameters: global parameters (``lambda``, ``normalize``, ``rescale``, ``int8_mask``, and defaults
            of ``weight``/``density``; adapterfuse's ``rank``, ``seed``, ``exact_svd``).
        dtype: mergekit's compute dtype; the merge maths always runs in float32.
        out_dtype: the saved dtype; adapters are written in float32.
        slices, modules, tokenizer_source, tokenizer, chat_template: mergekit keys with no meaning for an
            adapter; refused when set.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    merge_method: str
    models: list[MergekitModel] | None = Field(None, min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32"] | None = None
    slices: Any = None
    modules: Any = None
    tokenizer_source: Any = None
    tokenizer: Any = None
    chat_template: Any = None


@dataclass(frozen=True)
class MergekitPlan:
    """A mergekit config translated: what :func:`~adapterfuse.backends.merge.api.merge` is given.

    Attributes:
        config: the validated merge options.
        experts: the adapters (folders or Hub ids), in the file's order.
        base_model: the file's ``base_model`` (``None`` when absent).
    """

    config: MergeConfig
    experts: list[str]
    base_model: str | None = None


def _validation_message(exc: ValidationError) -> str:
    """pydantic's errors as one line, each with its full location (``models[1].paramters``)."""
    out = []
    for err in exc.errors():
        loc = err["loc"]
        where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
        if err["type"] == "extra_forbidden":
            model = MergekitModel if len(loc) > 1 and loc[0] == "models" else MergekitConfig
            out.append(f"{where}: unknown key; expected one of {', '.join(model.model_fields)}")
        elif err["type"] == "missing":
            out.append(f"{where}: missing; it is required")
        else:
            expected = str(err["msg"]).removeprefix("Input should be ")
            out.append(f"{where or 'config'}: expected {expected[:1].lower()}{expected[1:]}, got {err['input']!r}")
    return "mergekit config: " + "; ".join(out)


def parse_mergekit(source: str | Path | Mapping[str, Any]) -> MergekitConfig:
    """Read and validate a mergekit config (a YAML file, or its content as a mapping).

    Raises:
        ConfigError: a missing or unparsable file, unknown keys (naming them), wrong types, or mergekit
            keys that an adapter cannot use (``slices``, ``modules``, tokenizer settings).
    """
    if isinstance(source, Mapping):
        raw: Any = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"mergekit config {path}: no such file; expected a YAML file in mergekit's format")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"mergekit config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"mergekit config: expected a mapping of keys, got {type(raw).__name__}")
    try:
        cfg = MergekitConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc)) from None
    for key in ("slices", "modules", "tokenizer_source", "tokenizer", "chat_template"):
        if getattr(cfg, key) is not None:
            raise ConfigError(
                f"mergekit config: {key!r} builds or edits a full model, which a LoRA merge cannot; expected "
                "'models' naming whole adapters (and no tokenizer settings)"
            )
    if cfg.models is None:
        raise ConfigError("mergekit config: 'models' is missing; expected a list of adapters (- model: FOLDER)")
    return cfg


def _scalar(where: str, value: Any) -> float | bool:
    """One number (or true/false) per setting: gradients and filtered values vary by layer or tensor."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return value
    if isinstance(value, (list, dict)):
        raise ConfigError(
            f"mergekit config: {where}: a gradient or filtered value {value!r} varies by layer or tensor; "
            "expected one number per adapter for a LoRA merge"
        )
    raise ConfigError(f"mergekit config: {where}: expected a finite number, got {value!r}")


def _adapter(i: int, ref: str, base_model: str | None) -> str | None:
    """The adapter an entry names (``None`` for the base itself); ``base+adapter`` gives the adapter."""
    if "@" in ref:
        raise ConfigError(
            f"mergekit config: models[{i}].model {ref!r}: revisions (@) are not read; download that revision "
            "and name its folder"
        )
    if ref == base_model:
        return None
    base, plus, adapter = ref.rpartition("+")
    if not plus:
        return ref
    if base_model is not None and base != base_model:
        raise ConfigError(
            f"mergekit config: models[{i}].model {ref!r}: the adapter is for {base!r}, expected base_model "
            f"{base_model!r}; adapters of one merge share their base"
        )
    return adapter


def _settings(cfg: MergekitConfig) -> tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """The method, the global parameters and ``(adapter, per-model parameters)``, each key checked."""
    method = cfg.merge_method
    if method not in METHODS:
        known = ", ".join(METHODS)
        if method in OTHER_MERGEKIT_METHODS:
            raise ConfigError(
                f"mergekit config: merge_method {method!r} is a mergekit method adapterfuse does not have; "
                f"expected one of {known}"
            )
        raise ConfigError(f"mergekit config: merge_method {method!r}: unknown; expected one of {known}")
    per_model, globals_ = _PER_MODEL[method], _GLOBAL[method]
    shared = dict(cfg.parameters or {})
    for key, value in shared.items():
        if key not in per_model + globals_:
            raise ConfigError(
                f"mergekit config: parameters.{key}: not a parameter of {method}; expected one of "
                f"{', '.join(sorted(per_model + globals_))}"
            )
        shared[key] = _scalar(f"parameters.{key}", value)
    entries = []
    for i, entry in enumerate(cfg.models or []):
        own = dict(entry.parameters or {})
        for key, value in own.items():
            if key not in per_model:
                raise ConfigError(
                    f"mergekit config: models[{i}].parameters.{key}: not a per-model parameter of {method}; "
                    f"expected one of {', '.join(per_model)}"
                )
            own[key] = _scalar(f"models[{i}].parameters.{key}", value)
        adapter = _adapter(i, entry.model, cfg.base_model)
        if adapter is None:
            if method == "linear":
                raise ConfigError(
                    f"mergekit config: models[{i}] is the base_model; linear would average base weights in, "
                    "which an adapter cannot hold; list only adapters"
                )
            continue  # a task-vector method skips the base, as mergekit does
        entries.append((adapter, {k: own.get(k, shared.get(k)) for k in per_model}))
    if not entries:
        raise ConfigError("mergekit config: models names no adapter besides the base_model; expected at least one")
    return method, shared, entries


def _weights(method: str, shared: dict[str, Any], entries: list[tuple[str, dict[str, Any]]]) -> list[float] | None:
    """Per-adapter weights in adapterfuse's convention, or a refusal where mergekit's differs."""
    missing = [a for a, p in entries if p["weight"] is None]
    if missing:
        raise ConfigError(
            f"mergekit config: no weight for {missing}; mergekit's {method} requires one per model "
            "(parameters: weight: 1.0)"
        )
    weights = [float(p["weight"]) for _, p in entries]
    normalize = bool(shared.get("normalize", _NORMALIZE_DEFAULT[method]))
    total = sum(weights)
    if method == "linear":
        if not normalize and abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"mergekit config: linear with normalize: false scales the base by sum(weight) = {total:g}, "
                "which an adapter cannot express; expected weights summing to 1, or normalize: true"
            )
        return weights
    if method in _SIGN and len(weights) > 1:
        if not normalize or len(set(weights)) > 1 or weights[0] <= 0:
            raise ConfigError(
                f"mergekit config: {method} with normalize: {str(normalize).lower()} and weights {weights}: "
                "mergekit divides the agreeing entries by the sum of their weights (or not at all), adapterfuse "
                "by their count; they agree only with normalize: true and one positive weight for all"
            )
        return None  # equal positive weights: the sign election and the mean do not depend on their value
    if normalize and abs(total) >= 1e-8:  # mergekit leaves a near-zero sum undivided
        return [w / total for w in weights]
    return weights


def _params(method: str, shared: dict[str, Any], entries: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The adapterfuse parameters of the translated merge (besides the weights)."""
    out: dict[str, Any] = {k: shared[k] for k in ("rank", "seed", "exact_svd") if k in shared}
    if "lambda" in shared:
        out["lam"] = shared["lambda"]
    if method == "linear":
        return out
    densities = sorted({1.0 if p["density"] is None else float(p["density"]) for _, p in entries})
    if len(densities) > 1:
        raise ConfigError(
            f"mergekit config: densities {densities} differ between models; adapterfuse uses one density "
            "for all adapters (set it once under parameters)"
        )
    density = densities[0]
    if method == "task_arithmetic":
        if density != 1.0:
            raise ConfigError(
                f"mergekit config: task_arithmetic keeps every entry, got density {density:g}; "
                "use ties or dare_linear to sparsify"
            )
        return out
    rescale = bool(shared.get("rescale", method in _DARE))
    if density < 1.0 and rescale != (method in _DARE):
        want = "true: DARE always rescales" if method in _DARE else "false: TIES never rescales"
        raise ConfigError(f"mergekit config: {method} with rescale: {str(rescale).lower()}; expected {want}")
    return {**out, "density": density}


def translate_mergekit(cfg: MergekitConfig) -> MergekitPlan:
    """Turn a validated mergekit config into merge options and an adapter list (no weight is read).

    Args:
        cfg: the parsed config (see :func:`parse_mergekit`).

    Returns:
        The :class:`MergekitPlan`.

    Raises:
        ConfigError: a method adapterfuse does not have (named), a parameter the method does not take, a
            per-layer value, differing densities, or a mergekit convention an adapter cannot reproduce.
    """
    method, shared, entries = _settings(cfg)
    options: dict[str, Any] = {"method": METHODS[method], **_params(method, shared, entries)}
    weights = _weights(method, shared, entries)
    if weights is not None:
        options["weights"] = weights
    config = validate_options(MergeConfig, options, "merge")
    return MergekitPlan(config, [a for a, _ in entries], cfg.base_model)


def read_mergekit(source: str | Path | Mapping[str, Any]) -> MergekitPlan:
    """:func:`parse_mergekit` then :func:`translate_mergekit`: a mergekit file as merge options and adapters.

    Raises:
        ConfigError: see both.
    """
    return translate_mergekit(parse_mergekit(source))


def merge_mergekit(
    source: str | Path | Mapping[str, Any],
    *,
    base: BaseModel | None = None,
    validation: Sequence[TaskData] | None = None,
    allow_pickle: bool = False,
) -> MergedAdapter:
    """Merge the LoRA adapters a mergekit config names into one LoRA adapter.

    Args:
        source: a mergekit YAML file (or its content as a mapping).
        base: the frozen base, checked against the adapters; needed with ``validation``.
        validation: tasks whose validation split chooses λ when the file gives none (λ methods only).
        allow_pickle: accept ``adapter_model.bin`` files.

    Returns:
        The :class:`MergedAdapter`, the same as ``merge`` given the translated options (see
        :func:`read_mergekit`).

    Raises:
        ConfigError: see :func:`read_mergekit` (all before any weight is read).
        ExpertError / CompatibilityError: as :func:`~adapterfuse.backends.merge.api.merge`.
    """
    plan = read_mergekit(source)
    return merge(plan.experts, plan.config, base=base, validation=validation, allow_pickle=allow_pickle)
