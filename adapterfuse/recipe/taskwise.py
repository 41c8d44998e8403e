"""Predictors a recipe builds one per task, told each input's task like the oracle: parameter-efficient
ensembles and the ensemble families of one task's experts.

A ``task_ensemble`` combiner answers each task with an ensemble of that task's own members. Its
``family`` says how the members differ:

- ``seeds``: the recipe's expert trained with seeds ``s0 … s0+K-1`` (``s0`` the recipe's first seed); they
  live in ``OUT/experts`` under the recipe's names, so ``experts.seeds`` and this family share them;
- ``bagging``: the same, each trained on a bootstrap resample of the training examples;
- ``grid``: one member per point of a grid of training settings (a hyperparameter ensemble);
- ``snapshots``: the ends of the K cosine cycles of one run (a snapshot ensemble);
- ``mc_dropout``: the recipe's expert with K dropout masks in one batched pass;
- ``temperature``: the recipe's expert alone, its temperature fitted on the task's validation split
  (the calibration baseline every ensemble has to beat; ``members`` is ignored).

Trained members go under ``OUT/families/<task>/`` (the ``seeds`` family under ``OUT/experts``); a
finished member is reused, a half-trained one resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from adapterfuse.base import BaseModel
from adapterfuse.distributed import barrier, is_main
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import Cost
from adapterfuse.recipe.families import TRAINED_FAMILIES, FamilyOptions
from adapterfuse.recipe.resume import check_reused, digest
from adapterfuse.recipe.schema import CombinerEntry, Recipe, expert_name
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec
from adapterfuse.train.config import TrainConfig


@dataclass(frozen=True)
class RunParts:
    """What a recipe run has loaded, which every combiner it builds may need."""

    recipe: Recipe
    out: Path
    base: BaseModel
    library: ExpertLibrary
    data: dict[str, TaskData]
    """Task -> its splits (test capped as the recipe says)."""
    validation: dict[str, TaskData]
    """Task -> the validation examples combiners fit on."""
    digest: str
    """What every result of the run shares (:func:`~adapterfuse.recipe.resume.run_digest`)."""


class TaskwisePredictor:
    """One predictor per task (an ensemble trained for each, say), behind one name."""

    def __init__(self, name: str, by_task: dict[str, Any]) -> None:
        self.name, self.by_task = name, by_task

    def for_task(self, task: TaskSpec) -> Any:
        """The task's own predictor.

        Raises:
            ConfigError: no predictor was built for the task.
        """
        if task.train_task not in self.by_task:
            raise ConfigError(f"{self.name}: no predictor for task {task.name!r}; have {sorted(self.by_task)}")
        return self.by_task[task.train_task]

    def predict_proba(self, task: TaskSpec, batch: list[Example]):
        """Delegate to the task's own predictor."""
        return self.for_task(task).predict_proba(task, batch)

    def cost(self) -> Cost:
        """Parameters and memory of all tasks' predictors; passes per input of the costliest."""
        costs = [p.cost() for p in self.by_task.values()]
        return Cost(
            sum(c.stored_params for c in costs),
            max(c.forward_passes for c in costs),
            sum(c.memory_bytes for c in costs),
        )

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Its members are already saved in the run folder."""
        raise ConfigError(f"{self.name}: one predictor per task, whose members are in the run folder; nothing to save")


def train_once(done: Path, train: Callable[[], Any]) -> None:
    """Run ``train`` unless the file ``done`` exists; under several processes the main one trains."""
    if not done.is_file():
        if is_main():
            train()
        barrier()


def family_members(
    options: FamilyOptions, task: str, config: TrainConfig, folders: dict[str, Path], base: BaseModel, data: TaskData
) -> list[Expert]:
    """Train (or reuse) the members of a trained family for one task.

    Args:
        options: the family (one of :data:`~adapterfuse.recipe.families.TRAINED_FAMILIES`).
        task: the task.
        config: the recipe's training config of the task's expert (its first seed).
        folders: ``"experts"`` (where the recipe's experts live) and ``"families"`` (``OUT/families/<task>``).
        base: the frozen base.
        data: the task's splits (the recipe's carve).

    Returns:
        The members, in order.
    """
    from adapterfuse.train.expert import train_expert
    from adapterfuse.train.grid import grid_configs, train_grid

    seeds = [config.seed + i for i in range(options.members)]
    root = folders["families"]
    if options.family == "grid":
        out = root / f"grid-{digest(config.model_dump(), options.grid)}"
        names = [name for name, _ in grid_configs(config, options.grid or {})]
        train_once(
            out / names[-1] / "adapterfuse.json", partial(train_grid, base, task, config, options.grid, out, data)
        )
        return [Expert.load(out / name) for name in names]
    if options.family == "snapshots":
        snap = config.model_copy(update={"snapshots": options.members})
        out = root / f"snapshots-{digest(snap.model_dump())}"
        done = out / f"snapshot-{options.members}" / "adapterfuse.json"
        train_once(done, partial(train_expert, base, task, snap, out=out, data=data))
        return [Expert.load(out / f"snapshot-{i}") for i in range(1, options.members + 1)]
    members = []
    for seed in seeds:
        if options.family == "seeds":
            member = config.model_copy(update={"seed": seed})
            folder = folders["experts"] / expert_name(task, member)
        else:  # bagging
            member = config.model_copy(update={"seed": seed, "bootstrap": True})
            folder = root / f"bagging-s{seed}-{digest(member.model_dump())}"
        train_once(folder / "adapterfuse.json", partial(train_expert, base, task, member, out=folder, data=data))
        expert = Expert.load(folder)
        check_reused(expert, member)  # a seeds member's folder has the recipe's name, not a digest of its config
        members.append(expert)
    return members


def per_task_predictors(predictor: Any) -> dict[str, Any] | None:
    """Each task's own predictor, for a predictor told the task (the oracle, a per-task ensemble); else None."""
    if isinstance(predictor, TaskwisePredictor):
        return predictor.by_task
    from adapterfuse.harness import ExpertPredictor, OraclePredictor

    if isinstance(predictor, OraclePredictor):
        return {task: ExpertPredictor(predictor.base, e) for task, e in predictor.by_task.items()}
    return None


