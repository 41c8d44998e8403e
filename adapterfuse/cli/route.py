"""``adapterfuse route``: fit a router over experts, evaluate it on the tasks' test split, save it.

Wired into ``adapterfuse.cli`` by ``register(subparsers)``; :func:`run` raises adapterfuse errors for
``cli.main`` to print as one line. Every check that needs no weight runs before the base is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from adapterfuse.backends.route.features import DEFAULT_LAYER, ON, READOUTS
from adapterfuse.backends.route.routers.learned import TARGETS
from adapterfuse.cli.common import positive_int

HELP = "route each input to its top-k experts (learned, clustered, mbc, arrow), then pool or merge them"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``route`` command to an ``argparse`` sub-parsers object.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new sub-parser (its ``handler`` default is :func:`run`).
    """
    p = subparsers.add_parser("route", help=HELP, description=(
        "Fit a router on the validation split of --tasks (no task id at test time), evaluate it on their test "
        "split (and on --eval-tasks, test only), print the table with routing accuracy, and save it."))
    p.add_argument("--experts", nargs="+", required=True, type=Path, help="expert folders")
    p.add_argument("--router", default="learned", choices=["learned", "clustered", "mbc", "arrow"])
    p.add_argument("--top-k", type=positive_int, default=1, help="experts kept per input (per token for arrow)")
    p.add_argument("--then", default="ensemble", choices=["ensemble", "merge"], help="pool or merge the chosen")
    p.add_argument("--on", default="prompt", choices=list(ON), help="route on the prompt or the raw input fields")
    p.add_argument("--tasks", required=True, help="comma-separated tasks (fit on validation, score on test)")
    p.add_argument("--eval-tasks", default=None, help="extra tasks scored on their dev split only (held out)")
    p.add_argument("--out", required=True, type=Path, help="route folder to write")
    p.add_argument("--base", default=None, help="base model: Hub id, folder, .gguf file (default SmolLM2-135M)")
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="feature layer (0 embeddings, -1 last)")
    p.add_argument("--readout", default="mean", choices=list(READOUTS),
                   help="features: the mean over tokens, or the mean and the last token's state")
    p.add_argument("--target", default="best_expert", choices=list(TARGETS), help="what the learned router learns")
    p.add_argument("--prior-weight", type=float, default=None,
                   help="--target task_prior: weight of the prior towards the task's expert (default: cross-validated)")
    p.add_argument("--cv-folds", type=int, default=5, help="folds of that cross-validation")
    p.add_argument("--pca", type=int, default=None, help="learned router: project features onto this many principal "
                   "components first (the text's shape passes through)")
    p.add_argument("--decision", default="probability", choices=["probability", "utility"],
                   help="keep the most probable experts, or (learned, --target task) those of highest expected "
                   "validation score under the task posterior")
    p.add_argument("--hidden", type=int, default=0, help="hidden size of the learned router (0: linear)")
    p.add_argument("--clusters", type=positive_int, default=None, help="k-means clusters (default: experts)")
    p.add_argument("--mbc-clusters", type=positive_int, default=None, help="expert groups for --router mbc")
    p.add_argument("--mbc-router", default=None, choices=["learned", "clustered", "arrow"])
    p.add_argument("--sketch", type=positive_int, default=None, help="MBC similarity from a sketch of this side")
    p.add_argument("--temperature", type=float, default=1.0, help="Arrow's softmax temperature")
    p.add_argument("--budget", type=positive_int, default=None, help="keep at most this many experts (greedy)")
    p.add_argument("--pooling", default="linear", choices=["linear", "log_linear"])
    p.add_argument("--validation-size", type=int, default=200, help="examples carved from train for validation")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the validation carve (the experts' --seed)")
    p.add_argument("--max-eval-examples", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--no-autocast", action="store_true", help="score in fp32 instead of bf16 autocast")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means, the router fit, sketches")
    p.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (weights_only load)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=run)
    return p


def _held_out(names: str | None, max_examples: int | None, seed: int) -> list[Any]:
    """Tasks evaluated on their dev split only (their train split is never read)."""
    from adapterfuse.tasks.glue import load_held_out, parse_tasks

    return [load_held_out(task, max_examples, seed) for task in (parse_tasks(names) if names else [])]


def run(args: argparse.Namespace) -> int:
    """Fit, evaluate (printing ``harness.results_table`` and routing accuracy) and save a router.

    Returns:
        0 on success.

    Raises:
        AdapterFuseError: bad arguments (checked before the base is loaded), incompatible experts,
            missing data, or an existing ``--out`` without ``--overwrite``.
    """
    from adapterfuse.backends.route.api import check_arguments, route, routing_accuracy
    from adapterfuse.backends.route.predictor import RoutePredictor
    from adapterfuse.backends.route.routers.learned import check_fit_options
    from adapterfuse.base import load_base
    from adapterfuse.harness import evaluate, results_table
    from adapterfuse.io.atomic import check_output, write_json
    from adapterfuse.library import ExpertLibrary
    from adapterfuse.tasks.glue import load_task, parse_tasks

    tasks = parse_tasks(args.tasks)
    across = args.mbc_router or "learned"
    kind = across if args.router == "mbc" else args.router
    check_arguments(args.router, args.top_k, args.then, args.on, args.target, args.pooling, len(args.experts),
           args.mbc_clusters, across, kind != "arrow" or args.budget is not None, True, None, args.decision)
    check_fit_options(args.prior_weight, args.cv_folds, args.pca)
    check_output(args.out, args.overwrite)
    library = ExpertLibrary.load(args.experts, allow_pickle=args.allow_pickle)
    for note in library.notes:
        print(note, file=sys.stderr)
    base = load_base(args.base)
    library.check(base.fingerprint)
    data = [load_task(t, args.validation_size, args.data_seed, max_test=args.max_eval_examples) for t in tasks]
    predictor = route(library, base, args.router, args.top_k, args.then, validation=data, on=args.on,
                      layer=args.layer, readout=args.readout, target=args.target, hidden=args.hidden,
                      prior_weight=args.prior_weight, cv_folds=args.cv_folds, pca=args.pca,
                      decision=args.decision,
                      clusters=args.clusters, mbc_clusters=args.mbc_clusters, mbc_router=across, sketch=args.sketch,
                      temperature=args.temperature, budget=args.budget, pooling=args.pooling, seed=args.seed,
                      batch_size=args.batch_size, autocast=not args.no_autocast)
    scored = data + _held_out(args.eval_tasks, args.max_eval_examples, args.data_seed)
    result = evaluate(predictor, scored, split="test", max_examples=args.max_eval_examples)
    result["route"] = {"experts": predictor.names, "info": predictor.info}
    print(results_table([result]))
    if isinstance(predictor, RoutePredictor):
        accuracy = routing_accuracy(predictor, scored, "test", args.max_eval_examples)
        result["routing_accuracy"] = accuracy
        shown = "n/a" if accuracy["oracle"] is None else f"{accuracy['oracle']:.3f}"
        print(f"routing accuracy against the oracle (test): {shown}")
    predictor.save(args.out, overwrite=args.overwrite)
    write_json(args.out / "results.json", result)
    print(f"saved {args.out}")
    return 0
