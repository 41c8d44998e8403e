"""adapterfuse: train one LoRA/AdaLoRA expert per task, then ensemble, merge or route them."""

from __future__ import annotations

__version__ = "0.1.0"

from adapterfuse import ensemble, merge, route  # callable packages: adapterfuse.merge(experts, ...)
from adapterfuse.base import BaseModel, load_base
from adapterfuse.errors import AdapterFuseError
from adapterfuse.expert import Expert
from adapterfuse.harness import OraclePredictor, ZeroShotPredictor, evaluate
from adapterfuse.library import ExpertLibrary
from adapterfuse.tasks.glue import TASKS, TaskSpec, get_task, load_task
from adapterfuse.train import train_expert
from adapterfuse.train_config import TrainConfig

__all__ = [
    "TASKS",
    "AdapterFuseError",
    "BaseModel",
    "Expert",
    "ExpertLibrary",
    "OraclePredictor",
    "TaskSpec",
    "TrainConfig",
    "ZeroShotPredictor",
    "__version__",
    "ensemble",
    "evaluate",
    "get_task",
    "load_base",
    "load_task",
    "merge",
    "route",
    "train_expert",
]
