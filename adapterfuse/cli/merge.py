"""``adapterfuse merge``: merge expert folders into one adapter folder (or a full model).

``register(subparsers)`` adds the subcommand; ``run(args)`` executes it. Every check that needs no
weight (method, parameters, weight count, output folder) runs before the experts or the base are
read; the base is loaded only when something needs it (``--full``, ``--eval``, or validation data for a
λ search, a greedy soup or learned weights). A merge that reads task data runs as a one-combiner
recipe through the recipe runner, like ``ensemble`` and ``route``. Errors are
:mod:`adapterfuse.errors` exceptions, which the main CLI prints as one line with exit status 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from adapterfuse.cli.common import (
    add_command,
    add_device_option,
    add_verify_option,
    emit,
    positive_int,
    set_verbosity,
    source,
)
from adapterfuse.cli.fields import FIELDS
from adapterfuse.errors import ConfigError

HELP = "merge experts into one adapter (uniform, task_arithmetic, ties, dare_*, greedy_soup, learned)"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``merge`` subcommand to an ``add_subparsers()`` object.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``merge`` parser (its default ``handler`` is :func:`run`).
    """
    p = add_command(
        subparsers,
        "merge",
        help=HELP,
        description=(
            "Merge experts' ΔW into one plain PEFT LoRA adapter (or, with --full, a full model). Without "
            "--lambda, λ methods choose λ on the validation split of --tasks when given, else use λ = 1; "
            "--tasks is ignored by methods that fit nothing."
        ),
    )
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--experts", nargs="+", help="expert folders or Hub ids (owner/name, or hf://owner/name)")
    given.add_argument(
        "--config", type=Path, default=None, help="a mergekit YAML of LoRA adapters (replaces --experts, --method)"
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write")
    _add_method_options(p)
    p.add_argument("--full", action="store_true", help="write the merged full model instead of an adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--base", default=None, help="base model: folder, .gguf file or Hub id (default SmolLM2-135M)")
    _add_data_options(p)
    p.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (weights_only load)")
    add_verify_option(p)
    p.add_argument(
        "--push", default=None, metavar="REPO_ID", help="also push the folder to this Hub repo (default: no push)"
    )
    p.add_argument("--private", action="store_true", help="with --push: create the Hub repo private")
    p.add_argument(
        "--push-overwrite",
        action="store_true",
        help="with --push: replace files an earlier push of another folder left in the repo",
    )
    add_device_option(p)
    p.set_defaults(handler=run)
    return p


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """The method and its parameters: only those given reach the namespace; each method's parameter model
    holds the defaults and the checks."""
    method = FIELDS["merge"]["method"]
    p.add_argument(
        "--method",
        default=argparse.SUPPRESS,
        help=f"one of {', '.join(method['choices'])} (default {method['default']})",
    )
    p.add_argument(
        "--weights", default=argparse.SUPPRESS, help="comma-separated weights, one per expert (default: the method's)"
    )
    p.add_argument(
        "--density",
        type=float,
        default=argparse.SUPPRESS,
        help="kept fraction for TIES/DARE, in (0, 1] (default: the method's)",
    )
    p.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=argparse.SUPPRESS,
        help="scale λ of the summed update (default: chosen on the validation split of --tasks, else 1)",
    )
    p.add_argument(
        "--rank",
        type=_rank,
        default=argparse.SUPPRESS,
        help="output rank per module: N, auto (the smallest keeping --param energy=0.9 of the update) or exact "
        "(default: exact for linear and spectral methods, auto for TIES/DARE)",
    )
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="seed of every random choice (default 0)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another method parameter, e.g. mode=gradient_free, per_layer=true, exact_svd=false (repeatable)",
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """The task data a merge may fit on (validation split) and be scored on (test split)."""
    p.add_argument(
        "--tasks", default=None, help="comma-separated tasks whose validation split fits λ/soup/weights (default: none)"
    )
    p.add_argument("--validation-size", type=int, default=200, help="validation examples per task")
    p.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the validation carve; keep the experts' "
        "training seed (default 0) so that no validation example was trained on",
    )
    p.add_argument(
        "--eval",
        action="store_true",
        help="score the merge on the test split of --tasks (GLUE dev) "
        "and put the harness table in adapterfuse.json and the card",
    )
    p.add_argument(
        "--max-eval-examples",
        type=positive_int,
        default=None,
        help="cap on test examples per task with --eval (default: all)",
    )


