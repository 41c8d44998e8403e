"""Run a recipe: train (or reuse) the experts, fit every combiner, evaluate all on one harness, report.

Everything a run produces lives under its ``--out`` folder::

    OUT/recipe.json        the validated recipe this run used
    OUT/experts/           one folder per trained expert (a finished one is reused, a partial one resumes)
    OUT/pe/                parameter-efficient ensembles, one per task
    OUT/results.jsonl      one line per evaluated predictor, appended as soon as it is measured
    OUT/results.json|.md   the comparison; OUT/accuracy_vs_cost.png and OUT/scores_heatmap.png
    OUT/predictors/        predictors listed in ``outputs.save``
    OUT/detector/          the feature detector (``harness.detector`` or a combiner's ``guard``);
    OUT/detector.json      its AUROC on the held-out tasks

A rerun skips every expert and predictor already finished with the same settings (each result line
carries a hash of what produced it), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from adapterfuse.backends.base import BACKENDS, make_combiner
from adapterfuse.backends.route.api import routing_accuracy
from adapterfuse.backends.route.features import n_layers
from adapterfuse.backends.route.predictor import RoutePredictor
from adapterfuse.base import BaseModel, load_base
from adapterfuse.distributed import barrier, is_main
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.guarded import Guarded, guard
from adapterfuse.harness import ExpertPredictor, OraclePredictor, ZeroShotPredictor, evaluate
from adapterfuse.io.atomic import write_json
from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import Predictor
from adapterfuse.progress import status
from adapterfuse.recipe.checks import check_layers, check_recipe
from adapterfuse.recipe.detector import RunDetector, run_detector
from adapterfuse.recipe.distilled import distilled
from adapterfuse.recipe.plan import Steps, count_steps
from adapterfuse.recipe.report import write_report
from adapterfuse.recipe.resume import append_line, check_reused, combiner_setting, digest, finished_results, run_digest
from adapterfuse.recipe.schema import GUARD_FALLBACKS, TASKWISE, CombinerEntry, Recipe
from adapterfuse.recipe.taskwise import RunParts, pe_ensembles, per_task_predictors, task_ensembles
from adapterfuse.tasks.glue import load_held_out, load_task
from adapterfuse.tasks.spec import TaskData, check_disjoint
from adapterfuse.uncertainty import auroc

# Fields recorded by training that are measurements, not settings.
DATA_SEED = 0  # every expert of a task sees the same carve, so no seed trains on another's validation


def _experts(recipe: Recipe, out: Path, base: BaseModel, data: dict[str, TaskData], steps: Steps) -> list[Expert]:
    from adapterfuse.train.expert import train_expert

    if recipe.experts.paths:
        steps.start(f"experts: loading {len(recipe.experts.paths)} given folders")
        return list(ExpertLibrary.load(recipe.experts.paths, base.fingerprint))
    experts = []
    for task, name, cfg in recipe.trained_experts():
        folder = recipe.experts_dir(out) / name
        if (folder / "adapterfuse.json").is_file():
            steps.start(f"expert {name}: reused")
            expert = Expert.load(folder)
            if expert.task != task:
                raise ConfigError(
                    f"expert {name!r} at {folder} records task {expert.task!r}, the recipe uses it for task "
                    f"{task!r}; delete that folder to retrain, or point the recipe at the right one"
                )
            check_reused(expert, cfg)
        else:
            steps.start(f"expert {name}: training ({cfg.max_train_examples} examples, {cfg.epochs:g} epoch(s)) ...")
            t0 = time.perf_counter()
            expert = train_expert(base, task, cfg, out=folder, data=data[task], progress=True)
            steps.say(f"expert {name}: trained in {time.perf_counter() - t0:.0f} s")
        experts.append(expert)
    return experts


def fit_combiner(
    entry: CombinerEntry,
    base: BaseModel,
    library: ExpertLibrary,
    validation: dict[str, TaskData],
    options: dict[str, Any] | None = None,
) -> Predictor:
    """Fit one merge, ensemble or route combiner on the validation split.

    Args:
        entry: the combiner's recipe entry.
        base: the frozen base.
        library: the experts.
        validation: task -> its data (only the validation split is read).
        options: the options to build the backend's config from (default: the entry's, named after its label).

    Returns:
        The fitted predictor.

    Raises:
        ConfigError: a bad option; the backends' errors.
    """
    options = entry.backend_options() if options is None else options
    return make_combiner(entry.backend, base, options, entry.members).fit(library, validation)


def _fit(entry: CombinerEntry, run: RunParts, detector: RunDetector) -> Predictor:
    if entry.backend == "pe_ensemble":
        return pe_ensembles(entry, run)
    if entry.backend == "task_ensemble":
        predictor = task_ensembles(entry, run)
    else:
        predictor = fit_combiner(entry, run.base, run.library, run.validation)
        predictor.name = entry.label  # a merge names its predictor after the method; a recipe row goes by its label
    if entry.distill:
        return distilled(entry, predictor, run)
    if not entry.guard:  # the schema refuses guard on a task_ensemble and with distill
        return predictor
    fallback = None  # the base alone
    if entry.guard == "mix":
        uniform = make_combiner("merge", run.base, {"method": "uniform"}, entry.members)
        fallback = uniform.fit(run.library, run.validation)
        fallback.name = GUARD_FALLBACKS["mix"]
    return guard(predictor, detector.get(), fallback, name=entry.label)


def load_data(recipe: Recipe, seed: int = DATA_SEED) -> tuple[dict[str, TaskData], dict[str, TaskData]]:
    """A recipe's tasks, and the validation split every combiner fits on.

    Args:
        recipe: the recipe (its tasks, harness caps and the experts' training caps).
        seed: the seed of the validation carve and of the test subset.

    Returns:
        ``(data, validation)``: task -> its splits (test capped by ``max_test``), and task -> the first
        ``harness.validation_per_task`` examples of its validation split alone.

    Raises:
        DataError / ConfigError: see :func:`~adapterfuse.tasks.glue.load_task`.
    """
    h = recipe.harness
    data = {}
    for task, entry in recipe.tasks.items():
        cap = recipe.train_config(task, recipe.experts.seeds[0]).max_train_examples
        data[task] = load_task(task, h.validation_size, seed, cap, entry.max_test or h.max_test)
    validation = {t: TaskData(d.task, [], d.validation[: h.validation_per_task], []) for t, d in data.items()}
    check_disjoint(TaskData(d.task, [], validation[t].validation, d.test) for t, d in data.items())
    return data, validation


@dataclass
class SingleRun:
    """What :func:`run_single` gives back."""

    predictor: Predictor
    result: dict[str, Any] | None
    """The harness result on the test split (None when not scored)."""
    scored: list[TaskData]
    """The tasks the result was scored on (the recipe's, then the held-out ones)."""


def run_single(
    recipe: Recipe,
    library: ExpertLibrary,
    base: BaseModel,
    data: tuple[dict[str, TaskData], dict[str, TaskData]] | None = None,
    seed: int = DATA_SEED,
    held_out: Sequence[str] = (),
    score: bool = True,
) -> SingleRun:
    """Fit a one-combiner recipe on a loaded library and evaluate it on the test split.

    This is what the ``merge``, ``ensemble`` and ``route`` commands run: the predictor keeps the name its
    backend gives it, and the combiner's options are taken as written (no row label is added).

    Args:
        recipe: a recipe with exactly one merge, ensemble or route combiner.
        library: its experts, already checked against ``base``.
        base: the frozen base.
        data: what :func:`load_data` gave for this recipe and ``seed`` (default: load it now).
        seed: the seed of the validation carve and of the test subset (the experts' training seed).
        held_out: more tasks scored on their test split only (their train split is never read).
        score: evaluate on the test split; without it the predictor is only fitted (a merge that is saved).

    Returns:
        The predictor, its harness result and the tasks it was scored on.

    Raises:
        ConfigError: a recipe with another number of combiners, or a bad option; the backends' errors.
    """
    if len(recipe.combiners) != 1 or recipe.combiners[0].backend not in BACKENDS:
        raise ConfigError(f"run_single: expected one merge, ensemble or route combiner, got {len(recipe.combiners)}")
    entry, cap = recipe.combiners[0], recipe.harness.max_test
    tasks, validation = data or load_data(recipe, seed)
    predictor = fit_combiner(entry, base, library, validation, dict(entry.options))
    if not score:
        return SingleRun(predictor, None, [])
    scored = [*tasks.values(), *(load_held_out(task, cap, seed) for task in held_out)]
    return SingleRun(predictor, evaluate(predictor, scored, split="test", max_examples=cap), scored)


def run_recipe(
    recipe: Recipe,
    out: str | Path,
    base: BaseModel | None = None,
    log: Callable[[str], None] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Do everything a recipe asks, resuming what an earlier run under ``out`` finished.

    Under a multi-process launch every process runs the recipe: training and evaluation are split over
    them (see :mod:`adapterfuse.distributed`), and the main process alone writes results and logs.

    Args:
        recipe: a validated recipe (see :func:`~adapterfuse.recipe.schema.load_recipe`).
        out: the run folder.
        base: an already loaded base (default: load ``recipe.base`` onto the device).
        log: where the run's lines go, one per step begun or finished, each starting with ``[i/n]``
            (default: :func:`adapterfuse.progress.status`, on stderr and silent when quiet).
        device: where the base runs (default: ``recipe.device``); ignored when ``base`` is given.

    Returns:
        ``{"recipe", "results": [harness result + "fit_seconds" …], "wall_s", "files"}`` (also written
        to ``out/results.json``).

    Raises:
        ConfigError / CompatibilityError: a bad combiner option or incompatible experts (before any
            model is loaded); ExpertError and friends from the backends.
    """
    out = Path(out)
    check_recipe(recipe)
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    main = is_main()
    if main:
        write_json(out / "recipe.json", json.loads(recipe.model_dump_json()))
    steps = Steps(count_steps(recipe), (log or status) if main else _silent)
    base = _base(recipe, base, device)
    data, validation = load_data(recipe)
    library = ExpertLibrary(_experts(recipe, out, base, data, steps), base.fingerprint)
    setting = run_digest(recipe, library)
    held_out = [load_held_out(task, recipe.harness.max_held_out, DATA_SEED) for task in recipe.harness.held_out]
    done = {k: v for k, v in finished_results(out).items() if v.get("setting", {}).get("digest") == setting}
    results = []

    def measure(
        label: str, config: Any, build: Callable[[], Predictor], fits: bool = True, task_id: bool = False
    ) -> None:
        key = digest(setting, config)
        if label in done and done[label]["setting"]["key"] == key:
            steps.start(f"predictor {label}: reused result (average {done[label]['average']:.3f})")
            results.append({**done[label], "needs_task_id": task_id})
            return
        steps.start(f"predictor {label}: {'fitting' if fits else 'evaluating'} ...")
        t0 = time.perf_counter()
        predictor = build()
        fit_s = time.perf_counter() - t0
        if fits:
            steps.say(f"predictor {label}: evaluating on {len(data)} task(s) ...")
        result = score(predictor, data, held_out)
        result.update(predictor=label, fit_seconds=round(fit_s, 1), setting={"digest": setting, "key": key})
        result["needs_task_id"] = task_id  # told each input's task: the report keeps it off the Pareto front
        results.append(result)
        if not main:
            return
        _save_and_push(recipe, out, label, predictor, steps.say)
        append_line(out / "results.jsonl", json.dumps(result))
        steps.say(
            f"predictor {label}: average {result['average']:.3f}, {result['examples_per_s']:.1f} ex/s "
            f"(fit {fit_s:.0f} s)"
        )
        del predictor
        gc.collect()

    if "zero_shot" in recipe.harness.baselines:
        measure("base zero-shot", "zero_shot", lambda: ZeroShotPredictor(base), fits=False)
    if "oracle" in recipe.harness.baselines:
        measure("oracle", [e.name for e in library], lambda: OraclePredictor(base, library), False, True)
    if "experts" in recipe.harness.baselines:
        for e in library:
            measure(f"expert {e.name}", ["expert", e.name], partial(ExpertPredictor, base, e), fits=False)
    detector = RunDetector(out, setting, [*data.values()], base, steps.say, DATA_SEED)
    for entry in recipe.combiners:
        build = partial(_fit, entry, RunParts(recipe, out, base, library, data, validation, setting), detector)
        measure(entry.label, combiner_setting(entry, detector.key), build, task_id=entry.backend in TASKWISE)
    found = {"detector": run_detector(detector, out, held_out)} if recipe.harness.detector else {}
    summary = {"recipe": recipe.name, "results": results, **found, "wall_s": round(time.perf_counter() - t_start, 1)}
    return _report(recipe, out, summary, steps, main)


def score(predictor: Predictor, data: dict[str, TaskData], held_out: Sequence[TaskData] = ()) -> dict[str, Any]:
    """A predictor's harness result on the recipe's tasks (their test splits), and on held-out tasks.

    Args:
        predictor: the predictor.
        data: the recipe's tasks.
        held_out: tasks no expert trained on (their test splits only).

    Returns:
        :func:`~adapterfuse.harness.evaluate`'s result; for a sequence-level router also
        ``"routing_accuracy"`` (the share of inputs whose top-1 expert is their own task's). With
        ``held_out``, also ``"out_of_task_auroc"``: how well the normalised predictive entropy tells
        held-out inputs from the recipe's own (0.5: chance, 1: perfect), for an ensemble
        ``"out_of_task_auroc_mi"``: the same for its members' disagreement (mutual information), and
        ``"held_out"``: each held-out task's metrics, kept out of the average. A predictor told each
        input's task has no answer for a task without an expert, so it gets no ``"held_out"``, and its
        AUROCs are the means over tasks of each task's own predictor telling that task's inputs from the
        held-out ones. A guarded predictor also gets ``"handed_over"`` (the share of the tasks' inputs its
        detector handed to the fallback) and, with ``held_out``, ``"held_out_handed_over"``.
    """
    result = evaluate(predictor, list(data.values()), entropies=bool(held_out))
    result.update(_handed_over(predictor, "handed_over"))
    if isinstance(predictor, RoutePredictor):  # Arrow routes per token and has no such number
        result["routing_accuracy"] = routing_accuracy(predictor, list(data.values()))["oracle"]
    if not held_out:
        return result
    inside = result.pop("entropies")
    by_task = per_task_predictors(predictor)
    if by_task is None:
        away = evaluate(predictor, list(held_out), entropies=True)
        result["held_out"] = away["tasks"]
        result.update(_handed_over(predictor, "held_out_handed_over"))
        return {**result, **_detection([(inside, away["entropies"])])}
    pairs = []
    for task, own in by_task.items():
        pairs.append(({task: inside[task]}, evaluate(own, list(held_out), entropies=True)["entropies"]))
    return {**result, **_detection(pairs)}


def _handed_over(predictor: Predictor, key: str) -> dict[str, float]:
    """``{key: the share of inputs answered since the last call that a guarded predictor handed to its
    fallback}`` (empty for any other predictor)."""
    share = predictor.handed_over() if isinstance(predictor, Guarded) else None
    return {} if share is None else {key: share}


_AUROC_KEYS = {"entropy": "out_of_task_auroc", "mutual_information": "out_of_task_auroc_mi"}


def _detection(pairs: list[tuple[dict[str, dict], dict[str, dict]]]) -> dict[str, float]:
    """The mean over (in-task, held-out) pairs of each uncertainty score's AUROC; a score counts only when
    every input of every pair has it (the members' disagreement needs members)."""
    found: dict[str, list[float]] = {}
    for inside, away in pairs:
        for score in _AUROC_KEYS:
            a, b = [s[score] for s in inside.values() if score in s], [s[score] for s in away.values() if score in s]
            if len(a) == len(inside) and len(b) == len(away):
                found.setdefault(score, []).append(auroc(torch.cat(a), torch.cat(b)))
    return {_AUROC_KEYS[s]: statistics.fmean(v) for s, v in found.items() if len(v) == len(pairs)}


def _base(recipe: Recipe, base: BaseModel | None, device: str | None) -> BaseModel:
    """The given base, or the recipe's loaded onto the device; its layers checked before any expert trains."""
    base = base or load_base(recipe.base, device=device or recipe.device)
    check_layers(recipe, n_layers(base.model))
    return base


def _report(recipe: Recipe, out: Path, summary: dict[str, Any], steps: Steps, main: bool) -> dict[str, Any]:
    """Write results.md, the plots and results.json from the main process; the others wait for it."""
    if main:
        steps.start(f"report: results.md{' and plots' if recipe.outputs.plots else ''} in {out}")
        summary["files"] = write_report(summary, out, recipe.outputs.plots, recipe.outputs.plot_metric)
        write_json(out / "results.json", summary)
    else:
        summary["files"] = []
    barrier()  # the other processes return once the results are on disk
    return summary


def _silent(line: str) -> None:
    """The log of the processes other than the main one."""


def _save_and_push(recipe: Recipe, out: Path, label: str, predictor: Any, log: Callable[[str], None]) -> None:
    """Save and push a predictor if the recipe's outputs name it (a push names the saved folder, if any)."""
    saved = out / "predictors" / label.replace("/", "_").replace(" ", "_") if label in recipe.outputs.save else None
    if saved is not None:
        predictor.save(saved, overwrite=True)
    if label in {p.predictor for p in recipe.outputs.push}:
        _push(recipe, label, predictor, log, saved)


def _push(recipe: Recipe, label: str, predictor: Any, log: Callable[[str], None], saved: Path | None) -> None:
    for entry in (p for p in recipe.outputs.push if p.predictor == label):  # only merges (checked on load)
        pushed = predictor.adapter.push_to_hub(
            entry.repo_id, private=entry.private, overwrite=entry.overwrite, endpoint=entry.endpoint, saved=saved
        )
        log(f"pushed {label} to {entry.repo_id}: {pushed}")
