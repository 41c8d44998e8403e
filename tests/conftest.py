"""Shared fixtures: a tiny 2-layer Llama (hidden size 32) on the real tokenizer, a GLUE_DIR, and online mode
for the tests that talk to the local fake Hub. Plain helpers live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

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
