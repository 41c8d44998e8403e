"""The docs cannot drift: every code block of README.md and docs/*.md runs or is checked against the code.

How a block is treated is described in tests/docs_blocks.py: Python blocks run on the tiny model, shell
blocks' ``adapterfuse`` commands go through the real parser, signature blocks are compared with
``inspect.signature``; a skipped block names its reason.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from pathlib import Path

import pytest

import adapterfuse
import adapterfuse.base
from adapterfuse.train.expert import train_expert
from tests.docs_blocks import PAGES, SHELLS, blocks, commands, setup_experts
from tests.fake_hub_server import FakeHub
from tests.helpers import tiny_config, write_glue_dir

ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
RUN_PAGES = [p for p in PAGES if any(b.lang == "python" and b.marker is None for b in blocks(p))]
MAX_SKIPS = 3  # a skip is an exception: each one is a block no user can check either


def _id(page: Path) -> str:
    return page.name


@pytest.fixture(scope="module")
def doc_glue(tmp_path_factory) -> Path:
    # enough training rows for the default carve of 200 validation examples, and some left to train on
    return write_glue_dir(tmp_path_factory.mktemp("doc_glue"), n_train=240, n_dev=24)


@pytest.fixture(scope="module")
def expert_store(tmp_path_factory, tiny_base, doc_glue):
    """``experts/<task>[-s<seed>]`` trained on the tiny model once, on demand."""
    root = tmp_path_factory.mktemp("doc_experts")

    def get(name: str) -> Path:
        folder = root / name
        if not folder.is_dir():
            task, _, seed = Path(name).name.partition("-s")
            config = tiny_config(seed=int(seed or 0))
            data = adapterfuse.load_task(
                task, config.validation_size, config.seed, config.max_train_examples, glue_dir=doc_glue
            )
            train_expert(tiny_base, task, config, out=folder, data=data, progress=False)
        return folder

    return get


def _tiny_everywhere(monkeypatch, tiny_base) -> None:
    """Every ``load_base`` the package imported answers with the tiny model, whatever the spec."""
    real = adapterfuse.base.load_base

    def tiny(spec=None, dtype=None):
        return tiny_base

    for name, module in list(sys.modules.items()):
        if (name == "adapterfuse" or name.startswith("adapterfuse.")) and getattr(module, "load_base", None) is real:
            monkeypatch.setattr(module, "load_base", tiny)


@pytest.mark.parametrize("page", RUN_PAGES, ids=_id)
def test_python_blocks_run_on_the_tiny_model(
    page, tmp_path, monkeypatch, tiny_base, doc_glue, expert_store, hub_online
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLUE_DIR", str(doc_glue))
    for name in setup_experts(page):
        shutil.copytree(expert_store(name), tmp_path / name)
    _tiny_everywhere(monkeypatch, tiny_base)
    namespace: dict = {"__name__": "__doc_example__"}
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_doc_test_token")
        for block in blocks(page):
            if block.lang != "python" or block.marker is not None:
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(block.text, block.where, "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{block.where}: the example fails: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in SHELLS], ids=lambda b: b.where)
def test_shell_commands_parse_with_the_real_parser(block):
    from adapterfuse.cli import main as cli_main

    build = getattr(cli_main, "build_parser", None) or cli_main._build_parser
    for args in commands(block):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build().parse_args(args)
        except SystemExit as e:
            if e.code:
                raise AssertionError(f"{block.where}: adapterfuse {' '.join(args)}\n{err.getvalue()}") from None


def test_markers_are_known_and_skips_are_rare_and_justified():
    skips = [b for b in ALL_BLOCKS if b.marker == "skip"]
    assert len(skips) <= MAX_SKIPS, [b.where for b in skips]
    for b in skips:
        assert b.reason.startswith("(") and b.reason.endswith(")") and len(b.reason) > 8, b.where
    for b in ALL_BLOCKS:
        assert b.marker in (None, "skip", "signatures", "listing"), f"{b.where}: unknown marker {b.marker!r}"
        if b.marker in ("signatures", "listing"):
            assert b.lang == "python", f"{b.where}: a {b.marker} block is Python"
    for page in PAGES:
        for name in setup_experts(page):
            assert name.startswith("experts/"), f"{page.name}: setup expert {name!r} is not under experts/"


def test_listings_parse():
    import ast

    for b in ALL_BLOCKS:
        if b.marker in ("listing", "signatures") or (b.lang == "python" and b.marker is None):
            try:
                ast.parse(b.text) if b.marker != "signatures" else None
            except SyntaxError as e:
                raise AssertionError(f"{b.where}: {e}") from None
