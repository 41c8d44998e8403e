"""The ``adapterfuse`` command line: train, evaluate, merge, ensemble, route, run recipes, push.

Bad arguments exit with status 2 and one line naming the argument; an adapterfuse error exits 1 with
its one-line message; neither prints a traceback (``ADAPTERFUSE_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from pydantic import ValidationError

from adapterfuse.cli import check_serving, ensemble, evaluate, merge, push, route, run, train
from adapterfuse.cli.common import Parser
from adapterfuse.errors import AdapterFuseError, ConfigError


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="adapterfuse", description="Train, combine and evaluate LoRA/AdaLoRA experts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (train, evaluate, merge, ensemble, route, run, push, check_serving):
        command.register(sub)
    return parser


# Warnings libraries raise on every adapter load that say nothing a user can act on.
_LIBRARY_NOISE = (
    r"The PEFT config's `base_model_name_or_path` was renamed",
    r"`is_gradient_checkpointing` is deprecated",
    r"Unable to fetch remote file due to the following error",
    r"Could not find a config file in",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adapterfuse`` console script.

    Returns:
        The exit status: 0 ok, 1 an adapterfuse error, 2 bad arguments, 130 interrupted (Ctrl-C).
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
    except KeyboardInterrupt:
        if os.environ.get("ADAPTERFUSE_DEBUG"):
            raise
        print(
            f"adapterfuse {args.command}: interrupted; {_AFTER_INTERRUPT.get(args.command, _NOTHING_KEPT)}",
            file=sys.stderr,
        )
        return 130


# Outputs are written to a temporary folder and renamed into place, so an interrupted command leaves no
# half-written output; training keeps its last checkpoint, and a recipe run its finished steps.
_NOTHING_KEPT = "no output was written (outputs appear only when complete); run the command again"
_AFTER_INTERRUPT = {
    "train": "the last checkpoint is kept; run the same command again to resume from it",
    "run": "finished experts and results are kept; run the same command again to resume where it stopped",
}


def _pydantic_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "config"
    return str(ConfigError(f"{where}: {err['msg']} (got {err.get('input')!r})"))


if __name__ == "__main__":
    sys.exit(main())
