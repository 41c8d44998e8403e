"""Every router on the GLUE experts with no task id at test time, and on a held-out task (QNLI).

Usage (GLUE_DIR set)::

    python benchmarks/glue_route.py --experts runs/experts/{cola,sst2,stsb,mrpc,rte}-lora-r8-s0 \
        --out runs/glue_route [--heldout qnli --max-heldout 1000] [--rows NAME,...] [--recipe-results FILE]
        [--recipe recipes/glue.yaml]

Validation is carved as ``--recipe`` carves it (its ``harness.validation_size`` training examples
per task with data seed 0, the first ``validation_per_task`` of them used), so the numbers sit in one
table with that recipe's merges and ensembles: ``--recipe-results runs/glue/results.json`` adds its
zero-shot, oracle, best merge and best ensemble rows; without it, zero-shot and the oracle are measured
here. Each routed row is fitted once and scored on the
full dev sets of the experts' tasks and on the held-out tasks' dev sets (a seeded subset of
``--max-heldout``), with its routing accuracy against the oracle assignment (each input to its own
task's expert) and its cost. The held-out task has no expert and no training data: zero-shot and
every single expert are scored on it too. Rows are appended to ``OUT/results.jsonl`` as they finish
and skipped on a rerun; the tables are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from adapterfuse import load_base
from adapterfuse.backends.route.api import route, routing_accuracy
from adapterfuse.backends.route.data import RoutingData
from adapterfuse.backends.route.features import DEFAULT_LAYER, default_shape
from adapterfuse.backends.route.predictor import RoutePredictor
from adapterfuse.backends.route.subset import greedy_subset
from adapterfuse.expert import Expert
from adapterfuse.harness import ModelPredictor, OraclePredictor, ZeroShotPredictor, adapter_params, evaluate
from adapterfuse.library import ExpertLibrary
from adapterfuse.recipe.schema import load_recipe
from adapterfuse.tasks.glue import load_held_out, load_task
from adapterfuse.tasks.spec import TaskData

# label -> route() arguments; "on", "shape", "readout" and "layer" pick the routing data (features of the prompt
# or of the raw fields; on the fields the text's shape is appended unless "shape" is False; "mean_last" adds the
# last token's state to the mean; "layer" is the feature layer, default 1).
ROWS: dict[str, dict[str, Any]] = {
    "learned top-1 (best_expert)": {"router": "learned", "target": "best_expert"},
    "learned top-1": {"router": "learned", "target": "likelihood"},
    "learned top-2": {"router": "learned", "target": "likelihood", "top_k": 2},
    "learned top-1 task target": {"router": "learned", "target": "task"},
    "learned top-1 task target (mean+last)": {"router": "learned", "target": "task", "readout": "mean_last"},
    "learned top-1 task prior (mean+last)": {"router": "learned", "target": "task_prior", "readout": "mean_last"},
    "learned top-1 task target (mean+last shape pca 8)": {
        "router": "learned",
        "target": "task",
        "readout": "mean_last",
        "shape": True,
        "pca": 8,
    },
    "learned top-2 task prior (mean+last)": {
        "router": "learned",
        "target": "task_prior",
        "readout": "mean_last",
        "top_k": 2,
    },
    "learned top-1 task prior (mean+last pca 8)": {
        "router": "learned",
        "target": "task_prior",
        "readout": "mean_last",
        "pca": 8,
    },
    "learned top-1 budget 3": {"router": "learned", "target": "likelihood", "budget": 3},
    "learned top-1 (fields without shape)": {
        "router": "learned",
        "target": "likelihood",
        "on": "fields",
        "shape": False,
    },
    "learned top-1 (fields)": {"router": "learned", "target": "likelihood", "on": "fields"},
    "learned top-2 (fields)": {"router": "learned", "target": "likelihood", "top_k": 2, "on": "fields"},
    "learned top-1 task target (fields)": {"router": "learned", "target": "task", "on": "fields"},
    "learned top-1 task target (fields mean+last)": {
        "router": "learned",
        "target": "task",
        "on": "fields",
        "readout": "mean_last",
    },
    "learned top-1 task prior (fields mean+last)": {
        "router": "learned",
        "target": "task_prior",
        "on": "fields",
        "readout": "mean_last",
    },
    "learned top-1 task target (fields mean+last pca 8)": {
        "router": "learned",
        "target": "task",
        "on": "fields",
        "readout": "mean_last",
        "pca": 8,
    },
    "learned top-1 task prior (fields mean+last pca 8)": {
        "router": "learned",
        "target": "task_prior",
        "on": "fields",
        "readout": "mean_last",
        "pca": 8,
    },
    "learned top-2 task prior (fields mean+last pca 8)": {
        "router": "learned",
        "target": "task_prior",
        "on": "fields",
        "readout": "mean_last",
        "pca": 8,
        "top_k": 2,
    },
    "learned top-2 task prior (fields mean+last pca 8 log-linear)": {
        "router": "learned",
        "target": "task_prior",
        "on": "fields",
        "readout": "mean_last",
        "pca": 8,
        "top_k": 2,
        "pooling": "log_linear",
    },
    "learned top-2 task target (fields mean+last pca 8 log-linear)": {
        "router": "learned",
        "target": "task",
        "on": "fields",
        "readout": "mean_last",
        "pca": 8,
        "top_k": 2,
        "pooling": "log_linear",
    },
    "learned top-1 task target (fields mean+last pca 8 hidden 64)": {
        "router": "learned",
        "target": "task",
        "on": "fields",
        "readout": "mean_last",
        "pca": 8,
        "hidden": 64,
    },
    "learned top-1 task utility (mean+last shape pca 8)": {
        "router": "learned",
        "target": "task",
        "decision": "utility",
        "readout": "mean_last",
        "shape": True,
        "pca": 8,
    },
    "learned top-1 task utility (fields mean+last pca 8)": {
        "router": "learned",
        "target": "task",
        "on": "fields",
        "decision": "utility",
        "readout": "mean_last",
        "pca": 8,
    },
    # Layer 6: the best held-out-train task identification of layers 1-12 (route_features.py --eval-train).
    **{
        f"learned top-1 task {how} (fields mean+last pca 8 layer 6)": {
            "router": "learned",
            "target": "task",
            "on": "fields",
            "decision": decision,
            "readout": "mean_last",
            "pca": 8,
            "layer": 6,
        }
        for how, decision in (("target", "probability"), ("utility", "utility"))
    },
    **{f"clustered {c}": {"router": "clustered", "clusters": c} for c in (2, 3, 4, 5)},
    "clustered 5 (fields)": {"router": "clustered", "clusters": 5, "on": "fields"},
    **{f"mbc {g} groups": {"router": "mbc", "mbc_clusters": g, "target": "likelihood"} for g in (2, 3, 4)},
    "arrow top-1": {"router": "arrow", "top_k": 1},
}


def row_result(label: str, predictor: Any, data: list[TaskData], extra: list[TaskData]) -> dict[str, Any]:
    """Score a predictor on the in-task dev sets (none for a held-out-only baseline) and the held-out ones;
    add routing accuracy if it has one."""
    out: dict[str, Any] = {"label": label}
    if data:
        result = evaluate(predictor, data, "test")
        out.update(
            average=result["average"],
            tasks=result["tasks"],
            cost=result["cost"],
            examples_per_s=result["examples_per_s"],
        )
    if extra:
        out["heldout"] = evaluate(predictor, extra, "test")["tasks"]
    if isinstance(predictor, RoutePredictor):
        out["routing_accuracy"] = routing_accuracy(predictor, data, "test")["oracle"]
        out["validation"] = predictor.info.get("validation")
        out.update({k: predictor.info[k] for k in ("prior_weight", "prior_cv") if k in predictor.info})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", nargs="+", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--heldout", default="qnli")
    parser.add_argument("--max-heldout", type=int, default=1000)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row labels (default: all)")
    parser.add_argument("--recipe-results", type=Path, default=None, help="results.json of recipes/glue.yaml")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/glue.yaml"), help="whose validation carve")
    parser.add_argument("--base", default=None)
    args = parser.parse_args()
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; expected labels from {list(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    done = {json.loads(line)["label"] for line in log.read_text().splitlines()} if log.exists() else set()

    base = load_base(args.base)
    experts = [Expert.load(p) for p in args.experts]
    tasks = [e.task for e in experts]
    harness = load_recipe(args.recipe).harness
    data = [load_task(t, harness.validation_size, 0) for t in tasks]  # the carve ignores training caps
    validation = [TaskData(d.task, [], d.validation[: harness.validation_per_task], []) for d in data]
    extra = [load_held_out(t, args.max_heldout) for t in args.heldout.split(",")] if args.heldout else []
    routing: dict[tuple[str, int, str, int], RoutingData] = {}

    def routing_data(
        on: str, shape: bool | None = None, readout: str = "mean", layer: int = DEFAULT_LAYER
    ) -> RoutingData:  # Arrow needs none
        key = (on, default_shape(on, shape), readout, layer)  # shape None and its default share one feature pass
        if key not in routing:
            routing[key] = RoutingData(base, validation, on, layer=layer, shape=key[1], readout=readout)
        return routing[key]

    if not (args.out / "subset_curve.json").exists():
        # Quality against a budget of loaded experts, on validation: each input sent to its best kept expert
        # (scores only, no features: built on the routing data the first rows use, so the pass is shared).
        scores = routing_data("prompt", readout="mean_last").scores(experts)
        curve = greedy_subset(scores, len(experts)).report()["curve"]
        (args.out / "subset_curve.json").write_text(json.dumps(curve, indent=2))
        print(
            "greedy subset (validation, best kept expert per input): "
            + ", ".join(f"{c['budget']}: +{c['added']} {c['score']:.3f}" for c in curve),
            flush=True,
        )

    def record(label: str, build: Any, in_task: bool = True, heldout: bool = True) -> None:
        if label in done:
            return
        row = row_result(label, build(), data if in_task else [], extra if heldout else [])
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("label", "average", "routing_accuracy") if k in row}), flush=True)

    if args.recipe_results is None:  # the reference rows of the in-task table, measured here
        record("base zero-shot", lambda: ZeroShotPredictor(base), heldout=False)
        record("oracle (knows the task)", lambda: OraclePredictor(base, ExpertLibrary(experts)), heldout=False)
    if extra:  # the held-out task has no expert: zero-shot and each single expert are the baselines there
        record("zero-shot", lambda: ZeroShotPredictor(base), in_task=False)
        for e in experts:
            record(
                f"expert {e.task}",
                lambda e=e: ModelPredictor(
                    f"expert {e.task}", e.attach(base.model), base.tokenizer, stored_params=adapter_params([e])
                ),
                in_task=False,
            )
    for label in args.rows.split(","):
        kwargs = dict(ROWS[label])
        features = {
            "on": kwargs.pop("on", "prompt"),
            "shape": kwargs.pop("shape", None),
            "readout": kwargs.pop("readout", "mean"),
            "layer": kwargs.pop("layer", DEFAULT_LAYER),
        }
        record(
            label,
            lambda kw=kwargs, f=features, label=label: route(
                experts,
                base,
                validation=validation,
                name=label,
                data=None if kw["router"] == "arrow" else routing_data(**f),
                **f,
                **kw,
            ),
        )
    print_tables(log, args.recipe_results, [d.task.name for d in data], [d.task.name for d in extra])
    return 0


def print_tables(log: Path, recipe_results: Path | None, tasks: list[str], heldout: list[str]) -> None:
    """The in-task table (with the recipe's reference rows) and the held-out table, as Markdown."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    refs = []
    if recipe_results is not None:
        ref = json.loads(recipe_results.read_text())["results"]
        merges = [r for r in ref if r["predictor"].startswith("merge")]
        ensembles = [r for r in ref if r["predictor"].startswith("ensemble")]
        refs = [r for r in ref if r["predictor"] in ("base zero-shot", "oracle")]
        refs += [max(group, key=lambda r: r["average"]) for group in (merges, ensembles) if group]
    print("\n| predictor | " + " | ".join(tasks) + " | average | routing acc. | ms/input | passes/input |")
    print("|---|" + "---|" * (len(tasks) + 4))
    for r in refs + [r for r in rows if "tasks" in r]:
        name = r.get("label", r.get("predictor"))
        acc = r.get("routing_accuracy")
        print(
            f"| {name} | "
            + " | ".join(f"{r['tasks'][t]['score']:.3f}" for t in tasks)
            + f" | {r['average']:.3f} | {'' if acc is None else f'{acc:.3f}'} | {1000 / r['examples_per_s']:.1f} "
            f"| {r['cost']['forward_passes']:.2f} |"
        )
    if heldout:
        print("\n| predictor (held out) | " + " | ".join(heldout) + " |")
        print("|---|" + "---|" * len(heldout))
        for r in rows:
            if "heldout" in r:
                print(f"| {r['label']} | " + " | ".join(f"{r['heldout'][t]['score']:.3f}" for t in heldout) + " |")


if __name__ == "__main__":
    sys.exit(main())
