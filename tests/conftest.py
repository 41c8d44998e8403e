"""Shared fixtures: a tiny 2-layer Llama (hidden size 32) on the real tokenizer, a GLUE_DIR, and online mode
for the tests that talk to the local fake Hub. Plain helpers live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import adapterfuse.base
import adapterfuse.train.expert
from adapterfuse.base import BaseModel, load_default_tokenizer, wrap_base
from tests.helpers import make_tiny_model, write_glue_dir


@pytest.fixture(scope="session")
def tokenizer():
    return load_default_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tokenizer) -> BaseModel:
    return wrap_base(make_tiny_model(tokenizer, seed=0), tokenizer, "tiny-llama-0")


@pytest.fixture(scope="session")
def other_base(tokenizer) -> BaseModel:
    """Same shapes as ``tiny_base``, different weights: experts on it must be told apart."""
    return wrap_base(make_tiny_model(tokenizer, seed=1), tokenizer, "tiny-llama-1")


@pytest.fixture()
def glue_dir(tmp_path, monkeypatch) -> Path:
    root = write_glue_dir(tmp_path / "glue")
    monkeypatch.setenv("GLUE_DIR", str(root))
    return root


@pytest.fixture()
def hub_online(monkeypatch) -> None:
    """Let the Hugging Face client make requests (to the local fake Hub) even when the shell set offline mode."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # The client read HF_HUB_OFFLINE once, at import: unsetting the variable alone would not reach it.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if anything loads a base model or trains an expert (options must be checked first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a base model was loaded or an expert trained before the options were checked")

    monkeypatch.setattr(adapterfuse.base, "load_base", refuse)
    monkeypatch.setattr(adapterfuse.train.expert, "train_expert", refuse)


@pytest.fixture()
def hub_env(monkeypatch, tmp_path, hub_online):
    """A Hugging Face client of the test's own: online, no telemetry, its own HF_HOME, no HF_TOKEN."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture()
def hub(monkeypatch):
    """The fake Hub on 127.0.0.1 (tests/fake_hub_server.py), requiring ``TOKEN`` to write."""
    from huggingface_hub import constants, file_download

    from tests.fake_hub_server import TOKEN, FakeHub

    with FakeHub(require_token=TOKEN) as server:
        # huggingface_hub < 1.0 parses the URLs it gets back against these constants, not the endpoint passed;
        # later versions use the endpoint passed and ignore them.
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template, raising=False)
        yield server
