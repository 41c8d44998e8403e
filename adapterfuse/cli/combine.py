"""What the ``merge``, ``ensemble`` and ``route`` commands share: a one-combiner recipe run through the recipe runner.

Each command checks its options (by its backend's config model) and its output folder, then
:func:`fit_and_evaluate` loads the experts and the base and hands the recipe to
:func:`adapterfuse.recipe.runner.run_single`; :func:`save_and_print` saves the predictor with its
``results.json`` and prints the table (or, with ``--json``, the result).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from adapterfuse.cli.common import emit, note, source


def recipe_of(args: argparse.Namespace, backend: str, options: dict[str, Any]) -> Any:
    """The one-combiner recipe a command line describes (validated like a recipe file).

    Args:
        args: the parsed arguments (``tasks``, ``experts``, ``base``, ``validation_size``, ``max_eval_examples``).
        backend: ``merge``, ``ensemble`` or ``route``.
        options: the backend's options as given on the command line.

    Returns:
        The :class:`~adapterfuse.recipe.schema.Recipe`; every combiner fits on the whole validation carve.

    Raises:
        ConfigError: a ``--validation-size`` below 1, or an unknown task.
    """
    from adapterfuse.errors import ConfigError
    from adapterfuse.recipe.schema import Recipe
    from adapterfuse.tasks.glue import parse_tasks

    size = args.validation_size
    if size < 1:  # every combiner fits on (or is checked against) the validation carve
        raise ConfigError(f"--validation-size: expected >= 1, got {size}")
    return Recipe(
        name=backend,
        base=args.base,
        tasks={task.name: {} for task in parse_tasks(args.tasks)},
        experts={"paths": [str(p) for p in args.experts]},
        combiners=[{"backend": backend, "options": options}],
        harness={
            "validation_size": size,
            "validation_per_task": size,
            "max_test": args.max_eval_examples,
            "baselines": [],
        },
        outputs={"plots": False},
    )


def command_options(args: argparse.Namespace, model: Any, backend: str) -> tuple[Any, dict[str, Any]]:
    """The command's backend options (the flags named as ``model``'s fields), validated by that model.

    Args:
        args: the parsed arguments (``tasks`` and the backend's option flags).
        model: the backend's config model (``EnsembleConfig``, ``RouteConfig``).
        backend: its name, for the messages.

    Returns:
        The validated config and the options as given (what the one-combiner recipe records).

    Raises:
        ConfigError: an unknown task or a bad option (the message the API and a recipe give).
    """
    from adapterfuse.backends.options import validate_options
    from adapterfuse.tasks.glue import parse_tasks

    parse_tasks(args.tasks)
    given = {k: v for k, v in vars(args).items() if k in model.model_fields}
    return validate_options(model, given, backend), given


def checked_recipe(args: argparse.Namespace, backend: str, options: dict[str, Any]) -> Any:
    """:func:`recipe_of`, with ``--base`` and ``--out`` checked too: everything before anything is loaded.

    Raises:
        ConfigError: a bad ``--validation-size``, task or ``--base``.
        OutputExistsError: ``--out`` exists and ``--overwrite`` was not given.
    """
    from adapterfuse.io.atomic import check_output

    recipe = recipe_of(args, backend, options)
    source(args.base, "--base")
    check_output(args.out, args.overwrite)
    return recipe


def load_experts(args: argparse.Namespace, check: Callable[[Any], list[str]] | None = None) -> Any:
    """Load ``--experts`` (folders or Hub ids; no base yet), run the checks that need their names, print notes.

    Args:
        args: the parsed arguments (``experts``, ``allow_pickle``, ``no_verify``).
        check: the command's checks on the loaded library; returns more notes.

    Returns:
        The :class:`~adapterfuse.library.ExpertLibrary`.
    """
    from adapterfuse.library import load_library

    library = load_library(list(args.experts), None, args.allow_pickle, not getattr(args, "no_verify", False))
    for line in [*library.notes, *(check(library) if check else [])]:
        note(line)
    return library


def fit_and_evaluate(
    args: argparse.Namespace, recipe: Any, library: Any, held_out: Sequence[str] = (), score: bool = True
) -> tuple[Any, Any]:
    """Load the data, then the base; check the experts against it and run the recipe's one combiner.

    Args:
        args: the parsed arguments (``base``, ``data_seed``, ``device``).
        recipe: from :func:`recipe_of`.
        library: from :func:`load_experts`.
        held_out: tasks scored on their test split only.
        score: evaluate on the test split (else only fit).

    Returns:
        ``(run, base)``: the :class:`~adapterfuse.recipe.runner.SingleRun` (predictor, harness result,
        scored tasks) and the loaded base.

    Raises:
        DataError: missing task data (before the base is loaded); CompatibilityError: experts of another
            base; the runner's errors.
    """
    from adapterfuse.base import load_base
    from adapterfuse.recipe.runner import load_data, run_single

    data = load_data(recipe, args.data_seed)  # a missing GLUE file fails before the base is loaded
    base = load_base(source(args.base, "--base"), device=getattr(args, "device", "auto"))
    library.check(base.fingerprint)
    run = run_single(recipe, library, base, data, seed=args.data_seed, held_out=held_out, score=score)
    return run, base


def save_and_print(args: argparse.Namespace, predictor: Any, result: dict[str, Any], lines: Sequence[str]) -> None:
    """Save the predictor and ``results.json`` into ``--out``, then print the table and ``lines`` (or the JSON).

    Raises:
        OutputExistsError: ``--out`` appeared meanwhile and ``--overwrite`` is not given.
    """
    from adapterfuse.harness import results_table
    from adapterfuse.io.atomic import write_json

    predictor.save(args.out, overwrite=args.overwrite)
    write_json(args.out / "results.json", result)
    emit(args, "\n".join([results_table([result]), *lines, f"saved {args.out}"]), {**result, "out": str(args.out)})
