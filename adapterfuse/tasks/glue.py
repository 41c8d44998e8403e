"""GLUE tasks as prompts to one causal LM, answered by the next token over each task's label words.

Data comes from ``GLUE_DIR`` (the layout of the GLUE download script: ``$GLUE_DIR/SST-2/train.tsv``
…) or, when ``GLUE_DIR`` is unset, from the Hub dataset ``nyu-mll/glue``. Class ids follow the Hub's
label order, so both sources give the same labels. GLUE test labels are private: ``dev`` is our test
split, and a seeded validation split is carved out of ``train``.
"""

from __future__ import annotations

import csv
import io
import os
import random
import sys
import warnings
from pathlib import Path

from adapterfuse.errors import AdapterFuseWarning, ConfigError, DataError
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec, capped_subset

HUB_DATASET = "nyu-mll/glue"
csv.field_size_limit(sys.maxsize)


_YES_NO = (" no", " yes")
_NLI2 = {"entailment": 0, "not_entailment": 1}
_NLI_PROMPT = "Premise: {0}\nHypothesis: {1}\nDoes the premise entail the hypothesis? Answer:"
_MNLI = dict(
    folder="MNLI",
    hub_config="mnli",
    hub_fields=("premise", "hypothesis"),
    tsv_fields=("sentence1", "sentence2"),
    tsv_label="gold_label",
    template="Premise: {0}\nHypothesis: {1}\nDoes the premise entail the hypothesis? Answer yes, maybe or no:",
    label_words=(" yes", " maybe", " no"),
    metrics=("accuracy",),
    text_labels={"entailment": 0, "neutral": 1, "contradiction": 2},
)

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "cola",
            "CoLA",
            "cola",
            ("sentence",),
            (3,),
            1,
            "Sentence: {0}\nIs this sentence grammatically acceptable? Answer:",
            _YES_NO,
            ("mcc",),
            has_header=False,
        ),
        TaskSpec(
            "sst2",
            "SST-2",
            "sst2",
            ("sentence",),
            ("sentence",),
            "label",
            "Review: {0}\nIs the sentiment negative or positive? Answer:",
            (" negative", " positive"),
            ("accuracy",),
        ),
        TaskSpec(
            "mrpc",
            "MRPC",
            "mrpc",
            ("sentence1", "sentence2"),
            ("#1 String", "#2 String"),
            "Quality",
            "Sentence 1: {0}\nSentence 2: {1}\nDo both sentences mean the same thing? Answer:",
            _YES_NO,
            ("accuracy", "f1"),
        ),
        TaskSpec(
            "qqp",
            "QQP",
            "qqp",
            ("question1", "question2"),
            ("question1", "question2"),
            "is_duplicate",
            "Question 1: {0}\nQuestion 2: {1}\nDo both questions ask the same thing? Answer:",
            _YES_NO,
            ("accuracy", "f1"),
        ),
        TaskSpec(
            "stsb",
            "STS-B",
            "stsb",
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            "score",
            "Sentence 1: {0}\nSentence 2: {1}\nHow similar are they, from 0 to 5? Score: ",
            ("0", "1", "2", "3", "4", "5"),
            ("pearson", "spearman"),
            regression=True,
        ),
        TaskSpec(
            "rte",
            "RTE",
            "rte",
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            "label",
            _NLI_PROMPT,
            (" yes", " no"),
            ("accuracy",),
            text_labels=_NLI2,
        ),
        TaskSpec(
            "wnli",
            "WNLI",
            "wnli",
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            "label",
            _NLI_PROMPT,
            _YES_NO,
            ("accuracy",),
        ),
        TaskSpec(
            "qnli",
            "QNLI",
            "qnli",
            ("question", "sentence"),
            ("question", "sentence"),
            "label",
            "Question: {0}\nSentence: {1}\nDoes the sentence answer the question? Answer:",
            (" yes", " no"),
            ("accuracy",),
            text_labels=_NLI2,
        ),
        TaskSpec("mnli", test_file="dev_matched.tsv", hub_test_split="validation_matched", **_MNLI),
        TaskSpec(
            "mnli_mm", test_file="dev_mismatched.tsv", hub_test_split="validation_mismatched", family="mnli", **_MNLI
        ),
    ]
}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name.

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    key = name.strip().lower().replace("-", "")
    aliases = {"sts": "stsb", "sst": "sst2", "mnlimm": "mnli_mm", "mnli_m": "mnli"}
    key = aliases.get(key, key)
    if key not in TASKS:
        raise ConfigError(f"task {name!r}: unknown; expected one of {', '.join(TASKS)}")
    return TASKS[key]


