"""``adapterfuse ensemble``: fit an ensemble of experts, evaluate it on the tasks' test split, save it.

Wired into ``adapterfuse.cli`` by ``register(subparsers)``; :func:`run` runs a one-combiner recipe
through the recipe runner and raises adapterfuse errors for ``cli.main`` to print as one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from adapterfuse.cli.common import (
    add_command,
    add_config_options,
    add_device_option,
    add_no_autocast_option,
    add_verify_option,
    positive_int,
    set_verbosity,
)

OPTIONS: dict[str, tuple[Any, str]] = {
    "pooling": (str, "how the members' distributions are pooled"),
    "weights": (str, "uniform | learned | w1,w2,... (one per expert)"),
    "select": (str, "greedy | topK (e.g. top3); chosen on the validation split; none: every member"),
    "temperature": (float, "pooling temperature (uniform or given weights)"),
    "metric": (str, "what selection maximises"),
    "batch_size": (int, "inputs per batch (x K rows)"),
    "max_length": (int, "tokens per input"),
    "seed": (int, "seed of the weight fit"),
}
"""Ensemble options the command takes: field of EnsembleConfig -> (argparse type, help)."""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``ensemble`` command to an ``argparse`` sub-parsers object.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new sub-parser (its ``handler`` default is :func:`run`).
    """
    p = add_command(
        subparsers,
        "ensemble",
        help="pool several experts in one batched pass",
        description="Ensemble experts (linear or log-linear pooling; uniform, given or learned weights; optional "
        "greedy/top-K selection on the validation split), evaluate on the test split, save it.",
    )
    p.add_argument("--experts", nargs="+", required=True, type=Path, help="expert folders (the candidate members)")
    p.add_argument("--tasks", required=True, help="comma-separated task names (fit on validation, score on test)")
    p.add_argument("--out", required=True, type=Path, help="ensemble folder to write")
    p.add_argument("--base", default=None, help="base model: folder, .gguf file or Hub id (default SmolLM2-135M)")
    p.add_argument(
        "--validation-size",
        type=int,
        default=200,
        help="examples carved from train for validation; keep the experts' value so they never trained on it",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed of the validation carve (the experts' --seed)")
    p.add_argument(
        "--max-eval-examples",
        type=positive_int,
        default=None,
        help="a seeded subset of each task's test split (default: all)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (weights_only load)")
    add_verify_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    # The ensemble options: only those given reach the namespace; EnsembleConfig holds their defaults and checks.
    group = p.add_argument_group("ensemble options (checked and defaulted by EnsembleConfig)")
    add_config_options(group, "ensemble", OPTIONS)
    add_no_autocast_option(group)
    add_device_option(p)
    p.set_defaults(handler=run)
    return p


def _carve_notes(experts: Any, validation_size: int, seed: int) -> list[str]:
    """Warn when an expert was trained with another validation carve (it may have seen our validation data)."""
    notes = []
    for e in experts:
        training = e.meta.get("training", {})
        theirs = (training.get("validation_size"), training.get("seed"))
        if None not in theirs and theirs != (validation_size, seed):
            notes.append(
                f"note: expert {e.name!r} was trained with validation_size={theirs[0]}, seed={theirs[1]}; "
                f"this run carves validation_size={validation_size}, seed={seed}, so its validation "
                "examples may overlap that expert's training data"
            )
    return notes


def run(args: argparse.Namespace) -> int:
    """Fit, evaluate (printing ``harness.results_table``, or ``--json``) and save an ensemble.

    Returns:
        0 on success.

    Raises:
        AdapterFuseError: bad arguments (checked before the base is loaded), incompatible experts,
            missing data, or an existing ``--out`` without ``--overwrite``.
    """
    from adapterfuse.backends.ensemble.config import EnsembleConfig, check_ensemble
    from adapterfuse.cli.combine import checked_recipe, command_options, fit_and_evaluate, load_experts, save_and_print

    set_verbosity(args)
    config, given = command_options(args, EnsembleConfig, "ensemble")
    recipe = checked_recipe(args, "ensemble", given)

    def check(library: Any) -> list[str]:
        check_ensemble(config, [e.name for e in library], has_validation=True)  # before the base is loaded
        return _carve_notes(library, args.validation_size, args.data_seed)

    done, _ = fit_and_evaluate(args, recipe, load_experts(args, check))
    predictor, result = done.predictor, done.result
    result["ensemble"] = {
        "members": predictor.names,
        "pooling": predictor.pooling,
        "weights": predictor.weights,
        "temperature": predictor.temperature,
        "info": predictor.info,
    }
    members = ", ".join(f"{n} {w:+.3f}" for n, w in zip(predictor.names, predictor.weights, strict=True))
    save_and_print(args, predictor, result, [f"members: {members}; temperature {predictor.temperature:.3g}"])
    return 0
