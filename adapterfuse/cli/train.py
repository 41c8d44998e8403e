"""``adapterfuse train``: one expert (or a parameter-efficient ensemble) for one task."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from adapterfuse.cli.common import add_command, add_device_option, emit, positive_int, set_verbosity, source
from adapterfuse.errors import ConfigError


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand to an ``add_subparsers()`` object."""
    train = add_command(
        subparsers,
        "train",
        help="train one expert for one task",
        description="Train a LoRA or AdaLoRA expert on one GLUE task and save it.",
    )
    train.add_argument("--task", required=True, help="GLUE task: cola, sst2, mrpc, qqp, stsb, rte, wnli, qnli, mnli")
    train.add_argument("--out", required=True, type=Path, help="expert folder to write")
    train.add_argument("--base", default=None, help="base model: folder, .gguf file or Hub id (default SmolLM2-135M)")
    train.add_argument(
        "--method",
        default="lora",
        choices=["lora", "adalora"],
        help="adapter kind (AdaLoRA's initial rank: max(12, --rank))",
    )
    train.add_argument("--rank", type=positive_int, default=8, help="LoRA rank; AdaLoRA's average target rank")
    train.add_argument("--max-train-examples", type=positive_int, default=2000, help="a seeded subset of train")
    train.add_argument(
        "--max-eval-examples",
        type=positive_int,
        default=None,
        help="score a seeded subset of the test split (default: all)",
    )
    train.add_argument("--validation-size", type=int, default=200, help="examples carved from train for validation")
    train.add_argument("--epochs", type=float, default=1.0, help="epochs (fractions allowed)")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warm-up, then decay to 0)")
    train.add_argument("--batch-size", type=positive_int, default=16, help="examples per step")
    train.add_argument("--seed", type=int, default=0, help="seed of training, of the validation carve and of the caps")
    train.add_argument("--balance-classes", action="store_true", help="weight the loss by inverse class frequency")
    train.add_argument("--no-autocast", action="store_true", help="train in fp32 instead of bf16 autocast")
    _add_ensemble_options(train)
    train.add_argument(
        "--ensemble",
        default=None,
        choices=["batchensemble", "mimo", "camero", "swag"],
        help="train a parameter-efficient ensemble of --members members instead of one expert (default: none)",
    )
    train.add_argument("--members", type=positive_int, default=4, help="members of --ensemble")
    train.add_argument("--pooling", default="linear", choices=["linear", "log_linear"], help="how --ensemble pools")

    add_device_option(train)
    train.set_defaults(handler=run)


def _add_ensemble_options(train: argparse.ArgumentParser) -> None:
    """The ways one command trains more than one plain adapter: bagging, averaging, snapshots, grids."""
    train.add_argument(
        "--bootstrap",
        action="store_true",
        help="train on a bootstrap resample of the training examples (seeded by --seed; bagging)",
    )
    train.add_argument(
        "--average-last",
        type=positive_int,
        default=1,
        help="save the exact mean of the adapter's ΔW at its last N checkpoints (50 steps apart); 1: the final one",
    )
    train.add_argument(
        "--snapshots",
        type=positive_int,
        default=1,
        help="save N adapters along one run (cyclic cosine LR; --out/snapshot-1..N)",
    )
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    train.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="train one expert per combination (a hyperparameter ensemble) into --out/<name>; repeatable, "
        "e.g. --grid lr=1e-3,3e-3 --grid rank=4,8; a finished member is reused",
    )


def _config(args: argparse.Namespace):
    """The training config the flags describe (validated by TrainConfig)."""
    from adapterfuse.train.config import TrainConfig

    return TrainConfig(
        method=args.method,
        rank=args.rank,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        balance_classes=args.balance_classes,
        bootstrap=args.bootstrap,
        average_last=args.average_last,
        autocast=not args.no_autocast,
        validation_size=args.validation_size,
        adalora_init_r=max(12, args.rank),
        snapshots=args.snapshots,
    )


