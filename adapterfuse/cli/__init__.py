"""The ``adapterfuse`` command line: one module per command, wired together by :mod:`.main`."""

from __future__ import annotations

from adapterfuse.cli.main import main

__all__ = ["main"]
