"""Run a recipe: train (or reuse) the experts, fit every combiner, evaluate all on one harness, report.

Everything a run produces lives under its ``--out`` folder::

    OUT/recipe.json        the validated recipe this run used
    OUT/experts/           one folder per trained expert (a finished one is reused, a partial one resumes)
    OUT/pe/                parameter-efficient ensembles, one per task
    OUT/results.jsonl      one line per evaluated predictor, appended as soon as it is measured
    OUT/results.json|.md   the comparison; OUT/accuracy_vs_cost.png and OUT/scores_heatmap.png
    OUT/predictors/        predictors listed in ``outputs.save``

A rerun skips every expert and predictor already finished with the same settings (each result line
carries a hash of what produced it), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from adapterfuse.backends.base import BACKENDS, backend_config, make_combiner
from adapterfuse.backends.route.features import n_layers
from adapterfuse.base import BaseModel, load_base
from adapterfuse.distributed import barrier, is_main
from adapterfuse.errors import AdapterFuseWarning, ConfigError
from adapterfuse.expert import Expert
from adapterfuse.harness import OraclePredictor, ZeroShotPredictor, evaluate
from adapterfuse.io.atomic import save_error, write_failure, write_json
from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import Cost, Predictor
from adapterfuse.progress import status
from adapterfuse.recipe.checks import check_expert_headers, check_layers, check_recipe
from adapterfuse.recipe.report import write_report
from adapterfuse.recipe.schema import CombinerEntry, Recipe
from adapterfuse.tasks.glue import load_held_out, load_task
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec, check_disjoint
from adapterfuse.train.config import TrainConfig

# Fields recorded by training that are measurements, not settings.
_MEASURED = {"eval_wall_s", "resumed_from_step", "steps", "train_examples", "train_tokens_per_s", "train_wall_s"}
DATA_SEED = 0  # every expert of a task sees the same carve, so no seed trains on another's validation


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expert_folder(recipe: Recipe, out: Path, name: str) -> Path:
    """Where the expert ``name`` of a recipe lives."""
    return Path(recipe.experts.dir) / name if recipe.experts.dir else out / "experts" / name


def plan(recipe: Recipe, out: str | Path) -> list[str]:
    """What a run would do, step by step, and what is already done; reads no weight.

    Args:
        recipe: a validated recipe.
        out: the run folder (what an earlier run there finished is reported as reused).

    Returns:
        One line per step.

    Raises:
        ConfigError / CompatibilityError: a bad combiner option, or finished experts that disagree.
    """
    out = Path(out)
    check_recipe(recipe)
    lines, finished = [], []
    if recipe.experts.paths:
        lines += [f"expert {p}: given" for p in recipe.experts.paths]
        finished = [Path(p) for p in recipe.experts.paths if Path(p).is_dir()]
    for _, name, cfg in recipe.trained_experts():
        folder = expert_folder(recipe, out, name)
        done = (folder / "adapterfuse.json").is_file()
        finished += [folder] if done else []
        lines.append(
            f"expert {name}: {'reuse' if done else 'train'} ({cfg.max_train_examples} examples, "
            f"{cfg.epochs:g} epoch(s), {cfg.method} r={cfg.rank})"
        )
    if finished:
        check_expert_headers(finished)
        lines.append(f"experts on disk: {len(finished)} compatible (one base fingerprint, matching shapes)")
    done = _finished_results(out)
    for label in [
        *("base zero-shot" if b == "zero_shot" else b for b in recipe.harness.baselines),
        *(c.label for c in recipe.combiners),
    ]:
        # The run reuses a recorded result only if its settings and the experts' weights still match.
        what = "result on disk (reused if unchanged)" if label in done else "fit and evaluate"
        lines.append(f"predictor {label}: {what}")
    for entry in recipe.outputs.push:
        lines.append(f"push {entry.predictor} -> {entry.repo_id} ({'private' if entry.private else 'public'})")
    return lines


def _finished_results(out: Path) -> dict[str, dict[str, Any]]:
    """The results recorded so far; a line a killed run left incomplete is measured again (with a warning)."""
    log = out / "results.jsonl"
    if not log.is_file():
        return {}
    results = {}
    for i, line in enumerate(log.read_text().splitlines(), start=1):
        try:
            result = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            result = None
        if isinstance(result, dict) and "predictor" in result:
            results[result["predictor"]] = result
        elif line.strip():
            warnings.warn(
                f"{log}:{i}: an incomplete result (an interrupted run); that predictor is measured again",
                AdapterFuseWarning,
                stacklevel=2,
            )
    return results


def _append_line(path: Path, line: str) -> None:
    """Append one line whole: on a failed write the file is cut back to what it was.

    Raises:
        SaveError: the line could not be written.
    """
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as e:
        with open(path, "r+") as fh:
            fh.truncate(size)
        reason = write_failure(e)
        if reason is None:
            raise
        raise save_error(path, reason) from e


def _check_reused(expert: Expert, config: TrainConfig) -> None:
    recorded = {k: v for k, v in (expert.meta.get("training") or {}).items() if k not in _MEASURED}
    wanted = json.loads(config.model_dump_json())
    changed = sorted(k for k in wanted if k in recorded and recorded[k] != wanted[k])
    if changed:
        k = changed[0]
        raise ConfigError(
            f"expert {expert.name!r} at {expert.path} was trained with {k}={recorded[k]!r}, the recipe "
            f"asks {k}={wanted[k]!r}; delete that folder to retrain, or change the recipe"
        )


class Steps:
    """Numbers a run's steps for its log: every line of step ``i`` of ``n`` starts with ``[i/n]``."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.log, self.done = total, log, 0

    def start(self, message: str) -> None:
        """Begin the next step and say what it does."""
        self.done += 1
        self.say(message)

    def say(self, message: str) -> None:
        """One more line about the current step."""
        self.log(f"[{self.done}/{self.total}] {message}")


