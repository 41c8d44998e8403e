"""The interface that makes the backends interchangeable: a :class:`Combiner` fitted into a predictor.

A *combiner* is a backend (merge, ensemble, route) with a validated config; fitted on an expert library
and the validation split, it yields a :class:`~adapterfuse.predictor.Predictor`.
"""

from __future__ import annotations

from typing import Protocol

from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import MultiTaskData, Predictor


class Combiner(Protocol):
    """A backend: a recipe that turns an expert library into a predictor."""

    name: str

    def fit(self, library: ExpertLibrary, validation: MultiTaskData | None) -> Predictor:
        """Fit on the validation split only (never on test)."""
        ...
