"""The interface that makes the backends interchangeable, and the registry of backends.

A *combiner* is a backend (merge, ensemble, route) with a validated config; fitted on an expert library
and the validation split, it yields a :class:`~adapterfuse.predictor.Predictor`. :data:`BACKENDS` maps
each backend's name to its config model and its combiner class (listed here, nothing is discovered), so
the API, the CLI and a recipe validate a backend's options through the same model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pydantic import BaseModel as PydanticModel

from adapterfuse.backends.ensemble.config import EnsembleConfig
from adapterfuse.backends.ensemble.fit import EnsembleCombiner
from adapterfuse.backends.merge.api import MergeCombiner
from adapterfuse.backends.merge.config import MergeConfig
from adapterfuse.backends.options import validate_options
from adapterfuse.backends.route.api import RouteCombiner
from adapterfuse.backends.route.config import RouteConfig
from adapterfuse.base import BaseModel
from adapterfuse.errors import ConfigError
from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import MultiTaskData, Predictor


class Combiner(Protocol):
    """A backend: a recipe that turns an expert library into a predictor."""

    name: str

    def fit(self, library: ExpertLibrary, validation: MultiTaskData | None) -> Predictor:
        """Fit on the validation split only (never on test)."""
        ...


BACKENDS: dict[str, tuple[type[PydanticModel], Any]] = {
    "merge": (MergeConfig, MergeCombiner),
    "ensemble": (EnsembleConfig, EnsembleCombiner),
    "route": (RouteConfig, RouteCombiner),
}
"""Backend name -> (its config model, its combiner class ``(base, config, members) -> Combiner``)."""


def backend_config(backend: str, options: Mapping[str, Any]) -> PydanticModel:
    """Validate a backend's options with its config model.

    Args:
        backend: a key of :data:`BACKENDS`.
        options: the options as given.

    Returns:
        The validated config.

    Raises:
        ConfigError: an unknown backend, or a bad option (the same message the API gives).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: unknown; expected one of {', '.join(BACKENDS)}")
    return validate_options(BACKENDS[backend][0], options, backend)


def make_combiner(
    backend: str, base: BaseModel, options: Mapping[str, Any], members: Sequence[str] | None = None
) -> Combiner:
    """A backend's combiner with validated options.

    Args:
        backend: a key of :data:`BACKENDS`.
        base: the frozen base.
        options: the backend's options.
        members: names of the library's experts to use (default: all).

    Raises:
        ConfigError: an unknown backend, or a bad option.
    """
    return BACKENDS[backend][1](base, backend_config(backend, options), members)
