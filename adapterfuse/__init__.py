"""adapterfuse: train one LoRA/AdaLoRA expert per task, then ensemble, merge or route them.

The public API, one name each::

    import adapterfuse

    base = adapterfuse.load_base()
    merged = adapterfuse.merge(["experts/sst2", "experts/rte"], method="ties", density=0.2)
"""

from __future__ import annotations

from adapterfuse._version import __version__
from adapterfuse.backends.ensemble.config import EnsembleConfig
from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.backends.merge.api import merge
from adapterfuse.backends.merge.config import MergeConfig
from adapterfuse.backends.route.api import route
from adapterfuse.backends.route.config import RouteConfig
from adapterfuse.base import BaseModel, load_base
from adapterfuse.errors import AdapterFuseError
from adapterfuse.expert import Expert
from adapterfuse.harness import ExpertPredictor, OraclePredictor, ZeroShotPredictor, evaluate
from adapterfuse.library import ExpertLibrary
from adapterfuse.loading import load_predictor
from adapterfuse.recipe.runner import run_recipe
from adapterfuse.tasks.glue import TASKS, get_task, load_task
from adapterfuse.tasks.spec import TaskSpec
from adapterfuse.train.config import TrainConfig
from adapterfuse.train.expert import train_expert

__all__ = [
    "TASKS",
    "AdapterFuseError",
    "BaseModel",
    "EnsembleConfig",
    "Expert",
    "ExpertLibrary",
    "ExpertPredictor",
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
    "load_base",
    "load_predictor",
    "load_task",
    "merge",
    "route",
    "run_recipe",
    "train_expert",
]
