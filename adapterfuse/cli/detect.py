"""``adapterfuse detect``: fit an out-of-task detector on tasks' inputs and measure it on tasks no expert knows."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from adapterfuse.cli.common import add_command, add_device_option, emit, positive_int, set_verbosity, source


def register(subparsers: Any) -> None:
    """Add the ``detect`` subcommand to an ``add_subparsers()`` object."""
    p = add_command(
        subparsers,
        "detect",
        help="fit an out-of-task detector on tasks' inputs; measure it on held-out tasks",
        description="Keep the base's features of each task's training inputs, set a threshold that keeps "
        "--accept of their validation inputs, then score the tasks' dev inputs and each held-out task's: "
        "prints the AUROC at telling held-out inputs from in-task ones and the share each side flags.",
    )
    p.add_argument("--tasks", required=True, help="comma-separated in-task names (the tasks the experts know)")
    p.add_argument("--held-out", required=True, help="comma-separated tasks no expert knows (their dev split)")
    p.add_argument("--base", default=None, help="base model: folder, .gguf file or Hub id (default SmolLM2-135M)")
    p.add_argument("--max-train", type=positive_int, default=1000, help="training inputs kept per task (seeded)")
    p.add_argument("--validation-size", type=positive_int, default=200, help="inputs carved from train per task")
    p.add_argument("--max-test", type=positive_int, default=None, help="dev inputs per in-task task (default: all)")
    p.add_argument("--max-held-out", type=positive_int, default=1000, help="dev inputs per held-out task (seeded)")
    p.add_argument("--layer", type=int, default=-1, help="the base's hidden state read (-1: the final one)")
    p.add_argument(
        "--on",
        default="each_field",
        choices=["each_field", "fields", "prompt"],
        help="each raw input field pooled on its own, the fields as one text, or the whole prompt",
    )
    p.add_argument("--readout", default="mean", choices=["mean", "mean_last"], help="pooling over the tokens")
    p.add_argument("--k", type=positive_int, default=1, help="distance to the k-th nearest in-task input")
    p.add_argument("--accept", type=float, default=0.95, help="share of in-task validation inputs kept")
    p.add_argument(
        "--leave-one-out", action="store_true", help="also score each in-task task as if unknown (no held-out data)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the carves and caps")
    p.add_argument("--out", type=Path, default=None, help="folder to save the detector and results.json in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_device_option(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``adapterfuse detect``: print the detection table (or ``--json``), and save ``--out`` if given.

    Returns:
        0 on success.

    Raises:
        AdapterFuseError: an unknown task, missing data, a bad option or an existing ``--out``.
    """
    from adapterfuse.base import load_base
    from adapterfuse.distributed import is_main
    from adapterfuse.errors import ConfigError
    from adapterfuse.feature_detector import (
        DetectorSpec,
        FeatureDetector,
        check_accept,
        detection_result,
        leave_one_task_out,
    )
    from adapterfuse.io.atomic import atomic_dir, check_output, write_json
    from adapterfuse.tasks.glue import load_held_out, load_task, parse_tasks

    set_verbosity(args)
    spec = DetectorSpec(layer=args.layer, on=args.on, readout=args.readout, k=args.k)
    check_accept(args.accept)  # every option checked before the base is loaded
    tasks, held_out = parse_tasks(args.tasks), parse_tasks(args.held_out)
    both = sorted({t.name for t in tasks} & {t.name for t in held_out})
    if both:
        raise ConfigError(
            f"--held-out: {both} also in --tasks; a held-out task is one the detector never saw, so drop it from one"
        )
    if args.out is not None:
        check_output(args.out, args.overwrite)
    data = [load_task(t, args.validation_size, args.seed, args.max_train, args.max_test) for t in tasks]
    away = [load_held_out(t, args.max_held_out, args.seed) for t in held_out]
    base = load_base(source(args.base, "--base"), device=args.device)
    t0 = time.perf_counter()
    detector = FeatureDetector.fit(base, data, spec, args.accept)
    fit_s = time.perf_counter() - t0
    result = detection_result(detector, data, away)
    result["fit_seconds"] = round(fit_s, 1)
    if args.leave_one_out:
        result["leave_one_out"] = leave_one_task_out(detector, data)
    if args.out is not None and is_main():  # every process has the whole result; one writes it
        with atomic_dir(args.out, args.overwrite) as tmp:  # the detector and its results land together
            detector.write(tmp)
            write_json(tmp / "results.json", result)
    emit(args, detection_table(result), result)
    return 0


def detection_table(result: dict[str, Any]) -> str:
    """The printed form of :func:`~adapterfuse.feature_detector.detection_result`."""
    settings = result["settings"]
    spec = settings["spec"]
    lines = [
        f"detector: layer {spec['layer']}, on {spec['on']}, {spec['readout']}, k={spec['k']}; threshold "
        f"{settings['threshold']:.4f} keeps {settings['accept']:.0%} of in-task validation inputs",
        f"{'task':<10} {'side':<9} {'inputs':>6} {'flagged':>8} {'AUROC':>6}",
    ]
    for side, rows in (("in-task", result["in_task"]), ("held-out", result["held_out"])):
        for name, r in rows.items():
            auc = f"{r['auroc']:.3f}" if "auroc" in r else ""
            lines.append(f"{name:<10} {side:<9} {r['n']:>6} {r['flagged']:>8.1%} {auc:>6}")
    lines.append(f"all held-out against all in-task inputs: AUROC {result['auroc']:.3f}")
    if "leave_one_out" in result:
        each = ", ".join(f"{name} {value:.3f}" for name, value in result["leave_one_out"].items())
        mean = sum(result["leave_one_out"].values()) / len(result["leave_one_out"])
        lines.append(f"each in-task task left out in turn: AUROC {each}; mean {mean:.3f}")
    return "\n".join(lines)
