"""A recipe row that distils its fitted ensemble into one LoRA student: one pass per input instead of K.

An ``ensemble`` combiner's teacher is distilled into one multi-task student on every task's training
inputs; a ``task_ensemble``'s into one student per task, on that task's. Students are trained with the
recipe's expert settings (``distill.max_train`` and ``distill.epochs`` override the caps) under
``OUT/distilled/<key>/``, where ``key`` digests the run's experts and the entry, so a finished student
is reused and a half-trained one resumes.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from adapterfuse.expert import Expert
from adapterfuse.library import ExpertLibrary
from adapterfuse.recipe.resume import combiner_setting, digest
from adapterfuse.recipe.schema import CombinerEntry
from adapterfuse.recipe.taskwise import RunParts, TaskwisePredictor, train_once
from adapterfuse.tasks.spec import TaskData
from adapterfuse.train.config import TrainConfig


def _student_config(entry: CombinerEntry, run: RunParts, task: str) -> TrainConfig:
    """The recipe's training settings of ``task``'s expert, capped as ``entry.distill`` says; always LoRA."""
    config = run.recipe.train_config(task, run.recipe.experts.seeds[0])
    spec = entry.distill
    update: dict[str, Any] = {"method": "lora"}
    if spec is not None and spec.max_train is not None:
        update["max_train_examples"] = spec.max_train
    if spec is not None and spec.epochs is not None:
        update["epochs"] = spec.epochs
    return config.model_copy(update=update)


def _student(teacher: Any, data: list[TaskData], config: TrainConfig, folder: Path) -> Expert:
    """Train (or reuse) the student of ``teacher`` in ``folder``."""
    from adapterfuse.train.distill import distill

    train_once(folder / "adapterfuse.json", partial(distill, teacher, data, folder, config, compare=False))
    return Expert.load(folder)


def distilled(entry: CombinerEntry, teacher: Any, run: RunParts) -> Any:
    """The student(s) of a fitted ensemble, as the entry's predictor.

    Args:
        entry: the combiner's recipe entry (its ``distill`` is set).
        teacher: the fitted ensemble: an ``EnsemblePredictor``, or a :class:`TaskwisePredictor` of them.
        run: the run's recipe, folder, base, data and digest.

    Returns:
        An expert predictor of the multi-task student, or an oracle over the per-task students, named
        after the entry.
    """
    from adapterfuse.harness import ExpertPredictor, OraclePredictor

    root = run.out / "distilled" / digest(run.digest, combiner_setting(entry))
    if isinstance(teacher, TaskwisePredictor):
        students = [
            _student(teacher.by_task[t], [run.data[t]], _student_config(entry, run, t), root / t)
            for t in run.recipe.tasks
        ]
        predictor: Any = OraclePredictor(run.base, ExpertLibrary(students))
    else:
        tasks = list(run.recipe.tasks)
        config = _student_config(entry, run, tasks[0])
        student = _student(teacher, [run.data[t] for t in tasks], config, root / "all")
        predictor = ExpertPredictor(run.base, student)
    predictor.name = entry.label
    return predictor
