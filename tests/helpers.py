"""Small helpers shared by tests: the tiny model, GLUE-layout files, tiny training configs and data."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch
import yaml

from adapterfuse.tasks.glue import load_task
from adapterfuse.tasks.spec import TaskData
from adapterfuse.train.config import TrainConfig
from benchmarks.synthetic import random_expert as random_expert  # re-exported for the tests
from benchmarks.synthetic import tiny_llama

make_tiny_model = tiny_llama  # the tiny base of every test, built where the benchmarks build it too

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
        "MRPC": (
            "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            lambda i: f"{i % 2}\t{i}\t{i + 1}\t{_sentence(rng)}\t{_sentence(rng)}",
        ),
        "RTE": (
            "index\tsentence1\tsentence2\tlabel",
            lambda i: f"{i}\t{_sentence(rng)}\t{_sentence(rng)}\t{['entailment', 'not_entailment'][i % 2]}",
        ),
        "STS-B": (
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
            lambda i: f"{i}\tg\tf\ty\t{i}\tn\tn\t{_sentence(rng)}\t{_sentence(rng)}\t{(i * 0.37) % 5:.3f}",
        ),
    }
    for folder, (header, make) in specs.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("dev", n_dev)):
            lines = ([header] if header else []) + rows(n, make)
            (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def tiny_config(**overrides) -> TrainConfig:
    """A training config that runs in about a second on the tiny model."""
    values = dict(
        max_train_examples=48,
        batch_size=4,
        validation_size=8,
        epochs=1.0,
        lr=5e-3,
        checkpoint_every=4,
        max_eval_examples=8,
        autocast=False,
        rank=4,
    )
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


class Interrupt(Exception):
    """Raised by :func:`stop_at` to stop a training run the way a crash would."""


def stop_at(step_to_stop: int):
    """A training callback that raises :class:`Interrupt` at ``step_to_stop``."""

    def callback(step: int, loss: float) -> None:
        if step == step_to_stop:
            raise Interrupt

    return callback


TINY_TRAIN = {"batch_size": 4, "lr": 5e-3, "checkpoint_every": 4, "max_eval_examples": 8, "autocast": False}
"""Training settings of a tiny recipe's experts: a few steps, fp32, a checkpoint every 4."""


def write_tiny_recipe(tmp_path: Path, combiners: list[dict], **sections) -> Path:
    """A recipe file for the tiny model: sst2 and rte experts on 16 examples, the oracle, no plots;
    ``sections`` replace whole sections (``harness={...}``, ``experts={...}``)."""
    raw = {
        "name": "tiny",
        "tasks": {"sst2": {}, "rte": {}},
        "experts": {"rank": 4, "max_train": 16, "epochs": 1.0, "train": TINY_TRAIN},
        "harness": {"validation_size": 8, "validation_per_task": 8, "max_test": 10, "baselines": ["oracle"]},
        "combiners": combiners,
        "outputs": {"plots": False},
        **sections,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