def parse_tasks(names: str | list[str]) -> list[TaskSpec]:
    """Parse ``"sst2,rte"`` or a list of names into task specs (duplicates removed, order kept)."""
    items = names.split(",") if isinstance(names, str) else list(names)
    out: list[TaskSpec] = []
    for item in (i for i in items if i.strip()):
        task = get_task(item)
        if task not in out:
            out.append(task)
    if not out:
        raise ConfigError("tasks: expected at least one task name, got none; e.g. --tasks sst2,rte")
    return out


MAX_MALFORMED_SHARE = 0.01
"""Rows with too few columns are skipped with a warning up to this share of a file; above it, refused."""


def _parse_label(task: TaskSpec, raw: str, where: str) -> int | float:
    raw = raw.strip()
    try:
        if task.regression:
            score = float(raw)
        elif raw in task.text_labels:
            return task.text_labels[raw]
        else:
            value = int(raw)
    except ValueError:
        raise DataError(
            f"{where}: label {raw!r} is not valid for task {task.name}; expected "
            f"{sorted(task.text_labels) or ('a number' if task.regression else 'an integer class id')}"
        ) from None
    top = task.n_labels - 1
    if task.regression:
        if not 0 <= score <= top:  # also refuses nan and inf
            raise DataError(
                f"{where}: score {raw!r} out of range for task {task.name}; expected a number in 0 .. {top}"
            )
        return score
    if not 0 <= value <= top:
        raise DataError(f"{where}: label {value} out of range for task {task.name}; expected 0..{top}")
    return value


def _tsv_rows(path: Path) -> list[list[str]]:
    """The rows of a tab-separated file (no quoting).

    Raises:
        DataError: the file is not UTF-8 text, or holds NUL bytes (a binary file), or is empty.
    """
    layout = "expected the tab-separated text file of the GLUE download script"
    try:
        text = path.read_bytes().decode("utf-8-sig")  # newlines as they are: the csv reader splits rows
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded); {layout}") from None
    if "\x00" in text:
        raise DataError(f"{path}: holds NUL bytes, so it is a binary file; {layout}")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path}: empty; {layout}")
    return rows


def _skip_malformed(path: Path, malformed: list[int], total: int) -> None:
    """Warn once about rows with too few columns, or refuse the file when there are too many."""
    if not malformed:
        return
    lines = ", ".join(map(str, malformed[:5])) + (" …" if len(malformed) > 5 else "")
    if len(malformed) > MAX_MALFORMED_SHARE * total:
        raise DataError(
            f"{path}: {len(malformed)} of {total} rows have too few columns (lines {lines}); expected at most "
            f"{MAX_MALFORMED_SHARE:.0%} malformed rows; fix or re-download the file"
        )
    warnings.warn(
        f"{path}: skipped {len(malformed)} of {total} rows with too few columns (lines {lines})",
        AdapterFuseWarning,
        stacklevel=4,
    )


def _read_tsv(task: TaskSpec, path: Path) -> list[Example]:
    """Read one GLUE download-script file (tab-separated, no quoting).

    Raises:
        DataError: an unreadable, empty or example-less file, a missing column, a bad label, or too
            many malformed rows.
    """
    rows = _tsv_rows(path)
    first = 2 if task.has_header else 1  # the file line of rows[0] after the header
    if task.has_header:
        header, rows = rows[0], rows[1:]
        try:
            cols = [header.index(c) for c in (*task.tsv_fields, task.tsv_label)]
        except ValueError:
            raise DataError(
                f"{path}: header {header} lacks a column of {[*task.tsv_fields, task.tsv_label]}; "
                "expected the GLUE download-script layout"
            ) from None
    else:
        cols = [int(c) for c in (*task.tsv_fields, task.tsv_label)]
    out, malformed = [], []
    for i, row in enumerate(rows):
        if len(row) <= max(cols):
            malformed.append(i + first)  # a few GLUE files carry such rows; the official scripts skip them too
            continue
        label = row[cols[-1]]
        if label.strip() in ("", "-"):
            continue  # MNLI rows without a gold label
        out.append(Example(tuple(row[c] for c in cols[:-1]), _parse_label(task, label, f"{path}:{i + first}"), i))
    _skip_malformed(path, malformed, len(rows))
    if not out:
        raise DataError(
            f"{path}: no examples ({len(rows)} rows after the header, none usable); expected the GLUE "
            "download-script file of the task"
        )
    return out


def _read_hub(task: TaskSpec, split: str) -> list[Example]:
    """Read a split of ``nyu-mll/glue`` with the datasets library."""
    from datasets import load_dataset

    ds = load_dataset(HUB_DATASET, task.hub_config, split=split)
    return [
        Example(
            tuple(row[f] for f in task.hub_fields), float(row["label"]) if task.regression else int(row["label"]), i
        )
        for i, row in enumerate(ds)
    ]


