"""Same-task seed ensembles on GLUE against their best single seed, and a distilled student, one table.

Usage (GLUE_DIR set)::

    python benchmarks/glue_ensembles.py --experts-dir runs/experts --tasks sst2,stsb --seeds 0,1,2 \
        --out runs/glue_ensembles [--distill sst2] [--recipe recipes/glue.yaml]

Experts are trained exactly as ``--recipe`` trains them (its caps and epochs; every seed sees the same
validation carve, data seed 0, so no member has trained on the validation inputs the weights are
learned on); missing seeds are trained into ``--experts-dir`` and finished ones reused. Per task the
rows are each seed alone (its recorded full-dev score), then the seed ensemble pooled four ways:
linear and log-linear, uniform and learned weights (learned on the task's 200 validation inputs). The
members' dev log-probabilities come from one batched pass per task, timed, and every pooling re-pools
them. ``--distill TASK`` trains one LoRA student on the learned log-linear ensemble's distribution over
the task's training inputs and reports how much of the ensemble's gain over the best seed it keeps.
``--cross-distill N`` does the same across tasks: the learned log-linear ensemble of every task's seed-0
expert (weights learned on all tasks' validation inputs, as the recipe's cross-task ensemble) is
distilled into one multi-task LoRA on the first N training inputs of each task, then student, teacher
and zero-shot are scored on the full dev sets.
Rows are appended to ``OUT/results.jsonl`` as they finish (a rerun skips them); the table is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from adapterfuse import load_base, train_expert
from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.backends.ensemble.pooling import pool
from adapterfuse.expert import Expert
from adapterfuse.head import predictions
from adapterfuse.recipe.schema import expert_name, load_recipe
from adapterfuse.tasks.glue import load_task
from adapterfuse.tasks.metrics import compute_metrics
from adapterfuse.tasks.spec import TaskData
from adapterfuse.train.distill import distill

POOLINGS = [(p, w) for p in ("linear", "log_linear") for w in ("uniform", "learned")]


def members(base, recipe, task: str, seeds: list[int], folder: Path, data) -> list[Expert]:
    """The task's experts for ``seeds``, trained with the recipe's settings where missing."""
    out = []
    for seed in seeds:
        config = recipe.train_config(task, seed)
        path = folder / expert_name(task, config)
        if not (path / "adapterfuse.json").is_file():
            t0 = time.perf_counter()
            train_expert(base, task, config, out=path, data=data, overwrite=path.exists())
            print(f"{task} seed {seed}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        out.append(Expert.load(path))
    return out


def task_rows(task: str, experts: list[Expert], data, fitted: dict) -> list[dict[str, Any]]:
    """Each seed alone, then the seed ensemble pooled four ways on one cached batched pass over dev."""
    rows = [
        {
            "task": task,
            "label": f"seed {e.meta['training']['seed']}",
            "score": e.meta["scores"]["test"]["score"],
            "passes": 1,
        }
        for e in experts
    ]
    t0 = time.perf_counter()
    log_probs = next(iter(fitted.values())).member_log_probs(data.task, data.test)
    ms = (time.perf_counter() - t0) * 1000 / len(data.test)
    labels = [e.label for e in data.test]
    for (p, w), predictor in fitted.items():
        probs = pool(p, log_probs, predictor.weights, predictor.temperature)
        metrics = compute_metrics(data.task.metrics, predictions(data.task, probs), labels)
        rows.append(
            {
                "task": task,
                "label": f"{len(experts)} seeds, {p} {w}",
                "score": metrics["score"],
                "metrics": metrics,
                "weights": [round(float(x), 4) for x in predictor.weights],
                "temperature": predictor.temperature,
                "ms_per_input": round(ms, 2),
                "passes": len(experts),
            }
        )
    return rows


def distill_row(recipe, task: str, experts: list[Expert], data, out: Path, teacher) -> dict[str, Any]:
    """Distil ``teacher`` (the learned log-linear seed ensemble) into one LoRA adapter trained like a seed."""
    student = distill(
        teacher,
        [data],
        out / f"{task}-distilled",
        config=recipe.train_config(task, 0),
        overwrite=(out / f"{task}-distilled").exists(),
    )
    report = student.meta["distillation"]
    best_seed = max(e.meta["scores"]["test"]["score"] for e in experts)
    avg = report["test_average"]
    gain = avg["ensemble"] - best_seed
    return {
        "task": task,
        "label": "distilled (log_linear learned teacher)",
        "score": avg["student"],
        "teacher_score": avg["ensemble"],
        "kept_of_gain_over_base": report["kept"],
        # A share of a gain only means something when there is one: None when the teacher does not
        # beat the best seed.
        "kept_of_gain_over_best_seed": (avg["student"] - best_seed) / gain if gain > 1e-12 else None,
        "train_wall_s": student.meta["training"]["train_wall_s"],
        "passes": 1,
    }


def cross_distill_row(base, recipe, experts_dir: Path, out: Path, per_task: int) -> dict[str, Any]:
    """Distil the cross-task learned log-linear ensemble of the seed-0 experts into one multi-task LoRA."""
    tasks = list(recipe.tasks)
    data = [load_task(t, recipe.harness.validation_size, 0, recipe.tasks[t].max_train) for t in tasks]
    experts = [Expert.load(experts_dir / expert_name(t, recipe.train_config(t, 0))) for t in tasks]
    validation = [TaskData(d.task, [], d.validation[: recipe.harness.validation_per_task], []) for d in data]
    teacher = ensemble(experts, base, pooling="log_linear", weights="learned", validation=validation)
    config = recipe.train_config(tasks[0], 0).model_copy(update={"max_train_examples": per_task, "epochs": 1.0})
    folder = out / "cross-task-distilled"
    student = distill(teacher, data, folder, config=config, overwrite=folder.exists())
    report = student.meta["distillation"]
    avg = report["test_average"]
    return {
        "task": "all",
        "label": f"distilled cross-task ({len(tasks)} experts, log_linear learned teacher)",
        "score": avg["student"],
        "teacher_score": avg["ensemble"],
        "zero_shot": avg["base"],
        "kept_of_gain_over_base": report["kept"],
        "per_task": report["per_task"],
        "teacher_weights": [round(float(x), 4) for x in teacher.weights],
        "train_examples": student.meta["training"]["train_examples"],
        "train_wall_s": student.meta["training"]["train_wall_s"],
        "passes": 1,
    }


def print_tables(rows: list[dict[str, Any]]) -> None:
    """The same-task rows as one Markdown table (a column per task), then the cross-task row."""
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["task"] != "all"))
    labels = list(dict.fromkeys(r["label"] for r in rows if r["task"] != "all"))
    score = {(r["task"], r["label"]): r["score"] for r in rows}
    print("\n| predictor | " + " | ".join(tasks) + " | passes/input |")
    print("|---|" + "---|" * (len(tasks) + 1))
    for label in labels:
        cells = [f"{score[t, label]:.3f}" if (t, label) in score else "—" for t in tasks]
        passes = next(r["passes"] for r in rows if r["label"] == label)
        print(f"| {label} | " + " | ".join(cells) + f" | {passes} |")
    for r in rows:
        if r["task"] == "all":
            print(
                f"\n{r['label']}: student {r['score']:.3f}, teacher {r['teacher_score']:.3f}, zero-shot "
                f"{r['zero_shot']:.3f}, kept {r['kept_of_gain_over_base']:.2f} of the teacher's gain; per task "
                + json.dumps({k: {t: round(v, 3) for t, v in d.items()} for k, d in r["per_task"].items()})
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts-dir", required=True, type=Path)
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/glue.yaml"))
    parser.add_argument("--distill", default="", help="comma-separated tasks whose seed ensemble is distilled")
    parser.add_argument(
        "--cross-distill",
        type=int,
        default=0,
        metavar="N",
        help="distil the cross-task ensemble on N training inputs per task (0: skip)",
    )
    parser.add_argument("--base", default=None)
    args = parser.parse_args()
    if args.cross_distill < 0:
        parser.error(f"--cross-distill: expected N >= 0 training inputs per task (0 skips), got {args.cross_distill}")
    recipe = load_recipe(args.recipe)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    base = load_base(args.base)
    for task in filter(None, args.tasks.split(",")):
        entry = recipe.tasks[task]
        data = load_task(task, recipe.harness.validation_size, 0, entry.max_train)
        experts = members(base, recipe, task, seeds, args.experts_dir, data)
        rows_due = not any(r["task"] == task and r["label"].startswith("seed") for r in done)
        distill_due = task in args.distill.split(",") and not any(
            r["task"] == task and r["label"].startswith("distilled") for r in done
        )
        # Fitted once: the four poolings' rows and the distillation's teacher share them.
        fitted = (
            {(p, w): ensemble(experts, base, pooling=p, weights=w, validation=[data]) for p, w in POOLINGS}
            if rows_due or distill_due
            else {}
        )
        new = task_rows(task, experts, data, fitted) if rows_due else []
        if distill_due:
            new.append(distill_row(recipe, task, experts, data, args.out, fitted[("log_linear", "learned")]))
        with log.open("a") as fh:
            for row in new:
                fh.write(json.dumps(row) + "\n")
                print(json.dumps({k: row[k] for k in ("task", "label", "score")}), flush=True)
        done += new
    if args.cross_distill and not any(r["task"] == "all" for r in done):
        row = cross_distill_row(base, recipe, args.experts_dir, args.out, args.cross_distill)
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("task", "label", "score", "teacher_score")}), flush=True)
        done.append(row)
    print_tables(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
