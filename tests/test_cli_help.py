"""The command line's shared surface: help on every option, no model library at start-up, --version,
one output convention (a table or summary, or --json), -q/-v, local paths never taken for Hub ids, and
docs/cli.md listing what the parser has."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adapterfuse import __version__, progress
from adapterfuse.cli import main
from adapterfuse.cli.common import source
from adapterfuse.cli.fields import FIELDS, read_models
from adapterfuse.cli.main import build_parser
from adapterfuse.errors import ConfigError
from tests.helpers import random_expert

ROOT = Path(__file__).resolve().parents[1]


def commands() -> dict[str, argparse.ArgumentParser]:
    """Command name -> its parser, as ``adapterfuse`` builds them."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_has_help_and_the_output_options():
    missing = []
    for name, parser in {"adapterfuse": build_parser(), **commands()}.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest == "help":
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        parser.format_help()  # a stray % in a help text fails here
    assert not missing, f"options without help text: {missing}"
    for name, parser in commands().items():
        flags = {s for a in parser._actions for s in a.option_strings}
        assert {"--json", "-q", "-v"} <= flags, f"{name} lacks the shared output options"


def test_help_shows_the_config_models_defaults():
    assert FIELDS == read_models(), "cli/fields.py is stale: run `make cli-fields`"
    text = " ".join(commands()["route"].format_help().split())  # argparse wraps lines
    assert "default learned" in text and "one of learned, clustered, mbc, arrow" in text
    assert "default ties" in " ".join(commands()["merge"].format_help().split())


def test_help_and_version_import_no_model_library():
    code = (
        "import sys\n"
        "from adapterfuse.cli.main import build_parser\n"
        "from adapterfuse.cli.merge import register\n"
        "parser = build_parser()\n"
        "for sub in parser._actions[-1].choices.values(): sub.format_help()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"adapterfuse {__version__}"


@pytest.fixture(scope="module")
def experts(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-out")
    return [random_expert(tiny_base, f"e{i}", rank=2, seed=i, task="sst2").save(root / f"e{i}") for i in range(2)]


def test_one_output_convention_summary_or_json(experts, tmp_path, capsys):
    argv = ["merge", "--experts", *map(str, experts), "--method", "uniform", "--out"]
    assert main([*argv, str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("method: uniform\n") and f"out: {tmp_path / 'a'}" in text
    assert main([*argv, str(tmp_path / "b"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "uniform" and record["experts"] == ["e0", "e1"]


def test_quiet_and_verbose_set_the_verbosity(experts, tmp_path):
    from transformers.utils.logging import is_progress_bar_enabled

    argv = ["merge", "--experts", *map(str, experts), "--method", "uniform"]
    try:
        assert main([*argv, "--out", str(tmp_path / "q"), "-q"]) == 0 and progress.verbosity() == "quiet"
        assert not is_progress_bar_enabled()  # transformers' own "Loading weights" bar is hidden too
        assert main([*argv, "--out", str(tmp_path / "v"), "-v"]) == 0 and progress.verbosity() == "verbose"
        assert is_progress_bar_enabled()
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path / "qv"), "-q", "-v"])
    finally:
        progress.set_verbosity("normal")


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "--experts", "experts/sst2", "--method", "uniform", "--out", "o"],
        ["eval", "--tasks", "sst2", "--base", "models/tiny"],
        ["eval", "--tasks", "sst2", "--base", "./tiny"],
        ["train", "--task", "sst2", "--base", "base.gguf", "--out", "o"],
    ],
)
def test_a_missing_local_path_is_an_error_not_a_hub_id(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experts").mkdir()
    (tmp_path / "models").mkdir()
    monkeypatch.setattr("adapterfuse.base.load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such file or folder" in err and "hf://" in err
    assert not (tmp_path / "o").exists()


def test_hub_ids_are_named_plainly_or_with_hf_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert source("HuggingFaceTB/SmolLM2-135M", "--base") == "HuggingFaceTB/SmolLM2-135M"
    assert source("gpt2", "--base") == "gpt2" and source(None, "--base") is None
    (tmp_path / "experts").mkdir()
    assert source("hf://experts/sst2", "--experts") == "experts/sst2"
    with pytest.raises(ConfigError, match="expected hf://owner/name"):
        source("hf://not a repo", "--base")


def _doc_sections() -> dict[str, str]:
    text = (ROOT / "docs" / "cli.md").read_text()
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    return {p.split("\n", 1)[0].strip(): p for p in parts[1:]}


def test_docs_list_every_command_and_flag():
    text = (ROOT / "docs" / "cli.md").read_text()
    listed = re.search(r"adapterfuse \{([\w,-]+)\}", text)
    assert listed and listed.group(1).split(",") == list(commands()), "docs/cli.md's command list is stale"
    sections = _doc_sections()
    for name, parser in commands().items():
        assert name in sections, f"docs/cli.md has no '## {name}' section"
        flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        flags -= {"--json", "--quiet", "--verbose"}  # documented once, for every command
        undocumented = sorted(f for f in flags if f"`{f}" not in sections[name])
        assert not undocumented, f"docs/cli.md, {name}: flags not documented: {undocumented}"