def read_split(task: TaskSpec, split: str, glue_dir: str | os.PathLike | None = None) -> list[Example]:
    """Read the raw ``train`` or ``dev`` split of a task.

    Args:
        task: the task.
        split: ``"train"`` or ``"dev"``.
        glue_dir: a GLUE_DIR folder; defaults to ``$GLUE_DIR``; when neither is set, the Hub is used.

    Returns:
        The examples in file order.

    Raises:
        DataError: when the file is missing or the Hub cannot be reached, naming what was tried.
    """
    if split not in ("train", "dev"):
        raise ConfigError(f"split {split!r}: expected 'train' or 'dev'")
    root = glue_dir if glue_dir is not None else os.environ.get("GLUE_DIR")
    if root:
        path = Path(root) / task.folder / ("train.tsv" if split == "train" else task.test_file)
        if not path.is_file():
            raise DataError(
                f"task {task.name}: file {path} not found; put the GLUE download-script files "
                f"under GLUE_DIR ({root}), or unset GLUE_DIR to download '{HUB_DATASET}' "
                "from the Hugging Face Hub"
            )
        return _read_tsv(task, path)
    hub_split = "train" if split == "train" else task.hub_test_split
    try:
        return _read_hub(task, hub_split)
    except Exception as e:  # the datasets library raises many types when offline
        raise DataError(
            f"task {task.name}: could not load {HUB_DATASET}/{task.hub_config} split {hub_split} "
            f"from the Hub ({type(e).__name__}); set GLUE_DIR to a folder with "
            f"{task.folder}/train.tsv and {task.folder}/{task.test_file}"
        ) from e


def load_task(
    task: TaskSpec | str,
    validation_size: int = 200,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    glue_dir: str | os.PathLike | None = None,
) -> TaskData:
    """Load a task's splits: a seeded validation split carved out of train, dev as the test split.

    Args:
        task: a spec or a task name.
        validation_size: examples moved from ``train`` into ``validation`` (never in both), in a seeded
            random order, so that its first n are a random subset.
        seed: the seed of the carve and of the caps.
        max_train: cap on the training examples (a seeded subset of what remains after the carve).
        max_test: cap on the test examples (a seeded subset of dev).
        glue_dir: see :func:`read_split`.

    Returns:
        The :class:`TaskData`.

    Raises:
        ConfigError: for negative sizes or a validation split that would take all of train.
        DataError: see :func:`read_split`.
    """
    spec = get_task(task) if isinstance(task, str) else task
    for what, value in (("validation_size", validation_size), ("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 0:
            raise ConfigError(f"{what}: expected a number >= 0, got {value}")
    train = read_split(spec, "train", glue_dir)
    if validation_size >= len(train):
        raise ConfigError(
            f"validation_size: {validation_size} would leave no training examples for "
            f"{spec.name} ({len(train)} in train); use a smaller validation_size"
        )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    # Validation stays in the carve's shuffled order: callers fit on its first n (validation_per_task), and
    # the files are grouped by source (STS-B: captions, then news, then forums), so the first n in file
    # order would leave whole sources out (the first 100 of STS-B's carve held no headline pair).
    validation = [train[i] for i in order[:validation_size]]
    rest = [train[i] for i in sorted(order[validation_size:])]
    test = read_split(spec, "dev", glue_dir)
    return TaskData(
        spec, capped_subset(rest, max_train, seed + 1), validation, capped_subset(test, max_test, dev_subset_seed(seed))
    )


def load_held_out(
    task: TaskSpec | str, max_test: int | None = None, seed: int = 0, glue_dir: str | os.PathLike | None = None
) -> TaskData:
    """A held-out task: its dev split only (as ``test``), for tasks with no expert and no training data.

    Its train split is never read, so a task whose train file is absent (QNLI here) still loads.

    Args:
        task: a spec or a task name.
        max_test: cap on the test examples (the same seeded subset :func:`load_task` takes for ``seed``).
        seed: the split seed whose dev subset to take.
        glue_dir: see :func:`read_split`.

    Returns:
        A :class:`TaskData` with empty ``train`` and ``validation``.

    Raises:
        DataError: see :func:`read_split`.
    """
    spec = get_task(task) if isinstance(task, str) else task
    return TaskData(spec, [], [], capped_subset(read_split(spec, "dev", glue_dir), max_test, dev_subset_seed(seed)))


def dev_subset_seed(seed: int) -> int:
    """The seed of the capped test subset for a split seed (shared by every command that caps dev)."""
    return seed + 2