def count_steps(recipe: Recipe) -> int:
    """How many steps a run of ``recipe`` logs: each expert (or loading the given ones), each predictor, the report."""
    experts = 1 if recipe.experts.paths else len(recipe.trained_experts())
    return experts + len(recipe.harness.baselines) + len(recipe.combiners) + 1


def _experts(recipe: Recipe, out: Path, base: BaseModel, data: dict[str, TaskData], steps: Steps) -> list[Expert]:
    from adapterfuse.train.expert import train_expert

    if recipe.experts.paths:
        steps.start(f"experts: loading {len(recipe.experts.paths)} given folders")
        return list(ExpertLibrary.load(recipe.experts.paths, base.fingerprint))
    experts = []
    for task, name, cfg in recipe.trained_experts():
        folder = expert_folder(recipe, out, name)
        if (folder / "adapterfuse.json").is_file():
            steps.start(f"expert {name}: reused")
            expert = Expert.load(folder)
            if expert.task != task:
                raise ConfigError(
                    f"expert {name!r} at {folder} records task {expert.task!r}, the recipe uses it for task "
                    f"{task!r}; delete that folder to retrain, or point the recipe at the right one"
                )
            _check_reused(expert, cfg)
        else:
            steps.start(f"expert {name}: training ({cfg.max_train_examples} examples, {cfg.epochs:g} epoch(s)) ...")
            t0 = time.perf_counter()
            expert = train_expert(base, task, cfg, out=folder, data=data[task], progress=True)
            steps.say(f"expert {name}: trained in {time.perf_counter() - t0:.0f} s")
        experts.append(expert)
    return experts


class TaskwisePredictor:
    """One predictor per task (e.g. a parameter-efficient ensemble trained for each), behind one name."""

    def __init__(self, name: str, by_task: dict[str, Any]) -> None:
        self.name, self.by_task = name, by_task

    def predict_proba(self, task: TaskSpec, batch: list[Example]):
        """Delegate to the task's own predictor."""
        if task.train_task not in self.by_task:
            raise ConfigError(f"{self.name}: no predictor for task {task.name!r}; have {sorted(self.by_task)}")
        return self.by_task[task.train_task].predict_proba(task, batch)

    def cost(self) -> Cost:
        """Parameters and memory of all tasks' predictors; passes per input of the costliest."""
        costs = [p.cost() for p in self.by_task.values()]
        return Cost(
            sum(c.stored_params for c in costs),
            max(c.forward_passes for c in costs),
            sum(c.memory_bytes for c in costs),
        )

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Parameter-efficient ensembles are already saved under OUT/pe."""
        raise ConfigError(f"{self.name}: its ensembles are saved under the run's pe/ folder; nothing more to save")


def _pe_ensembles(
    entry: CombinerEntry, recipe: Recipe, out: Path, base: BaseModel, data: dict[str, TaskData]
) -> TaskwisePredictor:
    from adapterfuse.train.pe.options import PESpec
    from adapterfuse.train.pe.predictor import MANIFEST, PEEnsemble
    from adapterfuse.train.pe.train import train_pe_ensemble

    opts = dict(entry.options)
    kind, members = opts.pop("kind", "batchensemble"), opts.pop("members", 4)
    by_task = {}
    for task in recipe.tasks:
        cfg = recipe.train_config(task, recipe.experts.seeds[0])
        folder = out / "pe" / f"{task}-{kind}-k{members}-{_digest(cfg.model_dump(), opts)}"
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


def _options(entry: CombinerEntry) -> dict[str, Any]:
    """A merge/ensemble/route combiner's options; the predictor's name is the entry's label."""
    model = BACKENDS[entry.backend][0]
    return {**entry.options, "name": entry.label} if "name" in model.model_fields else dict(entry.options)


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
    options = _options(entry) if options is None else options
    return make_combiner(entry.backend, base, options, entry.members).fit(library, validation)


