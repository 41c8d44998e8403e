"""What every command shares: a one-line-error parser, argument types, the output options and sources.

Output convention, the same on every command: results go to stdout, as a human-readable table or
summary, or with ``--json`` as one JSON document for machines; progress, notes and errors go to stderr
(``-q`` keeps only errors, ``-v`` adds detail). This module imports neither torch nor the config models,
so that ``--help`` answers at once; the defaults it shows come from :mod:`adapterfuse.cli.fields`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

from adapterfuse.cli.fields import FIELDS
from adapterfuse.errors import ConfigError

HUB_PREFIX = "hf://"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, unless the help already states it or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or action.nargs == 0:
            return text
        return f"{text} (default %(default)s)"


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


def add_command(subparsers: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """Add one command's parser, with the output options every command shares (``--json``, ``-q``, ``-v``).

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.
        name: the command's name.
        help: one line for ``adapterfuse --help``.
        description: the command's own ``--help`` text.

    Returns:
        The new parser.
    """
    p = subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
    out = p.add_argument_group("output (results on stdout, progress and notes on stderr)")
    out.add_argument("--json", action="store_true", help="print the results as one JSON document instead of a table")
    loud = out.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes; errors only")
    loud.add_argument("-v", "--verbose", action="store_true", help="more detail on stderr")
    return p


def set_verbosity(args: argparse.Namespace) -> None:
    """Apply ``-q``/``-v`` (see :func:`adapterfuse.progress.set_verbosity`)."""
    from adapterfuse.progress import set_verbosity as apply

    apply("quiet" if getattr(args, "quiet", False) else "verbose" if getattr(args, "verbose", False) else "normal")


def emit(args: argparse.Namespace, text: str, record: Any) -> None:
    """Print a command's results on stdout: ``record`` as JSON with ``--json``, else ``text``.

    Args:
        args: the parsed arguments (``args.json``).
        text: the human-readable table or summary.
        record: what ``--json`` prints (JSON-serialisable; paths become strings).
    """
    if getattr(args, "json", False):
        print(json.dumps(record, indent=2, default=str))
    else:
        print(text)


def note(message: str) -> None:
    """A note on stderr (hidden by ``-q``)."""
    from adapterfuse.progress import status

    status(message)


def source(text: str | None, flag: str) -> str | None:
    """A ``--base``/``--experts`` value as the loaders take it: a local path, or a Hub id.

    ``hf://owner/name`` always names a Hub repo. A value that exists locally is a path. A missing value
    that looks local (``./x``, ``/x``, ``~/x``, ``a/b/c``, a ``.gguf`` file, or ``dir/x`` where ``dir``
    exists here) is an error rather than a silent Hub download; anything else (``owner/name``, ``gpt2``)
    goes to the loader as a Hub id.

    Raises:
        ConfigError: a missing local path, or a malformed ``hf://`` id.
    """
    if text is None:
        return None
    if text.startswith(HUB_PREFIX):
        repo = text[len(HUB_PREFIX) :]
        if not _HUB_ID.match(repo):
            raise ConfigError(f"{flag} {text!r}: expected hf://owner/name, got {repo!r} after hf://")
        return repo
    path = Path(text).expanduser()
    if path.exists():
        return text
    parts = Path(text).parts
    local = (
        text.startswith((".", "/", "~", os.sep))
        or len(parts) > 2
        or path.suffix in (".gguf", ".safetensors", ".bin")
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )
    if local:
        raise ConfigError(
            f"{flag} {text!r}: no such file or folder here ({Path.cwd()}); check the path, or write "
            f"{HUB_PREFIX}{text} if you mean the Hugging Face Hub repo of that name"
        )
    return text


def add_config_options(parser: Any, backend: str, options: dict[str, tuple[Any, str]]) -> None:
    """Add one flag per config field (``top_k`` -> ``--top-k``) whose value reaches the namespace only when given.

    The model, not argparse, holds the defaults and the checks: a flag left out is left to the model's
    default, and a bad value fails in the model with the message the API gives. The help shows the
    model's choices and default (from :data:`adapterfuse.cli.fields.FIELDS`).

    Args:
        parser: the (sub)parser or argument group.
        backend: ``merge``, ``ensemble`` or ``route`` (its config model's fields).
        options: field -> (argparse type, help text).
    """
    for field, (kind, text) in options.items():
        info = FIELDS[backend][field]
        shown = f"one of {', '.join(info['choices'])}; " if info["choices"] else ""
        parser.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            type=kind,
            default=argparse.SUPPRESS,
            help=f"{text} ({shown}default {info['default']})",
        )


def add_config_switch(parser: Any, field: str, text: str) -> None:
    """``--field-name``: sets a boolean config field to true; only given, it reaches the namespace (the
    config model defaults it, off)."""
    parser.add_argument(
        "--" + field.replace("_", "-"),
        dest=field,
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"{text} (default off)",
    )


def add_no_autocast_option(group: Any) -> None:
    """``--no-autocast``: score in fp32; only given, it reaches the namespace (the config model defaults it)."""
    group.add_argument(
        "--no-autocast",
        dest="autocast",
        action="store_false",
        default=argparse.SUPPRESS,
        help="score in fp32 instead of bf16 autocast",
    )


def add_verify_option(parser: argparse.ArgumentParser) -> None:
    """``--no-verify``: load expert folders whose files no longer match their manifest (shared by every command
    that loads experts)."""
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="load expert folders whose files no longer match their manifest.json (changed after saving)",
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
