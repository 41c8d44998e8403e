"""``adapterfuse ensemble``: fit an ensemble of experts, evaluate it on the tasks' test split, save it.

Wired into ``adapterfuse.cli`` by ``register(subparsers)``; :func:`run` raises adapterfuse errors for
``cli.main`` to print as one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from adapterfuse.backends.ensemble.config import EnsembleConfig
from adapterfuse.cli.common import add_config_options, add_device_option, positive_int

OPTIONS: dict[str, tuple[Any, str]] = {
    "pooling": (str, "how the members' distributions are pooled"),
    "weights": (str, "uniform | learned | w1,w2,... (one per expert)"),
    "select": (str, "greedy | topK (e.g. top3); chosen on the validation split"),
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
    p = subparsers.add_parser(
        "ensemble",
        help="pool several experts in one batched pass",
        description="Ensemble experts (linear or log-linear pooling; uniform, given or learned weights; optional "
        "greedy/top-K selection on the validation split), evaluate on the test split, save it.",
    )
    p.add_argument("--experts", nargs="+", required=True, type=Path, help="expert folders (the candidate members)")
    p.add_argument("--tasks", required=True, help="comma-separated task names (fit on validation, score on test)")
    p.add_argument("--out", required=True, type=Path, help="ensemble folder to write")
    p.add_argument("--base", default=None, help="base model: Hub id, folder, .gguf file (default SmolLM2-135M)")
    p.add_argument(
        "--validation-size",
        type=int,
        default=200,
        help="examples carved from train for validation; keep the experts' value so they never trained on it",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed of the validation carve (the experts' --seed)")
    p.add_argument("--max-eval-examples", type=positive_int, default=None)
    p.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (weights_only load)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="load expert folders whose files no longer match their manifest.json (changed after saving)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    # The ensemble options: only those given reach the namespace; EnsembleConfig holds their defaults and checks.
    group = p.add_argument_group("ensemble options (checked and defaulted by EnsembleConfig)")
    add_config_options(group, EnsembleConfig, OPTIONS)
    group.add_argument(
        "--no-autocast",
        dest="autocast",
        action="store_false",
        default=argparse.SUPPRESS,
        help="score in fp32 instead of bf16 autocast",
    )
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
    """Fit, evaluate (printing ``harness.results_table``) and save an ensemble.

    Returns:
        0 on success.

    Raises:
        AdapterFuseError: bad arguments (checked before the base is loaded), incompatible experts,
            missing data, or an existing ``--out`` without ``--overwrite``.
    """
    from adapterfuse.backends.ensemble.config import check_ensemble
    from adapterfuse.backends.ensemble.fit import ensemble
    from adapterfuse.backends.options import validate_options
    from adapterfuse.base import load_base
    from adapterfuse.harness import evaluate, results_table
    from adapterfuse.io.atomic import check_output, write_json
    from adapterfuse.library import ExpertLibrary
    from adapterfuse.tasks.glue import load_task, parse_tasks

    tasks = parse_tasks(args.tasks)
    config = validate_options(
        EnsembleConfig, {k: v for k, v in vars(args).items() if k in EnsembleConfig.model_fields}, "ensemble"
    )
    check_output(args.out, args.overwrite)
    library = ExpertLibrary.load(args.experts, allow_pickle=args.allow_pickle, verify=not args.no_verify)
    check_ensemble(config, [e.name for e in library], has_validation=True)  # before the base is loaded
    for note in [*library.notes, *_carve_notes(library, args.validation_size, args.data_seed)]:
        print(note, file=sys.stderr)
    base = load_base(args.base, device=args.device)
    library.check(base.fingerprint)
    data = [load_task(t, args.validation_size, args.data_seed, max_test=args.max_eval_examples) for t in tasks]
    predictor = ensemble(library, base, config, validation=data if config.fits else None)
    result = evaluate(predictor, data, split="test", max_examples=args.max_eval_examples)
    result["ensemble"] = {
        "members": predictor.names,
        "pooling": predictor.pooling,
        "weights": predictor.weights,
        "temperature": predictor.temperature,
        "info": predictor.info,
    }
    print(results_table([result]))
    print(
        f"members: {', '.join(f'{n} {w:+.3f}' for n, w in zip(predictor.names, predictor.weights, strict=True))}"
        f"; temperature {predictor.temperature:.3g}"
    )
    predictor.save(args.out, overwrite=args.overwrite)
    write_json(args.out / "results.json", result)
    print(f"saved {args.out}")
    return 0
