"""The checks ``adapterfuse run --dry-run`` makes without loading a model or reading a weight.

Each combiner's options go through its backend's config model and then the checks that need the
member count (unknown option, unknown method or router, weight count, density range …), as in the API;
experts already on disk are compared by their config files and safetensors headers (base fingerprint, module shapes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from adapterfuse.backends.base import backend_config
from adapterfuse.backends.ensemble.config import check_ensemble
from adapterfuse.backends.merge.config import check_merge
from adapterfuse.backends.route.config import check_route
from adapterfuse.backends.route.features import layer_index
from adapterfuse.base import fingerprints_conflict
from adapterfuse.errors import CompatibilityError, ConfigError
from adapterfuse.recipe.families import TRAINED_FAMILIES, FamilyOptions
from adapterfuse.recipe.schema import CombinerEntry, Recipe


def expert_names(recipe: Recipe) -> list[str]:
    """The experts a recipe trains (``task-method-rRANK-sSEED``) or names by path (the folder name)."""
    if recipe.experts.paths:
        return [Path(p).name for p in recipe.experts.paths]
    return [name for _, name, _ in recipe.trained_experts()]


def check_combiner(entry: CombinerEntry, recipe: Recipe) -> None:
    """Validate one combiner's options the way its backend will, before anything is loaded.

    Raises:
        ConfigError: an unknown member, option, method, router or kind, or a bad value.
    """
    names = expert_names(recipe)
    missing = sorted(set(entry.members or []) - set(names))
    if missing:
        raise ConfigError(
            f"combiner {entry.label!r}: members {missing} are not experts of this recipe; expected some of {names}"
        )
    members, opts = entry.members or names, dict(entry.options)
    try:
        if entry.backend == "pe_ensemble":
            _check_pe(entry, recipe)
            return
        if entry.backend == "task_ensemble":
            _check_family(recipe, opts)
            return
        config = backend_config(entry.backend, opts)
        if entry.backend == "merge":
            check_merge(config, len(members))  # type: ignore[arg-type]
        elif entry.backend == "ensemble":
            check_ensemble(config, members, has_validation=True)  # type: ignore[arg-type]
        else:
            check_route(config, len(members), has_data=True)  # type: ignore[arg-type]
    except ConfigError as e:
        raise ConfigError(f"combiner {entry.label!r}: {e}") from None


def _check_family(recipe: Recipe, opts: dict[str, Any]) -> None:
    """A task_ensemble combiner whose family trains members needs the recipe's expert settings."""
    if FamilyOptions(**opts).family in TRAINED_FAMILIES and recipe.experts.paths:
        raise ConfigError(
            f"family {opts['family']!r} trains members with the recipe's expert settings, but experts.paths gives "
            "finished experts; let the recipe train its experts (remove experts.paths) or use family "
            "'mc_dropout' or 'temperature'"
        )


def _check_pe(entry: CombinerEntry, recipe: Recipe) -> None:
    """A pe_ensemble combiner: it trains its own members, so the recipe must train experts."""
    from adapterfuse.train.pe.options import parse_options

    if recipe.experts.paths:
        raise ConfigError(
            "pe_ensemble trains its own members per task, so it needs the recipe to train experts; remove "
            "experts.paths or this combiner"
        )
    kind, members, rest = entry.pe_parts()
    task = next(iter(recipe.tasks))
    parse_options(kind, members, recipe.train_config(task, recipe.experts.seeds[0]), rest)


def check_recipe(recipe: Recipe) -> None:
    """Validate every combiner of a recipe (see :func:`check_combiner`), and the routing layers against
    the base's block count when its config can be read without its weights (see :func:`base_layers`).

    Raises:
        ConfigError: the first combiner at fault, named.
    """
    for entry in recipe.combiners:
        check_combiner(entry, recipe)
    check_layers(recipe, base_layers(recipe.base))


def base_layers(spec: str | None) -> int | None:
    """The block count of a recipe's base read from its ``config.json`` alone, when the base is a local
    model folder; ``None`` otherwise (the run checks the layers as soon as the base is loaded, before
    any expert is trained)."""
    folder = Path(spec).expanduser() if spec else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(str(folder)).num_hidden_layers)
    except (OSError, ValueError, AttributeError, TypeError):  # not a config we can read: checked after loading
        return None


def check_layers(recipe: Recipe, n_layers: int | None) -> None:
    """Check every route combiner's feature ``layer`` against a base of ``n_layers`` blocks (as the API does).

    Args:
        recipe: the recipe.
        n_layers: the base's block count; ``None`` (unknown yet): nothing is checked.

    Raises:
        ConfigError: a layer out of range, naming the combiner, the layer and the valid range.
    """
    if n_layers is None:
        return
    for entry in recipe.combiners:
        if entry.backend != "route":
            continue
        try:
            layer_index(backend_config("route", entry.options).layer, n_layers)  # type: ignore[attr-defined]
        except ConfigError as e:
            raise ConfigError(f"combiner {entry.label!r}: {e}") from None


def expert_header(folder: Path) -> dict[str, Any]:
    """An expert folder's compatibility facts, from its JSON files and safetensors header only.

    Returns:
        ``{"fingerprint", "peft_type", "shapes": {module: (out, in)}}``.

    Raises:
        CompatibilityError: a missing config or weights file.
    """
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (config_file, weights):
        if not f.is_file():
            raise CompatibilityError(
                f"expert {folder.name!r}: {f.name} not found in {folder}; expected a PEFT "
                "adapter folder with safetensors weights"
            )
    meta_file = folder / "adapterfuse.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    shapes: dict[str, list[int]] = {}
    with safe_open(weights, "pt") as fh:
        for key in fh.keys():
            shape = fh.get_slice(key).get_shape()
            module = key.split(".lora_")[0]
            if ".lora_A" in key:
                shapes.setdefault(module, [0, 0])[1] = shape[-1]
            elif ".lora_B" in key:
                shapes.setdefault(module, [0, 0])[0] = shape[0]
    return {
        "fingerprint": (meta.get("base") or {}).get("fingerprint"),
        "peft_type": json.loads(config_file.read_text()).get("peft_type"),
        "shapes": shapes,
    }


def check_expert_headers(folders: list[Path]) -> list[dict[str, Any]]:
    """Compare experts on disk by header: one base fingerprint, the same shape for a shared module.

    Raises:
        CompatibilityError: naming the two experts that disagree and on what.
    """
    headers = [expert_header(f) for f in folders]
    for folder, head in zip(folders[1:], headers[1:], strict=True):
        first, ref = folders[0], headers[0]
        if fingerprints_conflict(head["fingerprint"], ref["fingerprint"]):
            raise CompatibilityError(
                f"experts {first.name!r} and {folder.name!r} were trained on different bases "
                f"({ref['fingerprint'][:19]}… vs {head['fingerprint'][:19]}…); combine "
                "experts of one base only"
            )
        for module in set(head["shapes"]) & set(ref["shapes"]):
            if head["shapes"][module] != ref["shapes"][module]:
                raise CompatibilityError(
                    f"experts {first.name!r} and {folder.name!r}: module {module} has shape "
                    f"{ref['shapes'][module]} vs {head['shapes'][module]}; expected one base"
                )
    return headers
