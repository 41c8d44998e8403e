"""The code blocks of README.md and docs/*.md, and the markers that tell the doc test how to run them.

A marker is an HTML comment (invisible on GitHub) on the last non-blank line before a block, or, for
``setup``, anywhere in the page:

- ``<!-- doc-test: skip (why) -->``: the block is not run; the reason is required.
- ``<!-- doc-test: signatures -->``: a block of signatures, each checked against ``inspect.signature``.
- ``<!-- doc-test: listing -->``: the outline of an interface (a ``Protocol``, a dataclass); only parsed.
- ``<!-- doc-test: file NAME -->``: the block is a file the page's examples read (a YAML config); it is
  written to ``NAME`` in the page's folder before the Python blocks after it run.
- ``<!-- doc-test: setup experts/sst2 experts/rte ... -->``: the page assumes these expert folders exist
  (``experts/<task>`` or ``experts/<task>-s<seed>``); the test trains them on the tiny model first.

Every other ``python`` block runs, in page order and in one namespace per page, in a folder holding
the setup experts and a copy of ``recipes/``, with these substitutions (tests/test_docs.py):

- every base model is the tiny 2-layer Llama of tests/helpers.py, whatever the spec;
- GLUE is a tiny GLUE_DIR, and ``load_task`` keeps at most 8 validation and 8 test examples per task;
- the frozen base runs in fp32 (bf16 autocast is slow on a CPU and changes nothing a page shows);
- the Hub is the local fake of tests/fake_hub_server.py (``HF_ENDPOINT``), with a made-up token.

Every ``adapterfuse`` command of a ``bash`` block is parsed by the real command-line parser.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*doc-test:\s*(\w+)\s*(.*?)\s*-->\s*$")
SHELLS = ("bash", "sh", "shell", "console")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # skip, signatures, listing or None
    reason: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, with the marker before each; an unclosed fence is an error."""
    found, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("````"):  # a four-backtick fence shows a file with code blocks inside: not code
            i = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("````")), len(lines)) + 1
            continue
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: a code block is never closed")
        if lines[end].strip() != "```":
            raise AssertionError(f"{page.relative_to(ROOT)}:{end + 1}: a block opens inside the block at {i + 1}")
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(before.strip())
        kind, reason = (marker.group(1), marker.group(2)) if marker and marker.group(1) != "setup" else (None, "")
        found.append(Block(page, i + 1, match.group(1), "\n".join(lines[i + 1 : end]), kind, reason))
        i = end + 1
    return found


def setup_experts(page: Path) -> list[str]:
    """The expert folders a page's ``setup`` markers ask for."""
    names = []
    for line in page.read_text(encoding="utf-8").splitlines():
        marker = _MARKER.match(line.strip())
        if marker and marker.group(1) == "setup":
            names += marker.group(2).split()
    return names


_SHELL_OPERATORS = ("|", "||", "&&", ";", "&", "<")


def commands(block: Block) -> list[list[str]]:
    """The ``adapterfuse`` command lines of a shell block, as argument lists (continuations joined)."""
    text = block.text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        # a redirection or a pipe ends the command: the rest is the shell's, not adapterfuse's
        cut = next((i for i, w in enumerate(words) if w in _SHELL_OPERATORS or w.startswith((">", "2>"))), None)
        words = words[:cut]
        if words and words[0] == "adapterfuse":
            found.append(words[1:])
    return found


def statements(text: str) -> list[str]:
    """A signature block's statements: lines joined while a bracket is open, comments dropped."""
    found, current, depth = [], [], 0
    for raw in text.splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", raw).rstrip()
        if not line.strip() and depth == 0:
            continue
        current.append(line.strip() if current else line)
        depth += sum(line.count(c) for c in "([{") - sum(line.count(c) for c in ")]}")
        if depth == 0:
            found.append(" ".join(current))
            current = []
    return found
