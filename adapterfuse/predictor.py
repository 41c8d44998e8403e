"""What the harness measures, saves and loads: a :class:`Predictor` and its :class:`Cost`.

Every backend's fit returns a predictor; the harness measures predictors, whatever made them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from adapterfuse.tasks.spec import Example, TaskData, TaskSpec

MultiTaskData = dict[str, TaskData]
"""Task name -> its splits."""


@dataclass(frozen=True)
class Cost:
    """What a predictor costs to keep and to run.

    Attributes:
        stored_params: adapter parameters kept on top of the base (0 for the base itself).
        forward_passes: base forward passes per input (1 for one adapter, K for an unbatched ensemble;
            a batched K-member pass counts K because it does K rows of work).
        memory_bytes: bytes of the adapter parameters kept.
    """

    stored_params: int
    forward_passes: float
    memory_bytes: int

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


@runtime_checkable
class Predictor(Protocol):
    """What the harness measures."""

    name: str

    def predict_proba(self, task: TaskSpec, batch: list[Example]) -> torch.Tensor:
        """``[n, n_labels]`` probabilities over the task's label words."""
        ...

    def cost(self) -> Cost:
        """Stored parameters, base forward passes per input, memory."""
        ...

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """A folder (its files, then ``manifest.json``, atomically) that ``adapterfuse.load_predictor`` loads."""
        ...
