"""The ``adapterfuse`` command line: train, evaluate, merge, ensemble, route, run recipes, push.

Bad arguments exit with status 2 and one line naming the argument; an adapterfuse error exits 1 with
its one-line message; neither prints a traceback (``ADAPTERFUSE_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from adapterfuse.errors import AdapterFuseError, ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (shared by every subcommand)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adapterfuse", description="Train, combine and evaluate LoRA/AdaLoRA experts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train one expert for one task",
                           description="Train a LoRA or AdaLoRA expert on one GLUE task and save it.")
    train.add_argument("--task", required=True, help="GLUE task: cola, sst2, mrpc, qqp, stsb, rte, wnli, qnli, mnli")
    train.add_argument("--out", required=True, type=Path, help="expert folder to write")
    train.add_argument("--base", default=None, help="base model: Hub id, folder, .gguf file (default SmolLM2-135M)")
    train.add_argument("--method", default="lora", choices=["lora", "adalora"])
    train.add_argument("--rank", type=positive_int, default=8)
    train.add_argument("--max-train-examples", type=positive_int, default=2000)
    train.add_argument("--max-eval-examples", type=positive_int, default=None)
    train.add_argument("--validation-size", type=int, default=200, help="examples carved from train for validation")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=positive_int, default=16)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--balance-classes", action="store_true", help="weight the loss by inverse class frequency")
    train.add_argument("--no-autocast", action="store_true", help="train in fp32 instead of bf16 autocast")
    train.add_argument("--snapshots", type=positive_int, default=1,
                       help="save N adapters along one run (cyclic cosine LR; --out/snapshot-1..N)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    train.add_argument("--ensemble", default=None, choices=["batchensemble", "mimo", "camero", "swag"],
                       help="train a parameter-efficient ensemble of --members members instead of one expert")
    train.add_argument("--members", type=positive_int, default=4, help="members of --ensemble")
    train.add_argument("--pooling", default="linear", choices=["linear", "log_linear"], help="how --ensemble pools")

    ev = sub.add_parser("eval", help="evaluate experts (or the base zero-shot) on tasks",
                        description="Evaluate the oracle of the given experts (each task by its own expert), "
                                    "or the base zero-shot when no expert is given; prints a table.")
    ev.add_argument("--experts", nargs="*", default=[], type=Path, help="expert folders (none: base zero-shot)")
    ev.add_argument("--tasks", required=True, help="comma-separated task names")
    ev.add_argument("--base", default=None)
    ev.add_argument("--max-eval-examples", type=positive_int, default=None)
    ev.add_argument("--split", default="test", choices=["test", "validation"])
    ev.add_argument("--validation-size", type=int, default=200, help="examples carved from train for validation")
    ev.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (weights_only load)")
    ev.add_argument("--out", type=Path, default=None, help="results.json to write")
    ev.add_argument("--overwrite", action="store_true")
    train.set_defaults(handler=_cmd_train)
    ev.set_defaults(handler=_cmd_eval)

    from adapterfuse import cli_ensemble, cli_merge, cli_route, cli_run

    cli_merge.register(sub)
    cli_ensemble.register(sub)
    cli_route.register(sub)
    cli_run.register(sub)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from adapterfuse.base import load_base
    from adapterfuse.fsutil import check_output
    from adapterfuse.tasks.glue import get_task
    from adapterfuse.train import train_expert
    from adapterfuse.train_config import TrainConfig

    task = get_task(args.task)
    config = TrainConfig(method=args.method, rank=args.rank, max_train_examples=args.max_train_examples,
                         max_eval_examples=args.max_eval_examples, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, balance_classes=args.balance_classes,
                         autocast=not args.no_autocast, validation_size=args.validation_size,
                         adalora_init_r=max(12, args.rank), snapshots=args.snapshots)
    if args.ensemble:
        from adapterfuse.pe_ensemble.options import check_kind

        check_kind(args.ensemble, args.members)
        if args.method != "lora":
            raise ConfigError(f"--ensemble {args.ensemble}: members are LoRA adapters, got --method {args.method}; "
                              "drop --method or use --method lora")
    check_output(args.out, args.overwrite)  # before the base is loaded
    base = load_base(args.base)
    if args.ensemble:
        from adapterfuse.pe_ensemble import train_pe_ensemble

        ens = train_pe_ensemble(base, task, args.ensemble, args.members, config, out=args.out,
                                overwrite=args.overwrite, pooling=args.pooling)
        print(json.dumps({"ensemble": str(args.out), "kind": args.ensemble, "members": args.members,
                          "scores": ens.manifest["scores"],
                          "train_wall_s": ens.manifest["training"]["train_wall_s"]}, indent=2))
        return 0
    expert = train_expert(base, task, config, out=args.out, overwrite=args.overwrite)
    print(json.dumps({"expert": str(expert.path), "scores": expert.meta["scores"],
                      "train_wall_s": expert.meta["training"]["train_wall_s"]}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from adapterfuse.base import load_base
    from adapterfuse.fsutil import check_output, write_json
    from adapterfuse.harness import OraclePredictor, ZeroShotPredictor, evaluate, results_table
    from adapterfuse.library import ExpertLibrary
    from adapterfuse.tasks.glue import load_task, parse_tasks

    tasks = parse_tasks(args.tasks)
    if args.out is not None:
        check_output(args.out, args.overwrite)
    library = ExpertLibrary.load(args.experts, allow_pickle=args.allow_pickle) if args.experts else None
    base = load_base(args.base)
    if library is not None:
        library.check(base.fingerprint)
    data = [load_task(t, args.validation_size, max_test=args.max_eval_examples) for t in tasks]
    predictor = OraclePredictor(base, library) if library is not None else ZeroShotPredictor(base)
    result = evaluate(predictor, data, split=args.split, max_examples=args.max_eval_examples)
    print(results_table([result]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    return 0


# Warnings libraries raise on every adapter load that say nothing a user can act on.
_LIBRARY_NOISE = (r"The PEFT config's `base_model_name_or_path` was renamed",
                  r"`is_gradient_checkpointing` is deprecated",
                  r"Unable to fetch remote file due to the following error",
                  r"Could not find a config file in")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adapterfuse`` console script.

    Returns:
        The exit status: 0 ok, 1 an adapterfuse error, 2 bad arguments.
    """
    args = _build_parser().parse_args(argv)
    for noise in _LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=noise)
    try:
        return args.handler(args)
    except (AdapterFuseError, ValidationError) as e:
        if os.environ.get("ADAPTERFUSE_DEBUG"):
            raise
        message = str(e).splitlines()[0] if isinstance(e, AdapterFuseError) else _pydantic_line(e)
        print(f"adapterfuse {args.command}: error: {message}", file=sys.stderr)
        return 1


def _pydantic_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "config"
    return str(ConfigError(f"{where}: {err['msg']} (got {err.get('input')!r})"))


if __name__ == "__main__":
    sys.exit(main())
