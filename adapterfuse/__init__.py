"""adapterfuse: train one LoRA/AdaLoRA expert per task, then ensemble, merge or route them.

The public API, one name each::

    import adapterfuse

    base = adapterfuse.load_base()
    merged = adapterfuse.merge(["experts/sst2", "experts/rte"], method="ties", density=0.2)

Each name is imported from its module on first use, so that ``import adapterfuse`` (and the command
line's ``--help``) does not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adapterfuse._version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from adapterfuse.backends.ensemble.config import EnsembleConfig
    from adapterfuse.backends.ensemble.fit import ensemble
    from adapterfuse.backends.merge.api import merge
    from adapterfuse.backends.merge.config import MergeConfig
    from adapterfuse.backends.route.api import route
    from adapterfuse.backends.route.config import RouteConfig
    from adapterfuse.base import BaseModel, load_base
    from adapterfuse.errors import AdapterFuseError
    from adapterfuse.expert import Expert
    from adapterfuse.feature_detector import FeatureDetector
    from adapterfuse.guarded import guard
    from adapterfuse.harness import ExpertPredictor, OraclePredictor, ZeroShotPredictor, evaluate
    from adapterfuse.library import ExpertLibrary
    from adapterfuse.loading import load_predictor
    from adapterfuse.recipe.runner import run_recipe
    from adapterfuse.tasks.glue import TASKS, get_task, load_task
    from adapterfuse.tasks.spec import TaskSpec
    from adapterfuse.train.config import TrainConfig
    from adapterfuse.train.expert import train_expert

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "EnsembleConfig": "adapterfuse.backends.ensemble.config",
    "ensemble": "adapterfuse.backends.ensemble.fit",
    "merge": "adapterfuse.backends.merge.api",
    "MergeConfig": "adapterfuse.backends.merge.config",
    "route": "adapterfuse.backends.route.api",
    "RouteConfig": "adapterfuse.backends.route.config",
    "BaseModel": "adapterfuse.base",
    "load_base": "adapterfuse.base",
    "AdapterFuseError": "adapterfuse.errors",
    "Expert": "adapterfuse.expert",
    "FeatureDetector": "adapterfuse.feature_detector",
    "guard": "adapterfuse.guarded",
    "ExpertPredictor": "adapterfuse.harness",
    "OraclePredictor": "adapterfuse.harness",
    "ZeroShotPredictor": "adapterfuse.harness",
    "evaluate": "adapterfuse.harness",
    "ExpertLibrary": "adapterfuse.library",
    "load_predictor": "adapterfuse.loading",
    "run_recipe": "adapterfuse.recipe.runner",
    "TASKS": "adapterfuse.tasks.glue",
    "get_task": "adapterfuse.tasks.glue",
    "load_task": "adapterfuse.tasks.glue",
    "TaskSpec": "adapterfuse.tasks.spec",
    "TrainConfig": "adapterfuse.train.config",
    "train_expert": "adapterfuse.train.expert",
}

__all__ = [
    "TASKS",
    "AdapterFuseError",
    "BaseModel",
    "EnsembleConfig",
    "Expert",
    "ExpertLibrary",
    "ExpertPredictor",
    "FeatureDetector",
    "MergeConfig",
    "OraclePredictor",
    "RouteConfig",
    "TaskSpec",
    "TrainConfig",
    "ZeroShotPredictor",
    "__version__",
    "ensemble",
    "evaluate",
    "get_task",
    "guard",
    "load_base",
    "load_predictor",
    "load_task",
    "merge",
    "route",
    "run_recipe",
    "train_expert",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562) and keep it here.

    Raises:
        AttributeError: a name the package does not export.
    """
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