def _fit(
    entry: CombinerEntry,
    recipe: Recipe,
    out: Path,
    base: BaseModel,
    library: ExpertLibrary,
    data: dict[str, TaskData],
    validation: dict[str, TaskData],
) -> Predictor:
    if entry.backend == "pe_ensemble":
        return _pe_ensembles(entry, recipe, out, base, data)
    predictor = fit_combiner(entry, base, library, validation)
    predictor.name = entry.label  # a merge names its predictor after the method; a recipe row goes by its label
    return predictor


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


def _setting(entry: CombinerEntry) -> dict[str, Any]:
    """What produced a combiner's result: its recipe entry and the full config its options resolve to (so a
    changed default does not reuse a result fitted with the old one)."""
    if entry.backend not in BACKENDS:
        return entry.model_dump()
    return {**entry.model_dump(), "config": backend_config(entry.backend, _options(entry)).model_dump(mode="json")}


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
    h = recipe.harness
    data, validation = load_data(recipe)
    library = ExpertLibrary(_experts(recipe, out, base, data, steps), base.fingerprint)
    setting = _digest(
        h.model_dump(),
        {t: e.model_dump() for t, e in recipe.tasks.items()},
        sorted(e.weights_sha256() for e in library),
    )
    done = {k: v for k, v in _finished_results(out).items() if v.get("setting", {}).get("digest") == setting}
    results = []

    def measure(
        label: str, config: Any, build: Callable[[], Predictor], fits: bool = True, task_id: bool = False
    ) -> None:
        key = _digest(setting, config)
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
        result = evaluate(predictor, list(data.values()))
        result.update(predictor=label, fit_seconds=round(fit_s, 1), setting={"digest": setting, "key": key})
        result["needs_task_id"] = task_id  # told each input's task: the report keeps it off the Pareto front
        results.append(result)
        if not main:
            return
        _save_and_push(recipe, out, label, predictor, steps.say)
        _append_line(out / "results.jsonl", json.dumps(result))
        steps.say(
            f"predictor {label}: average {result['average']:.3f}, {result['examples_per_s']:.1f} ex/s "
            f"(fit {fit_s:.0f} s)"
        )
        del predictor
        gc.collect()

    if "zero_shot" in h.baselines:
        measure("base zero-shot", "zero_shot", lambda: ZeroShotPredictor(base), fits=False)
    if "oracle" in h.baselines:
        measure("oracle", [e.name for e in library], lambda: OraclePredictor(base, library), False, True)
    for entry in recipe.combiners:
        build = partial(_fit, entry, recipe, out, base, library, data, validation)
        measure(entry.label, _setting(entry), build, task_id=entry.backend == "pe_ensemble")
    summary = {"recipe": recipe.name, "results": results, "wall_s": round(time.perf_counter() - t_start, 1)}
    return _report(recipe, out, summary, steps, main)


def _base(recipe: Recipe, base: BaseModel | None, device: str | None) -> BaseModel:
    """The given base, or the recipe's loaded onto the device; its layers checked before any expert trains."""
    base = base or load_base(recipe.base, device=device or recipe.device)
    check_layers(recipe, n_layers(base.model))
    return base


def _report(recipe: Recipe, out: Path, summary: dict[str, Any], steps: Steps, main: bool) -> dict[str, Any]:
    """Write results.md, the plots and results.json from the main process; the others wait for it."""
    if main:
        steps.start(f"report: results.md{' and plots' if recipe.outputs.plots else ''} in {out}")
        summary["files"] = write_report(summary, out, plots=recipe.outputs.plots)
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
