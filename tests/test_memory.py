"""PeakMemory: the rise of resident memory inside a block, however briefly it lasts."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import memory
from benchmarks.memory import PeakMemory


def _spike(mib: int, hold_s: float = 0.0) -> None:
    x = torch.ones(mib * 2**20 // 4)  # written, so its pages are resident
    time.sleep(hold_s)
    del x


def test_a_freed_allocation_still_counts_and_an_idle_block_does_not():
    with PeakMemory() as peak:
        _spike(256)
    assert 240 <= peak.mib < 400 and peak.gib == pytest.approx(peak.mib / 1024)
    with PeakMemory() as idle:
        pass
    assert idle.mib < 32


def test_sampling_fallback_where_the_high_water_mark_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(memory, "_reset_high_water_mark", lambda: False)
    with PeakMemory() as peak:
        _spike(256, hold_s=0.05)  # held longer than the 2 ms sampling period
    assert 240 <= peak.mib < 400