def _rank(text: str) -> int | str:
    """argparse type of ``--rank``: a positive integer, ``auto`` or ``exact``."""
    if text in ("auto", "exact"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, auto or exact, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, auto or exact, got {value}")
    return value


def parse_weights(text: str | None) -> list[float] | None:
    """``"0.5,1,-0.2"`` -> floats (NaN/inf are refused later, by the method's parameter model).

    Raises:
        ConfigError: an empty list or a value that is not a number.
    """
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    try:
        values = [float(t) for t in items]
    except ValueError:
        raise ConfigError(f"--weights: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ConfigError("--weights: expected at least one number")
    return values


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["mode=gradient_free", "per_layer=true"]`` -> ``{"mode": "gradient_free", "per_layer": True}``.

    Values are read as YAML scalars (numbers, true/false, strings).

    Raises:
        ConfigError: an item without ``=`` or a key given twice.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--param: expected KEY=VALUE, got {item!r}")
        if key in out:
            raise ConfigError(f"--param: {key!r} given twice")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key] = value
    return out


def _check_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any], bool]:
    """Everything that needs no file: the options (by :class:`MergeConfig`), weight count, the output folder.

    Returns:
        ``(config, options, uses_validation)``: the options as given, and whether ``--tasks`` will be used.
    """
    from adapterfuse.backends.merge.config import MergeConfig, check_merge
    from adapterfuse.backends.options import validate_options
    from adapterfuse.io.atomic import check_output

    options = {k: getattr(args, k) for k in ("method", "density", "lam", "rank", "seed") if hasattr(args, k)}
    if hasattr(args, "weights"):
        options["weights"] = parse_weights(args.weights)
    params = parse_params(args.param)
    twice = sorted(set(options) & set(params))
    if twice:
        raise ConfigError(f"--param: {twice} also given as flags; give each parameter once")
    if args.validation_size < 1:
        raise ConfigError(f"--validation-size: expected >= 1, got {args.validation_size}")
    given = {**options, **params}
    config = validate_options(MergeConfig, given, "merge")
    check_merge(config, len(args.experts))
    if config.search is not None and not args.tasks:
        raise ConfigError(f"--method {config.method} fits on validation data: give --tasks (and --base)")
    if args.eval and not args.tasks:
        raise ConfigError("--eval: scores the merge on the test split of --tasks; give --tasks T1,T2,...")
    args.experts = [source(str(e), "--experts") for e in args.experts]
    source(args.base, "--base")
    check_output(args.out, args.overwrite)
    return config, given, bool(args.tasks) and (config.search is not None or config.lambda_search)


def run(args: argparse.Namespace) -> int:
    """Run ``adapterfuse merge``: print a summary (or ``--json``), save the adapter (and push it).

    Args:
        args: the parsed arguments of the ``merge`` subcommand.

    Returns:
        0 on success.

    Raises:
        AdapterFuseError: bad arguments, experts or base (nothing is written then).
    """
    set_verbosity(args)
    if getattr(args, "config", None) is not None:  # the file's adapters and options, as the flags they stand for
        args = _mergekit_args(args)
    config, given, uses_validation = _check_args(args)
    if uses_validation or args.eval:
        adapter, base = _fit(args, given)
    else:  # a plain weight merge: no task data; the base only to write a full model
        from adapterfuse.backends.merge.api import merge
        from adapterfuse.base import load_base

        base = load_base(source(args.base, "--base"), device=args.device) if args.full else None
        adapter = merge(args.experts, config, base=base, allow_pickle=args.allow_pickle, verify=not args.no_verify)
    path = adapter.save_pretrained(args.out, overwrite=args.overwrite, full=args.full, base=base)
    pushed = None
    if args.push:
        pushed = adapter.push_to_hub(
            args.push, full=args.full, base=base, saved=path, private=args.private, overwrite=args.push_overwrite
        )
    record = summary(adapter, path, args.push if pushed is not None else None)
    emit(args, summary_text(record), record)
    return 0


