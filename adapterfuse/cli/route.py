"""``adapterfuse route``: fit a router over experts, evaluate it on the tasks' test split, save it.

Wired into ``adapterfuse.cli`` by ``register(subparsers)``; :func:`run` runs a one-combiner recipe
through the recipe runner and raises adapterfuse errors for ``cli.main`` to print as one line. Every
check that needs no weight runs before the base is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from adapterfuse.cli.common import (
    add_command,
    add_config_options,
    add_config_switch,
    add_device_option,
    add_no_autocast_option,
    add_verify_option,
    optional_int,
    positive_int,
    set_verbosity,
)

OPTIONS: dict[str, tuple[Any, str]] = {
    "router": (str, "how inputs are routed"),
    "top_k": (int, "experts kept per input (per token for arrow)"),
    "then": (str, "pool or merge the chosen experts"),
    "on": (str, "route on the prompt or on the raw input fields"),
    "layer": (int, "feature layer (0 embeddings, -1 last)"),
    "readout": (str, "features: the mean over tokens, or the mean and the last token's state"),
    "target": (str, "what the learned router learns"),
    "prior_weight": (float, "target task_prior: weight of the prior towards the task's expert (None: cross-validated)"),
    "cv_folds": (int, "folds of that cross-validation"),
    "pca": (optional_int, "learned router: project features onto this many principal components first"),
    "decision": (str, "most probable experts, or (learned, target task) highest expected validation score"),
    "hidden": (int, "hidden size of the learned router (0: linear)"),
    "epochs": (int, "full-batch training steps of the learned router"),
    "lr": (float, "learning rate of the learned router"),
    "clusters": (optional_int, "k-means clusters (None: the number of experts)"),
    "cluster_temperature": (float, "softmax temperature of each cluster's expert distribution"),
    "mbc_clusters": (optional_int, "expert groups for --router mbc"),
    "mbc_router": (str, "the router across MBC groups (None: learned)"),
    "mbc_merge": (str, "how an MBC group is merged"),
    "sketch": (optional_int, "MBC similarity from a sketch of this side (None: exact)"),
    "temperature": (float, "Arrow's softmax temperature"),
    "abstain": (float, "share of validation inputs the router is least sure of: inputs no surer are not routed"),
    "fallback": (str, "what an input the router abstains on gets"),
    "budget": (optional_int, "keep at most this many experts (greedy by validation gain)"),
    "pooling": (str, "pooling of the chosen experts"),
    "batch_size": (int, "inputs per batch"),
    "max_length": (int, "tokens per input"),
    "seed": (int, "seed of k-means, the router fit, sketches"),
}
"""Routing options the command takes: field of RouteConfig -> (argparse type, help)."""

HELP = "route each input to its top-k experts (learned, clustered, mbc, arrow), then pool or merge them"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``route`` command to an ``argparse`` sub-parsers object.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new sub-parser (its ``handler`` default is :func:`run`).
    """
    p = add_command(
        subparsers,
        "route",
        help=HELP,
        description=(
            "Fit a router on the validation split of --tasks (no task id at test time), evaluate it on their test "
            "split (and on --eval-tasks, test only), print the table with routing accuracy, and save it."
        ),
    )
    p.add_argument("--experts", nargs="+", required=True, type=Path, help="expert folders")
    p.add_argument("--tasks", required=True, help="comma-separated tasks (fit on validation, score on test)")
    p.add_argument(
        "--eval-tasks", default=None, help="extra tasks scored on their dev split only (held out; default: none)"
    )
    p.add_argument("--out", required=True, type=Path, help="route folder to write")
    p.add_argument("--base", default=None, help="base model: folder, .gguf file or Hub id (default SmolLM2-135M)")
    p.add_argument("--validation-size", type=int, default=200, help="examples carved from train for validation")
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
    # The routing options: only those given reach the namespace; RouteConfig holds their defaults and checks.
    group = p.add_argument_group("routing options (checked and defaulted by RouteConfig)")
    add_config_options(group, "route", OPTIONS)
    add_config_switch(group, "emr", "route to each expert's EMR-Merging update (elected update, task mask, rescaler)")
    add_config_switch(
        group, "subtract_mean", "arrow: route by each expert's update minus the experts' mean (GenKnowSub)"
    )
    add_no_autocast_option(group)
    add_device_option(p)
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Fit, evaluate (printing ``harness.results_table`` and routing accuracy, or ``--json``) and save a router.

    Returns:
        0 on success.

    Raises:
        AdapterFuseError: bad arguments (checked before the base is loaded), incompatible experts,
            missing data, or an existing ``--out`` without ``--overwrite``.
    """
    from adapterfuse.backends.route.api import routing_accuracy
    from adapterfuse.backends.route.config import RouteConfig, check_route
    from adapterfuse.backends.route.predictor import RoutePredictor
    from adapterfuse.cli.combine import checked_recipe, command_options, fit_and_evaluate, load_experts, save_and_print
    from adapterfuse.tasks.glue import parse_tasks

    set_verbosity(args)
    held_out = [t.name for t in parse_tasks(args.eval_tasks)] if args.eval_tasks else []
    config, given = command_options(args, RouteConfig, "route")
    check_route(config, len(args.experts), has_data=True)
    recipe = checked_recipe(args, "route", given)
    done, _ = fit_and_evaluate(args, recipe, load_experts(args), held_out)
    predictor, result = done.predictor, done.result
    result["route"] = {"experts": predictor.names, "info": predictor.info}
    lines = []
    if isinstance(predictor, RoutePredictor):
        accuracy = routing_accuracy(predictor, done.scored, "test", args.max_eval_examples)
        result["routing_accuracy"] = accuracy
        shown = "n/a" if accuracy["oracle"] is None else f"{accuracy['oracle']:.3f}"
        lines.append(f"routing accuracy against the oracle (test): {shown}")
    save_and_print(args, predictor, result, lines)
    return 0
