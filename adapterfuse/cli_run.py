"""``adapterfuse run RECIPE`` and ``adapterfuse push FOLDER REPO_ID``.

``run`` validates the whole recipe (keys, values, every combiner's options, experts already on disk)
before loading anything; ``--dry-run`` stops there and prints the plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``run`` and ``push`` subcommands to an ``add_subparsers()`` object."""
    p = subparsers.add_parser("run", help="run a YAML recipe: experts, every backend, one comparison",
                              description="Train (or reuse) the recipe's experts, fit each combiner on the "
                                          "validation split, evaluate everything on one harness and write "
                                          "results.json, results.md and the accuracy-vs-cost plot. A rerun "
                                          "resumes: finished experts and results are reused.")
    p.add_argument("recipe", type=Path, help="recipe file (see recipes/)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<recipe name>)")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print the plan; load nothing")
    p.set_defaults(handler=run)

    push = subparsers.add_parser("push", help="push a saved folder (expert, merged adapter) to the Hub",
                                 description="Upload every file of FOLDER to the model repo REPO_ID in one "
                                             "commit, retrying server errors with backoff, then verify it.")
    push.add_argument("folder", type=Path)
    push.add_argument("repo_id", help="owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--endpoint", default=None, help="Hub URL (default: huggingface.co or HF_ENDPOINT)")
    push.set_defaults(handler=push_cmd)


def run(args: argparse.Namespace) -> int:
    """Run ``adapterfuse run``.

    Returns:
        0 on success.

    Raises:
        AdapterFuseError: an invalid recipe, incompatible experts, or a failing step.
    """
    from adapterfuse.recipe import load_recipe, plan, run_recipe

    recipe = load_recipe(args.recipe)
    out = args.out or Path("runs") / recipe.name
    steps = plan(recipe, out)
    if args.dry_run:
        print(f"recipe {recipe.name}: valid; run folder {out}")
        print("\n".join(f"  {s}" for s in steps))
        return 0
    summary = run_recipe(recipe, out, log=lambda line: print(line, file=sys.stderr, flush=True))
    print((out / "results.md").read_text())
    print(f"wall time {summary['wall_s']:.0f} s; wrote {', '.join(str(out / f) for f in summary['files'])}")
    return 0


def push_cmd(args: argparse.Namespace) -> int:
    """Run ``adapterfuse push``.

    Raises:
        ConfigError: a missing folder; HubError: a refused or failing push (token never shown).
    """
    from adapterfuse.errors import ConfigError
    from adapterfuse.hub import push_folder

    if not args.folder.is_dir():
        raise ConfigError(f"push: folder {args.folder} not found; expected a saved expert or adapter folder")
    result = push_folder(args.folder, args.repo_id, private=args.private, endpoint=args.endpoint)
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0
