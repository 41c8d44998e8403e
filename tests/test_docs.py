"""The docs cannot drift: every code block of README.md and docs/*.md runs or is checked against the code.

How a block is treated is described in tests/docs_blocks.py: Python blocks run on the tiny model, shell
blocks' ``adapterfuse`` commands go through the real parser, signature blocks are compared with
``inspect.signature``; a skipped block names its reason.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import shutil
import sys
from pathlib import Path

import pytest

import adapterfuse
import adapterfuse.base
from adapterfuse.train.expert import train_expert
from tests.docs_blocks import PAGES, ROOT, SHELLS, blocks, commands, setup_experts
from tests.fake_hub_server import FakeHub
from tests.helpers import tiny_config, write_glue_dir

ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
RUN_PAGES = [p for p in PAGES if any(b.lang == "python" and b.marker is None for b in blocks(p))]
MAX_SKIPS = 3  # a skip is an exception: each one is a block no user can check either


def _id(page: Path) -> str:
    return page.name


@pytest.fixture(scope="module")
def doc_glue(tmp_path_factory) -> Path:
    # 8 validation examples are carved from each task's training rows (see _tiny_everywhere)
    return write_glue_dir(tmp_path_factory.mktemp("doc_glue"), n_train=40, n_dev=12)


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


def _substitute(monkeypatch, real, fake) -> None:
    """Put ``fake`` wherever a package module holds ``real`` (they import functions by name)."""
    for name in adapterfuse.__all__:  # resolve the lazy public names first, so that they are patched and restored
        getattr(adapterfuse, name)
    for name, module in list(sys.modules.items()):
        if name == "adapterfuse" or name.startswith("adapterfuse."):
            for attr, value in list(vars(module).items()):
                if value is real:
                    monkeypatch.setattr(module, attr, fake)


def _tiny_everywhere(monkeypatch, tiny_base) -> None:
    """The substitutions of tests/docs_blocks.py: the tiny model, small task data, fp32."""
    import adapterfuse.head
    import adapterfuse.tasks.glue

    real_task, real_autocast = adapterfuse.tasks.glue.load_task, adapterfuse.head.autocast_context

    def tiny_base_for(spec=None, dtype=None):
        return tiny_base

    def small_task(task, validation_size=200, seed=0, max_train=None, max_test=None, glue_dir=None):
        return real_task(task, min(validation_size, 8), seed, max_train, min(max_test or 8, 8), glue_dir)

    def fp32(enabled, device="cpu"):
        return real_autocast(False, device)

    _substitute(monkeypatch, adapterfuse.base.load_base, tiny_base_for)
    _substitute(monkeypatch, real_task, small_task)
    _substitute(monkeypatch, real_autocast, fp32)


@pytest.mark.parametrize("page", RUN_PAGES, ids=_id)
def test_python_blocks_run_on_the_tiny_model(
    page, tmp_path, monkeypatch, tiny_base, doc_glue, expert_store, hub_online
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLUE_DIR", str(doc_glue))
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")  # pages speak from a clone's root
    for name in setup_experts(page):
        shutil.copytree(expert_store(name), tmp_path / name)
    _tiny_everywhere(monkeypatch, tiny_base)
    namespace: dict = {"__name__": "__doc_example__"}
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_doc_test_token")
        for block in blocks(page):
            if block.marker == "file":
                (tmp_path / block.reason).write_text(block.text + "\n")
                continue
            if block.lang != "python" or block.marker is not None:
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(block.text, block.where, "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{block.where}: the example fails: {type(e).__name__}: {e}") from e


def _parse_error(args: list[str]) -> str | None:
    """What the real ``adapterfuse`` parser says against ``args``; ``None`` when it accepts them."""
    cli_main = importlib.import_module("adapterfuse.cli.main")
    build = getattr(cli_main, "build_parser", None) or cli_main._build_parser
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build().parse_args(args)
    except SystemExit as e:
        return err.getvalue().strip() or f"exit {e.code}" if e.code else None
    return None


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in SHELLS], ids=lambda b: b.where)
def test_shell_commands_parse_with_the_real_parser(block):
    for args in commands(block):
        error = _parse_error(args)
        assert error is None, f"{block.where}: adapterfuse {' '.join(args)}\n{error}"


def test_the_parser_check_refuses_a_flag_that_does_not_exist():
    assert _parse_error(["merge", "--experts", "a", "b", "--out", "m"]) is None
    assert "--densty" in _parse_error(["merge", "--experts", "a", "b", "--densty", "0.2", "--out", "m"])


def test_markers_are_known_and_skips_are_rare_and_justified():
    skips = [b for b in ALL_BLOCKS if b.marker == "skip"]
    assert len(skips) <= MAX_SKIPS, [b.where for b in skips]
    for b in skips:
        assert b.reason.startswith("(") and b.reason.endswith(")") and len(b.reason) > 8, b.where
    for b in ALL_BLOCKS:
        assert b.marker in (None, "skip", "signatures", "listing", "file"), f"{b.where}: unknown marker {b.marker!r}"
        if b.marker in ("signatures", "listing"):
            assert b.lang == "python", f"{b.where}: a {b.marker} block is Python"
    for page in PAGES:
        for name in setup_experts(page):
            assert name.startswith("experts/"), f"{page.name}: setup expert {name!r} is not under experts/"


def test_listings_and_skipped_blocks_are_python():
    for b in ALL_BLOCKS:
        if b.lang == "python" and b.marker in ("listing", "skip"):
            try:
                ast.parse(b.text)
            except SyntaxError as e:
                raise AssertionError(f"{b.where}: {e}") from None
