"""Activation checkpointing when a run's largest step would not fit: the estimate, when it turns on, and
that the trained bytes do not depend on it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import adapterfuse.train.activations as activations
from adapterfuse.device import available_memory
from adapterfuse.surgery import shared_copy
from adapterfuse.train.activations import activation_bytes, checkpoint_if_needed
from adapterfuse.train.pe.options import PESpec
from adapterfuse.train.pe.train import train_pe_ensemble
from tests.helpers import tiny_config, tiny_data

WEIGHTS = "weights.safetensors"


def test_the_estimate_grows_with_tokens_width_and_depth():
    config = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    assert activation_bytes(config, 1) == (24 * 576 + 12 * 1536) * 30 * 4
    assert activation_bytes(config, 6400) == 6400 * activation_bytes(config, 1)
    gpt2_like = SimpleNamespace(hidden_size=576, intermediate_size=None, num_hidden_layers=30)
    assert activation_bytes(gpt2_like, 1) == (24 * 576 + 12 * 4 * 576) * 30 * 4


def test_free_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert available_memory(torch.device("cpu"), meminfo) == 1000 * 1024
    meminfo.write_text("MemTotal: 5 kB\n")
    assert available_memory(torch.device("cpu"), meminfo) is None
    assert available_memory(torch.device("cpu"), tmp_path / "missing") is None


def _checkpointed_layers(model) -> list[bool]:
    return [bool(getattr(layer, "gradient_checkpointing", False)) for layer in model.model.layers]


def test_turned_on_only_when_the_step_would_take_over_half_the_free_memory(tiny_base, monkeypatch, capsys):
    one_token = activation_bytes(tiny_base.model.config, 1)
    monkeypatch.setattr(activations, "available_memory", lambda device: 100 * one_token)
    small, large = shared_copy(tiny_base.model), shared_copy(tiny_base.model)
    assert not checkpoint_if_needed(small, 50) and not any(_checkpointed_layers(small))
    assert "activation checkpointing" not in capsys.readouterr().err
    assert checkpoint_if_needed(large, 51) and all(_checkpointed_layers(large))
    assert "activation checkpointing on" in capsys.readouterr().err  # said, not silent
    assert not any(_checkpointed_layers(tiny_base.model))  # the caller's base is untouched
    monkeypatch.setattr(activations, "available_memory", lambda device: None)
    assert not checkpoint_if_needed(shared_copy(tiny_base.model), 10**12)  # unknown memory: left as it is


@pytest.mark.parametrize("kind", ["batchensemble", "camero"])
def test_a_checkpointed_run_trains_the_same_bytes(tiny_base, tmp_path, monkeypatch, kind):
    data = tiny_data(tmp_path / "glue")
    spec = PESpec(kind, 3, tiny_config(dropout=0.1))  # dropout: the recomputation must replay its masks
    plain = train_pe_ensemble(tiny_base, "sst2", spec, out=tmp_path / "plain", data=data, progress=False)
    monkeypatch.setattr(activations, "available_memory", lambda device: 1)
    checked = train_pe_ensemble(tiny_base, "sst2", spec, out=tmp_path / "checked", data=data, progress=False)
    assert not plain.manifest["training"]["activation_checkpointing"]
    assert checked.manifest["training"]["activation_checkpointing"]
    assert (tmp_path / "plain" / WEIGHTS).read_bytes() == (tmp_path / "checked" / WEIGHTS).read_bytes()
