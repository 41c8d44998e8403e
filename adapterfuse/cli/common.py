"""What every command shares: a parser that reports errors in one line, and argument types."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel

from adapterfuse.backends.options import choices


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (shared by every subcommand)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def optional_int(text: str) -> int | None:
    """argparse type: an integer, or ``None`` for the words ``none``/``null`` (the option's unset value)."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {text!r}") from None


def add_config_options(
    parser: argparse.ArgumentParser, model: type[BaseModel], options: dict[str, tuple[Any, str]]
) -> None:
    """Add one flag per config field (``top_k`` -> ``--top-k``) whose value reaches the namespace only when given.

    The model, not argparse, holds the defaults and the checks: a flag left out is left to the model's
    default, and a bad value fails in the model with the message the API gives. The help shows the
    model's choices and default.

    Args:
        parser: the (sub)parser or argument group.
        model: the backend's config model.
        options: field -> (argparse type, help text).
    """
    for field, (kind, text) in options.items():
        info = model.model_fields[field]
        known = choices(info.annotation)
        shown = f"one of {', '.join(known)}; " if known else ""
        parser.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            type=kind,
            default=argparse.SUPPRESS,
            help=f"{text} ({shown}default {info.default})",
        )


def add_device_option(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """Add ``--device``: where the base runs (checked when the base is loaded, see :mod:`adapterfuse.device`).

    Args:
        parser: the subcommand's parser.
        default: the value when the flag is left out (``None``: the command takes it from elsewhere).
    """
    shown = default or "the recipe's device (auto unless set)"
    parser.add_argument(
        "--device",
        default=default,
        help=f"where the base runs: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default {shown})",
    )
