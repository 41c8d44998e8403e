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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterfuse.backends.base import BACKENDS, backend_config, make_combiner
from adapterfuse.base import BaseModel, load_base
from adapterfuse.errors import ConfigError
from adapterfuse.expert import Expert
from adapterfuse.harness import OraclePredictor, ZeroShotPredictor, evaluate
from adapterfuse.io.atomic import write_json
from adapterfuse.library import ExpertLibrary
from adapterfuse.predictor import Cost, Predictor
from adapterfuse.recipe.checks import check_expert_headers, check_recipe
from adapterfuse.recipe.report import write_report
from adapterfuse.recipe.schema import CombinerEntry, Recipe
from adapterfuse.tasks.glue import load_task
from adapterfuse.tasks.spec import Example, TaskData, TaskSpec
from adapterfuse.train.config import TrainConfig

# Fields recorded by training that are measurements, not settings.
_MEASURED = {"eval_wall_s", "resumed_from_step", "steps", "train_examples", "train_tokens_per_s", "train_wall_s"}
DATA_SEED = 0  # every expert of a task sees the same carve, so no seed trains on another's validation


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expert_folder(recipe: Recipe, out: Path, name: str) -> Path:
    """Where the expert ``name`` of a recipe lives."""
    return Path(recipe.experts.dir) / name if recipe.experts.dir else out / "experts" / name


def plan(recipe: Recipe, out: Path) -> list[str]:
    """What a run would do, step by step, and what is already done; reads no weight.

    Raises:
        ConfigError / CompatibilityError: a bad combiner option, or finished experts that disagree.
    """
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
    log = out / "results.jsonl"
    if not log.is_file():
        return {}
    return {r["predictor"]: r for r in (json.loads(line) for line in log.read_text().splitlines() if line.strip())}


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


def _experts(recipe: Recipe, out: Path, base: BaseModel, data: dict[str, TaskData], log: Callable) -> list[Expert]:
    from adapterfuse.train.expert import train_expert

    if recipe.experts.paths:
        return list(ExpertLibrary.load(recipe.experts.paths, base.fingerprint))
    experts = []
    for task, name, cfg in recipe.trained_experts():
        folder = expert_folder(recipe, out, name)
        if (folder / "adapterfuse.json").is_file():
            expert = Expert.load(folder)
            _check_reused(expert, cfg)
            log(f"expert {name}: reused")
        else:
            t0 = time.perf_counter()
            expert = train_expert(base, task, cfg, out=folder, data=data[task])
            log(f"expert {name}: trained in {time.perf_counter() - t0:.0f} s")
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
        else:
            ens = train_pe_ensemble(base, task, kind, members, cfg, out=folder, data=data[task], **opts)
        by_task[task] = ens.predictor(base)
    return TaskwisePredictor(entry.label, by_task)


def _options(entry: CombinerEntry) -> dict[str, Any]:
    """A merge/ensemble/route combiner's options; the predictor's name is the entry's label."""
    model = BACKENDS[entry.backend][0]
    return {**entry.options, "name": entry.label} if "name" in model.model_fields else dict(entry.options)


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
    predictor = make_combiner(entry.backend, base, _options(entry), entry.members).fit(library, validation)
    predictor.name = entry.label  # a merge names its predictor after the method; a recipe row goes by its label
    return predictor


def _setting(entry: CombinerEntry) -> dict[str, Any]:
    """What produced a combiner's result: its recipe entry and the full config its options resolve to (so a
    changed default does not reuse a result fitted with the old one)."""
    if entry.backend not in BACKENDS:
        return entry.model_dump()
    return {**entry.model_dump(), "config": backend_config(entry.backend, _options(entry)).model_dump(mode="json")}


def run_recipe(
    recipe: Recipe, out: str | Path, base: BaseModel | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Do everything a recipe asks, resuming what an earlier run under ``out`` finished.

    Args:
        recipe: a validated recipe (see :func:`~adapterfuse.recipe.schema.load_recipe`).
        out: the run folder.
        base: an already loaded base (default: load ``recipe.base``).
        log: where progress lines go.

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
    write_json(out / "recipe.json", json.loads(recipe.model_dump_json()))
    base = base or load_base(recipe.base)
    h = recipe.harness
    data = {}
    for task, entry in recipe.tasks.items():
        cap = recipe.train_config(task, recipe.experts.seeds[0]).max_train_examples
        data[task] = load_task(task, h.validation_size, DATA_SEED, cap, entry.max_test or h.max_test)
    validation = {t: TaskData(d.task, [], d.validation[: h.validation_per_task], []) for t, d in data.items()}
    library = ExpertLibrary(_experts(recipe, out, base, data, log), base.fingerprint)
    setting = _digest(
        h.model_dump(),
        {t: e.model_dump() for t, e in recipe.tasks.items()},
        sorted(e.weights_sha256() for e in library),
    )
    done = {k: v for k, v in _finished_results(out).items() if v.get("setting", {}).get("digest") == setting}
    results = []

    def measure(label: str, config: Any, build: Callable[[], Predictor]) -> None:
        key = _digest(setting, config)
        if label in done and done[label]["setting"]["key"] == key:
            log(f"predictor {label}: reused result (average {done[label]['average']:.3f})")
            results.append(done[label])
            return
        t0 = time.perf_counter()
        predictor = build()
        fit_s = time.perf_counter() - t0
        result = evaluate(predictor, list(data.values()))
        result.update(predictor=label, fit_seconds=round(fit_s, 1), setting={"digest": setting, "key": key})
        saved = out / "predictors" / label.replace("/", "_").replace(" ", "_") if label in recipe.outputs.save else None
        if saved is not None:
            predictor.save(saved, overwrite=True)
        if label in {p.predictor for p in recipe.outputs.push}:
            _push(recipe, label, predictor, log, saved)
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(result) + "\n")
        log(
            f"predictor {label}: average {result['average']:.3f}, {result['examples_per_s']:.1f} ex/s "
            f"(fit {fit_s:.0f} s)"
        )
        results.append(result)
        del predictor
        gc.collect()

    if "zero_shot" in h.baselines:
        measure("base zero-shot", "zero_shot", lambda: ZeroShotPredictor(base))
    if "oracle" in h.baselines:
        measure("oracle", [e.name for e in library], lambda: OraclePredictor(base, library))
    for entry in recipe.combiners:
        measure(entry.label, _setting(entry), lambda e=entry: _fit(e, recipe, out, base, library, data, validation))
    summary = {"recipe": recipe.name, "results": results, "wall_s": round(time.perf_counter() - t_start, 1)}
    summary["files"] = write_report(summary, out, plots=recipe.outputs.plots)
    write_json(out / "results.json", summary)
    return summary


def _push(recipe: Recipe, label: str, predictor: Any, log: Callable[[str], None], saved: Path | None) -> None:
    for entry in (p for p in recipe.outputs.push if p.predictor == label):  # only merges (checked on load)
        pushed = predictor.adapter.push_to_hub(
            entry.repo_id, private=entry.private, overwrite=entry.overwrite, endpoint=entry.endpoint, saved=saved
        )
        log(f"pushed {label} to {entry.repo_id}: {pushed}")