def _value(text: str) -> int | float | bool | str:
    """A grid value as the type it reads as: int, float, true/false, else the text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _grid(specs: list[str]) -> dict[str, list]:
    """``["lr=1e-3,3e-3", "rank=4,8"]`` -> ``{"lr": [0.001, 0.003], "rank": [4, 8]}``.

    Raises:
        ConfigError: a spec without ``=`` or values, or a field given twice.
    """
    grid: dict[str, list] = {}
    for spec in specs:
        field, _, values = spec.partition("=")
        field = field.strip().replace("-", "_")
        if not field or not values:
            raise ConfigError(f"--grid {spec!r}: expected FIELD=V1,V2 (e.g. lr=1e-3,3e-3)")
        if field in grid:
            raise ConfigError(f"--grid {field}: given twice; give all its values in one --grid")
        grid[field] = [_value(v.strip()) for v in values.split(",")]
    return grid


def _check_ensemble(args: argparse.Namespace) -> None:
    from adapterfuse.train.pe.options import check_kind

    check_kind(args.ensemble, args.members)
    if args.method != "lora":
        raise ConfigError(
            f"--ensemble {args.ensemble}: members are LoRA adapters, got --method {args.method}; "
            "drop --method or use --method lora"
        )


def run(args: argparse.Namespace) -> int:
    """Run ``adapterfuse train``: print the output folder, its scores and the training time (``--json``: as JSON).

    Raises:
        AdapterFuseError: a bad setting (before the base is loaded), an existing ``--out``, bad data.
    """
    from adapterfuse.base import load_base
    from adapterfuse.io.atomic import check_output
    from adapterfuse.tasks.glue import get_task
    from adapterfuse.train.expert import train_expert

    set_verbosity(args)
    task, config = get_task(args.task), _config(args)
    if args.ensemble:
        _check_ensemble(args)
    base_spec = source(args.base, "--base")
    if args.grid:  # a grid's folder is reused on a rerun (finished members are kept); check the grid now
        from adapterfuse.train.grid import grid_configs

        grid_configs(config, _grid(args.grid))
    else:
        check_output(args.out, args.overwrite)  # before the base is loaded
    base = load_base(base_spec, device=args.device)
    if args.ensemble:
        from adapterfuse.train.pe.options import PESpec
        from adapterfuse.train.pe.train import train_pe_ensemble

        spec = PESpec(args.ensemble, args.members, config, {"pooling": args.pooling})
        ens = train_pe_ensemble(base, task, spec, out=args.out, overwrite=args.overwrite)
        record = {
            "ensemble": str(args.out),
            "kind": args.ensemble,
            "members": args.members,
            "scores": ens.manifest["scores"],
            "train_wall_s": ens.manifest["training"]["train_wall_s"],
        }
    elif args.grid:
        from adapterfuse.train.grid import train_grid

        members = train_grid(base, task, config, _grid(args.grid), args.out)
        record = {"members": [str(e.path) for e in members], "scores": {e.path.name: e.meta["scores"] for e in members}}
    else:
        expert = train_expert(base, task, config, out=args.out, overwrite=args.overwrite)
        record = {
            "expert": str(expert.path),
            "scores": expert.meta["scores"],
            "train_wall_s": expert.meta["training"]["train_wall_s"],
        }
    emit(args, _text(record), record)
    return 0


def _text(record: dict[str, Any]) -> str:
    """The human-readable summary of a training run."""
    what = f"{record['kind']} ensemble of {record['members']}" if "kind" in record else "expert"
    folder = record.get("expert") or record.get("ensemble")
    scores = record.get("scores") or {}
    lines = [f"{what} saved to {folder}; trained in {record['train_wall_s']:.0f} s"]
    for split, value in scores.items():
        shown = value.get("score", value) if isinstance(value, dict) else value
        lines.append(f"{split}: {shown:.4f}" if isinstance(shown, float) else f"{split}: {shown}")
    return "\n".join(lines)