def family_predictor(
    name: str, options: FamilyOptions, base: BaseModel, expert: Expert, members: list[Expert], validation: TaskData
) -> Any:
    """One task's predictor of a family: the pooled members, MC-dropout or the temperature-scaled expert.

    Args:
        name: the predictor's name.
        options: the family.
        base: the frozen base.
        expert: the task's expert (what ``mc_dropout`` and ``temperature`` use).
        members: the trained members (empty for ``mc_dropout`` and ``temperature``).
        validation: the task's validation split (what ``temperature`` and learned weights fit on).

    Returns:
        A predictor for that task.
    """
    if options.family == "temperature":
        from adapterfuse.calibration import temperature_scale
        from adapterfuse.harness import ExpertPredictor

        return temperature_scale(ExpertPredictor(base, expert), [validation], name, unseen="mean")
    if options.family == "mc_dropout":
        from adapterfuse.backends.ensemble.mc_dropout import MCDropoutPredictor

        return MCDropoutPredictor(base, expert, samples=options.members, p=options.p, name=name)
    from adapterfuse.backends.ensemble.fit import ensemble

    fit_on = [validation] if options.weights == "learned" else None
    return ensemble(
        ExpertLibrary(members), base, pooling=options.pooling, weights=options.weights, validation=fit_on, name=name
    )


def pe_ensembles(entry: CombinerEntry, run: RunParts) -> TaskwisePredictor:
    """A ``pe_ensemble`` combiner: one parameter-efficient ensemble per task, trained (or reused) under
    ``OUT/pe``, with the recipe's training settings."""
    from adapterfuse.train.pe.options import PEOptions, PESpec
    from adapterfuse.train.pe.predictor import MANIFEST, PEEnsemble
    from adapterfuse.train.pe.train import train_pe_ensemble

    recipe, out, base, data = run.recipe, run.out, run.base, run.data
    kind, members, opts = entry.pe_parts()
    full = PEOptions(**opts).model_dump(mode="json")  # every option, so a changed default trains anew
    by_task = {}
    for task in recipe.tasks:
        cfg = recipe.train_config(task, recipe.experts.seeds[0])
        folder = out / "pe" / f"{task}-{kind}-k{members}-{digest(cfg.model_dump(), full)}"
        if (folder / MANIFEST).is_file():
            ens = PEEnsemble.load(folder)
        else:  # not split over processes: the main one trains it, the others then load it
            if is_main():
                ens = train_pe_ensemble(base, task, PESpec(kind, members, cfg, opts), out=folder, data=data[task])
            barrier()
            if not is_main():
                ens = PEEnsemble.load(folder)
        by_task[task] = ens.predictor(base)
    return TaskwisePredictor(entry.label, by_task)


def task_ensembles(entry: CombinerEntry, run: RunParts) -> TaskwisePredictor:
    """A ``task_ensemble`` combiner: each task's family, trained (or reused) under the run folder.

    Args:
        entry: the combiner's recipe entry (its options are :class:`FamilyOptions`).
        run: the run's recipe, folder, base, experts (each task's first is what ``mc_dropout`` and
            ``temperature`` use) and data.

    Returns:
        The per-task predictors behind the entry's label.
    """
    recipe, out, base, data = run.recipe, run.out, run.base, run.data
    options = FamilyOptions(**entry.options)
    own = run.library.by_task()
    by_task = {}
    for task in recipe.tasks:
        members = []
        if options.family in TRAINED_FAMILIES:
            config = recipe.train_config(task, recipe.experts.seeds[0])
            folders = {"experts": recipe.experts_dir(out), "families": out / "families" / task}
            members = family_members(options, task, config, folders, base, data[task])
        name = f"{entry.label} ({task})"
        by_task[task] = family_predictor(name, options, base, own[task][0], members, run.validation[task])
    return TaskwisePredictor(entry.label, by_task)
