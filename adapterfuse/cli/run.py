"""``adapterfuse run RECIPE``: a whole comparison from one YAML recipe.

``run`` validates the whole recipe (keys, values, every combiner's options, experts already on disk)
before loading anything; ``--dry-run`` stops there and prints the plan.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from adapterfuse.cli.common import add_command, add_device_option, emit, set_verbosity


def register(subparsers: Any) -> None:
    """Add the ``run`` subcommand to an ``add_subparsers()`` object."""
    p = add_command(
        subparsers,
        "run",
        help="run a YAML recipe: experts, every backend, one comparison",
        description="Train (or reuse) the recipe's experts, fit each combiner on the "
        "validation split, evaluate everything on one harness and write "
        "results.json, results.md and the accuracy-vs-cost plot. A rerun "
        "resumes: finished experts and results are reused.",
    )
    p.add_argument("recipe", type=Path, help="recipe file (see recipes/)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print the plan; load nothing")
    add_device_option(p, default=None)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``adapterfuse run``.

    Returns:
        0 on success.

    Raises:
        AdapterFuseError: an invalid recipe, incompatible experts, or a failing step.
    """
    from adapterfuse.recipe.plan import plan
    from adapterfuse.recipe.runner import run_recipe
    from adapterfuse.recipe.schema import load_recipe

    set_verbosity(args)
    recipe = load_recipe(args.recipe)
    out = args.out or Path("runs") / recipe.name
    steps = plan(recipe, out)
    if args.dry_run:
        text = "\n".join([f"recipe {recipe.name}: valid; run folder {out}", *(f"  {s}" for s in steps)])
        emit(args, text, {"recipe": recipe.name, "valid": True, "out": str(out), "plan": steps})
        return 0
    summary = run_recipe(recipe, out, device=args.device)  # step lines go to stderr through adapterfuse.progress
    wrote = ", ".join(str(out / f) for f in summary["files"])
    text = f"{(out / 'results.md').read_text()}\nwall time {summary['wall_s']:.0f} s; wrote {wrote}"
    emit(args, text, {**summary, "out": str(out)})
    return 0
