"""What a task is, independent of any benchmark: how it is posed to the LM, its examples and its splits.

A task is a prompt template whose answer is the next token, read over the task's label words (one
token each, in class-id order); a regression task reads its score as the expectation over them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from adapterfuse.errors import ConfigError


@dataclass(frozen=True)
class Example:
    """One input: its text fields, its gold label (class id, or a float for regression), its row."""

    fields: tuple[str, ...]
    label: int | float
    idx: int


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task is posed to the LM and scored.

    Attributes:
        name: our task name (``sst2``, ``mnli_mm`` …).
        folder: its folder under ``GLUE_DIR``.
        hub_config: its config name in ``nyu-mll/glue``.
        hub_fields: the Hub's column names of the text fields, in template order.
        tsv_fields: the same columns in the GLUE_DIR files (header names, or indices for CoLA).
        tsv_label: the label column (name or index).
        template: the prompt, with ``{0}``, ``{1}`` for the fields; it ends right before the answer.
        label_words: one word per class, in class-id order; each must be one token of the tokenizer.
        metrics: official metric names (see :mod:`adapterfuse.tasks.metrics`).
        text_labels: GLUE_DIR label strings -> class id, for files that spell labels out.
        regression: the label is a float read as the expectation over the label words' values.
        test_file, hub_test_split: the dev file / split used as our test split.
        family: the training task whose expert answers this task (``mnli`` for ``mnli_mm``).
    """

    name: str
    folder: str
    hub_config: str
    hub_fields: tuple[str, ...]
    tsv_fields: tuple[str | int, ...]
    tsv_label: str | int
    template: str
    label_words: tuple[str, ...]
    metrics: tuple[str, ...]
    text_labels: dict[str, int] = field(default_factory=dict)
    regression: bool = False
    test_file: str = "dev.tsv"
    hub_test_split: str = "validation"
    family: str = ""
    has_header: bool = True

    @property
    def n_labels(self) -> int:
        """Number of label words (classes, or score levels for regression)."""
        return len(self.label_words)

    @property
    def train_task(self) -> str:
        """The task whose training data and expert serve this task."""
        return self.family or self.name

    def prompt(self, fields: tuple[str, ...]) -> str:
        """The prompt for one example's fields."""
        return self.template.format(*(" ".join(f.split()) for f in fields))


@dataclass
class TaskData:
    """One task's three splits: ``train`` (fit experts), ``validation`` (fit combiners), ``test`` (dev)."""

    task: TaskSpec
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def check_disjoint(tasks: Iterable[TaskData] | None) -> None:
    """Refuse validation examples whose input also appears in the same task's test split.

    Whatever a combiner fits on validation (λ, a soup, weights, a router) must not have seen the test
    inputs it is scored on. Examples are compared by their text fields, so a copy of a test row
    carried into validation under another index or label is caught too.

    Args:
        tasks: the tasks given as validation data (``None`` or an empty test split: nothing to check).

    Raises:
        ConfigError: naming the task, how many validation examples overlap the test split, and the fix.
    """
    for data in tasks or []:
        if not isinstance(data, TaskData) or not data.test or not data.validation:
            continue
        test_inputs = {e.fields for e in data.test}
        overlap = sum(e.fields in test_inputs for e in data.validation)
        if overlap:
            raise ConfigError(
                f"validation: {overlap} of {len(data.validation)} validation examples of task {data.task.name} "
                "also appear in its test split, expected none (a combiner fitted on them is scored on what it "
                "saw); carve validation from train (load_task) or drop those examples"
            )


def capped_subset(examples: list[Example], cap: int | None, seed: int) -> list[Example]:
    """A seeded subset of at most ``cap`` examples, kept in file order."""
    if cap is None or cap >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), cap))
    return [examples[i] for i in keep]