def _fit(args: argparse.Namespace, options: dict[str, Any]) -> tuple[Any, Any]:
    """A merge that reads task data, as a one-combiner recipe through the runner.

    λ, the soup or the weights are fitted on the validation split of ``--tasks`` when the method does;
    with ``--eval`` the harness result on their test split goes into the adapter's card and metadata.
    """
    from adapterfuse.cli.combine import fit_and_evaluate, load_experts, recipe_of

    recipe = recipe_of(args, "merge", options)
    run, base = fit_and_evaluate(args, recipe, load_experts(args), score=args.eval)
    adapter = run.predictor.adapter
    if run.result is not None:
        adapter.evaluation.append(run.result)
    return adapter, base


def summary(adapter: Any, path: Path, pushed_to: str | None = None) -> dict[str, Any]:
    """What the command prints: method, parameters, truncation error, output (and what validation chose)."""
    out: dict[str, Any] = {
        "method": adapter.method,
        "params": adapter.params,
        "experts": [s["name"] for s in adapter.sources],
        "truncation_error": adapter.overall_error,
        "adapter_params": adapter.num_params,
        "out": str(path),
    }
    lam = adapter.search.get("lambda_search")
    if lam:
        out["lambda"] = {"chosen": lam["chosen"], "grid": lam["grid"], "scores": lam["scores"]}
    if adapter.search.get("soup"):
        out["soup_kept"] = adapter.search["soup"]["kept"]
    if adapter.search.get("learned"):
        learned = adapter.search["learned"]
        out["learned"] = {
            "weights": learned["weights"],
            "loss_uniform": learned["loss_uniform"],
            "loss": learned["loss"],
        }
    if adapter.evaluation:
        out["evaluation"] = {t: m["score"] for t, m in adapter.evaluation[-1]["tasks"].items()}
        out["average"] = adapter.evaluation[-1]["average"]
    if pushed_to:
        out["pushed_to"] = pushed_to
    return out


def summary_text(record: dict[str, Any]) -> str:
    """The human-readable form of :func:`summary`: one ``key: value`` line each."""
    lines = []
    for key, value in record.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


_FLAGS = ("method", "weights", "density", "lam", "rank", "seed")


def _mergekit_args(args: argparse.Namespace) -> argparse.Namespace:
    """The ``merge`` command's arguments with ``--config FILE`` turned into the flags it stands for.

    Args:
        args: the parsed arguments; ``args.config`` is the mergekit file.

    Returns:
        A copy with ``experts``, the method flags and ``--param`` set from the file, and ``--base``
        defaulting to the file's ``base_model``.

    Raises:
        ConfigError: ``--config`` together with ``--experts``, a method flag or ``--param``; or a bad file.
    """
    given = [f"--{'lambda' if k == 'lam' else k}" for k in _FLAGS if hasattr(args, k)]
    given += ["--experts"] * bool(args.experts) + ["--param"] * bool(args.param)
    if given:
        raise ConfigError(
            f"--config: the mergekit file gives the adapters, the method and its parameters; drop {', '.join(given)}"
        )
    from adapterfuse.backends.merge.mergekit_yaml import read_mergekit

    plan = read_mergekit(args.config)
    raw = plan.config.params.model_dump(by_alias=True, exclude_unset=True)
    out = argparse.Namespace(**vars(args))
    out.experts, out.method = plan.experts, plan.config.method
    if raw.get("weights") is not None:
        out.weights = ",".join(repr(float(w)) for w in raw.pop("weights"))
    raw.pop("weights", None)
    for key in ("density", "rank", "seed"):
        if key in raw:
            setattr(out, key, raw.pop(key))
    if "lambda" in raw:
        out.lam = raw.pop("lambda")
    out.param = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(raw.items())]
    out.base = args.base or plan.base_model
    return out
