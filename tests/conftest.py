"""Shared fixtures: a tiny 2-layer Llama (hidden size 32) on the real tokenizer, and a GLUE_DIR fixture."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapterfuse.base import BaseModel, load_default_tokenizer, wrap_base


@pytest.fixture(scope="session")
def tokenizer():
    return load_default_tokenizer()


def make_tiny_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32, built from a config (random weights, seeded)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_base(tokenizer) -> BaseModel:
    return wrap_base(make_tiny_model(tokenizer, seed=0), tokenizer, "tiny-llama-0")


@pytest.fixture(scope="session")
def other_base(tokenizer) -> BaseModel:
    """Same shapes as ``tiny_base``, different weights: experts on it must be told apart."""
    return wrap_base(make_tiny_model(tokenizer, seed=1), tokenizer, "tiny-llama-1")


_WORDS = "the a movie film was great bad terrible fine dull plot actors story good awful wonderful boring".split()


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + " ."


def write_glue_dir(root: Path, n_train: int = 60, n_dev: int = 20, seed: int = 0) -> Path:
    """Write small files in the GLUE download-script layout (headers, CoLA without one, text labels)."""
    rng = random.Random(seed)

    def rows(n, make):
        return [make(i) for i in range(n)]

    specs = {
        "SST-2": ("sentence\tlabel", lambda i: f"{_sentence(rng)}\t{i % 2}"),
        "CoLA": (None, lambda i: f"src\t{i % 2}\t\t{_sentence(rng)}"),
        "MRPC": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                 lambda i: f"{i % 2}\t{i}\t{i + 1}\t{_sentence(rng)}\t{_sentence(rng)}"),
        "RTE": ("index\tsentence1\tsentence2\tlabel",
                lambda i: f"{i}\t{_sentence(rng)}\t{_sentence(rng)}\t{['entailment', 'not_entailment'][i % 2]}"),
        "STS-B": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                  lambda i: f"{i}\tg\tf\ty\t{i}\tn\tn\t{_sentence(rng)}\t{_sentence(rng)}\t{(i * 0.37) % 5:.3f}"),
    }
    for folder, (header, make) in specs.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("dev", n_dev)):
            lines = ([header] if header else []) + rows(n, make)
            (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture()
def glue_dir(tmp_path, monkeypatch) -> Path:
    root = write_glue_dir(tmp_path / "glue")
    monkeypatch.setenv("GLUE_DIR", str(root))
    return root
