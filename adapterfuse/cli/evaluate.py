"""``adapterfuse eval``: the oracle of given experts, or the base zero-shot, on tasks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from adapterfuse.cli.common import (
    add_command,
    add_device_option,
    add_verify_option,
    emit,
    positive_int,
    set_verbosity,
    source,
)


def register(subparsers: Any) -> None:
    """Add the ``eval`` subcommand to an ``add_subparsers()`` object."""
    ev = add_command(
        subparsers,
        "eval",
        help="evaluate experts (or the base zero-shot) on tasks",
        description="Evaluate the oracle of the given experts (each task by its own expert), one adapter "
        "that records no task (a merge, a plain PEFT folder) on every task, or the base zero-shot when no "
        "expert is given; prints a table.",
    )
    ev.add_argument(
        "--experts", nargs="*", default=[], type=Path, help="expert folders (default: none, the base zero-shot)"
    )
    ev.add_argument("--tasks", required=True, help="comma-separated task names")
    ev.add_argument("--base", default=None, help="base model: folder, .gguf file or Hub id (default SmolLM2-135M)")
    ev.add_argument(
        "--max-eval-examples", type=positive_int, default=None, help="a seeded subset of each split (default: all)"
    )
    ev.add_argument(
        "--split", default="test", choices=["test", "validation"], help="test (GLUE dev) or the validation carve"
    )
    ev.add_argument("--validation-size", type=int, default=200, help="examples carved from train for validation")
    ev.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (weights_only load)")
    add_verify_option(ev)
    ev.add_argument("--out", type=Path, default=None, help="results.json to write (default: none)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_device_option(ev)
    ev.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``adapterfuse eval``: print the harness table (or ``--json``), and write ``--out`` if given.

    Returns:
        0 on success.

    Raises:
        AdapterFuseError: an unknown task, missing data, incompatible experts or an existing ``--out``.
    """
    from adapterfuse.base import load_base
    from adapterfuse.distributed import is_main
    from adapterfuse.harness import evaluate, results_table
    from adapterfuse.io.atomic import check_output, write_json
    from adapterfuse.library import ExpertLibrary, check_against_base
    from adapterfuse.tasks.glue import load_task, parse_tasks

    set_verbosity(args)
    tasks = parse_tasks(args.tasks)
    source(args.base, "--base")
    if args.out is not None:
        check_output(args.out, args.overwrite)
    library = (
        ExpertLibrary.load(args.experts, allow_pickle=args.allow_pickle, verify=not args.no_verify)
        if args.experts
        else None
    )
    _check_experts(library)
    base = load_base(source(args.base, "--base"), device=args.device)
    if library is not None:
        library.check(base.fingerprint)
        check_against_base(library, base)
    data = [load_task(t, args.validation_size, max_test=args.max_eval_examples) for t in tasks]
    predictor = _predictor(base, library)
    result = evaluate(predictor, data, split=args.split, max_examples=args.max_eval_examples)
    if args.out is not None and is_main():  # every process has the whole result; one writes it
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    emit(args, results_table([result]), result)
    return 0


def _check_experts(library: Any) -> None:
    """Refuse, before the base is loaded, several experts of which one records no task.

    Raises:
        ConfigError: several experts given and one of them records no task.
    """
    from adapterfuse.errors import ConfigError

    untasked = [e.name for e in library or () if not e.task]
    if untasked and len(library) > 1:
        raise ConfigError(
            f"--experts: {untasked[0]!r} records no task, so the oracle cannot tell which task it answers; "
            "evaluate an adapter without a task alone (it is scored on every task), or give experts that record one"
        )


def _predictor(base: Any, library: Any) -> Any:
    """The oracle of experts that record their task, one task-less adapter alone, or the base zero-shot."""
    from adapterfuse.harness import ExpertPredictor, OraclePredictor, ZeroShotPredictor

    if library is None:
        return ZeroShotPredictor(base)
    experts = list(library)
    if len(experts) == 1 and not experts[0].task:  # a merge or a plain PEFT adapter, scored on every task
        return ExpertPredictor(base, experts[0])
    return OraclePredictor(base, library)
