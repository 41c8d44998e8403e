"""``adapterfuse run RECIPE``: a whole comparison from one YAML recipe.

``run`` validates the whole recipe (keys, values, every combiner's options, experts already on disk)
before loading anything; ``--dry-run`` stops there and prints the plan.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``run`` subcommand to an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "run",
        help="run a YAML recipe: experts, every backend, one comparison",
        description="Train (or reuse) the recipe's experts, fit each combiner on the "
        "validation split, evaluate everything on one harness and write "
        "results.json, results.md and the accuracy-vs-cost plot. A rerun "
        "resumes: finished experts and results are reused.",
    )
    p.add_argument("recipe", type=Path, help="recipe file (see recipes/)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<recipe name>)")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print the plan; load nothing")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``adapterfuse run``.

    Returns:
        0 on success.

    Raises:
        AdapterFuseError: an invalid recipe, incompatible experts, or a failing step.
    """
    from adapterfuse.recipe.runner import plan, run_recipe
    from adapterfuse.recipe.schema import load_recipe

    recipe = load_recipe(args.recipe)
    out = args.out or Path("runs") / recipe.name
    steps = plan(recipe, out)
    if args.dry_run:
        print(f"recipe {recipe.name}: valid; run folder {out}")
        print("\n".join(f"  {s}" for s in steps))
        return 0
    summary = run_recipe(recipe, out)  # its step lines go to stderr through adapterfuse.progress
    print((out / "results.md").read_text())
    print(f"wall time {summary['wall_s']:.0f} s; wrote {', '.join(str(out / f) for f in summary['files'])}")
    return 0
