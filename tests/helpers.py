"""Small helpers shared by tests (tiny training configs and data)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from adapterfuse.tasks.glue import load_task
from adapterfuse.tasks.spec import TaskData
from adapterfuse.train.config import TrainConfig
from benchmarks.synthetic import random_expert as random_expert  # re-exported for the tests
from tests.conftest import write_glue_dir


def tiny_config(**overrides) -> TrainConfig:
    """A training config that runs in about a second on the tiny model."""
    values = dict(max_train_examples=48, batch_size=4, validation_size=8, epochs=1.0, lr=5e-3,
                  checkpoint_every=4, max_eval_examples=8, autocast=False, rank=4)
    values.update(overrides)
    return TrainConfig(**values)


def tiny_data(root: Path, task: str = "sst2", config: TrainConfig | None = None) -> TaskData:
    config = config or tiny_config()
    if not (root / "SST-2").exists():
        write_glue_dir(root)
    return load_task(task, config.validation_size, config.seed, config.max_train_examples, glue_dir=root)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def plain_peft_model(base_model, folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder)).eval()
