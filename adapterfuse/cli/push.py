"""``adapterfuse push FOLDER REPO_ID``: upload a saved folder to the Hub in one commit."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from adapterfuse.cli.common import add_command, emit, set_verbosity


def register(subparsers: Any) -> None:
    """Add the ``push`` subcommand to an ``add_subparsers()`` object."""
    push = add_command(
        subparsers,
        "push",
        help="push a saved folder (expert, merged adapter) to the Hub",
        description="Upload every file of FOLDER to the model repo REPO_ID in one "
        "commit, retrying server errors with backoff, then verify it.",
    )
    push.add_argument("folder", type=Path, help="the saved folder to upload")
    push.add_argument("repo_id", help="the Hub model repo, owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the repo's content: delete files it holds that FOLDER lacks, in the same commit",
    )
    push.add_argument("--endpoint", default=None, help="Hub URL (default: huggingface.co or HF_ENDPOINT)")
    push.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``adapterfuse push``.

    Raises:
        ConfigError: a missing folder; HubError: a refused or failing push (token never shown).
    """
    from adapterfuse.errors import ConfigError
    from adapterfuse.io.hub import push_folder

    set_verbosity(args)
    if not args.folder.is_dir():
        raise ConfigError(f"push: folder {args.folder} not found; expected a saved expert or adapter folder")
    result = push_folder(
        args.folder, args.repo_id, private=args.private, overwrite=args.overwrite, endpoint=args.endpoint
    )
    record = dataclasses.asdict(result)
    emit(args, f"pushed {args.folder} to {result.repo_id}: {result.commit_url} ({len(result.files)} files)", record)
    return 0
