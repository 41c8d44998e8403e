"""The ``adapterfuse`` command line: train, evaluate, merge, ensemble, route, run recipes, push.

Bad arguments exit with status 2 and one line naming the argument; an adapterfuse error, or a file that
cannot be read or written, exits 1 with one line; neither prints a traceback (``ADAPTERFUSE_DEBUG=1``
shows it). adapterfuse's warnings (something recovered or skipped) are one line each too.

Building the parser imports no torch, transformers or peft (each command imports them in its ``run``),
so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext, redirect_stdout
from typing import Any

from pydantic import ValidationError

from adapterfuse._version import __version__
from adapterfuse.cli import check_serving, detect, ensemble, evaluate, merge, push, route, run, train
from adapterfuse.cli.common import Parser
from adapterfuse.distributed import is_main
from adapterfuse.errors import AdapterFuseError, AdapterFuseWarning, ConfigError
from adapterfuse.progress import set_verbosity


def build_parser() -> argparse.ArgumentParser:
    """The ``adapterfuse`` parser with every command (imports no model library).

    Returns:
        The parser; each command's parser is in its ``add_subparsers`` action's ``choices``.
    """
    parser = Parser(
        prog="adapterfuse",
        description="Train, combine and evaluate LoRA/AdaLoRA experts. Every command prints its results on "
        "stdout (a table or summary; --json for one JSON document) and progress on stderr (-q: errors only).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for command in (train, evaluate, merge, ensemble, route, run, push, check_serving, detect):
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
    args = build_parser().parse_args(argv)
    for noise in _LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=noise)
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning(args.command)
    if not is_main():  # under a multi-process launch every process computes; the main one reports
        set_verbosity("quiet")
    try:
        with nullcontext() if is_main() else redirect_stdout(io.StringIO()):
            return args.handler(args)
    except (AdapterFuseError, ValidationError, OSError) as e:
        if os.environ.get("ADAPTERFUSE_DEBUG"):
            raise
        if isinstance(e, AdapterFuseError):
            message = str(e).splitlines()[0]
        elif isinstance(e, OSError):
            message = _os_line(e)
        else:
            message = _pydantic_line(e)
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
    finally:
        warnings.formatwarning = previous_format


# Outputs are written to a temporary folder and renamed into place, so an interrupted command leaves no
# half-written output; training keeps its last checkpoint, and a recipe run its finished steps.
_NOTHING_KEPT = "no output was written (outputs appear only when complete); run the command again"
_AFTER_INTERRUPT = {
    "train": "the last checkpoint is kept; run the same command again to resume from it",
    "run": "finished experts and results are kept; run the same command again to resume where it stopped",
}


def _os_line(e: OSError) -> str:
    """An OS error (a file not readable or writable) as one line naming the path and the error."""
    reason = e.strerror or str(e) or type(e).__name__
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{reason}; check that path (free disk space, permissions), then run the command again"


def _one_line_warning(command: str) -> Callable[..., str]:
    """A ``warnings.formatwarning`` that prints adapterfuse's own warnings as one line."""
    default = warnings.formatwarning

    def format_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
        if issubclass(category, AdapterFuseWarning):
            return f"adapterfuse {command}: warning: {message}\n"
        return default(message, category, *args, **kwargs)

    return format_warning


def _pydantic_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "config"
    return str(ConfigError(f"{where}: {err['msg']} (got {err.get('input')!r})"))


if __name__ == "__main__":
    sys.exit(main())
