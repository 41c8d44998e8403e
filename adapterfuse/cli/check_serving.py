"""``adapterfuse check-serving FOLDER``: whether vLLM can serve a LoRA folder as written."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from adapterfuse.cli.common import add_command, emit, note, set_verbosity


def register(subparsers: Any) -> None:
    """Add the ``check-serving`` subcommand to an ``add_subparsers()`` object."""
    check = add_command(
        subparsers,
        "check-serving",
        help="check a LoRA folder against vLLM's loading rules",
        description="Apply vLLM's rules to a PEFT LoRA folder (required fields, refused features, module "
        "names of the base's architecture, one scale lora_alpha/r, every rank within r and the slot) and "
        "print the --max-lora-rank to serve it with. Exit status 1 when a rule is broken.",
    )
    check.add_argument("folder", type=Path, help="the PEFT LoRA folder to check (a merged adapter, an expert, any)")
    check.add_argument(
        "--max-lora-rank", type=int, default=None, help="vLLM's --max-lora-rank (default: the least holding r)"
    )
    check.add_argument(
        "--architecture",
        default=None,
        help="the base's architecture, e.g. LlamaForCausalLM (default: read from the base's config on disk)",
    )
    check.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``adapterfuse check-serving``: one line per broken rule on stderr, a summary on stdout.

    Raises:
        ConfigError: a folder that is not a PEFT LoRA folder, or a ``--max-lora-rank`` vLLM refuses.
    """
    from adapterfuse.serving import check_serving

    set_verbosity(args)
    report = check_serving(args.folder, max_lora_rank=args.max_lora_rank, architecture=args.architecture)
    for line in report.notes:
        note(f"note: {line}")
    for problem in report.problems:
        print(f"adapterfuse check-serving: {problem}", file=sys.stderr)
    ranks = sorted(set(report.ranks.values()))
    text = f"{report.folder}: {len(report.ranks)} modules, ranks {ranks}, r={report.r}, " + (
        f"servable by vLLM with --max-lora-rank {report.max_lora_rank}" if report.ok else "not servable as written"
    )
    emit(args, text, {**asdict(report), "folder": str(report.folder), "ok": report.ok})
    return 0 if report.ok else 1
