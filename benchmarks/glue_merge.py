"""Every merge method on the GLUE experts, with base zero-shot and the oracle, on one harness.

Usage (GLUE_DIR set, experts from benchmarks/glue_experts.py)::

    python benchmarks/glue_merge.py --experts-dir runs/experts --out runs/merge [--max-test N]

Validation data (what λ, the soup and the learned weights are fitted on) is the validation split the
experts were carved with (seed 0, 200 per task, never trained on), capped at --validation-per-task.
Each predictor's result is written to ``<out>/results.jsonl`` as soon as it is measured (a rerun
skips predictors already there), and the table is printed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import adapterfuse
from adapterfuse import ExpertLibrary, OraclePredictor, ZeroShotPredictor, evaluate, load_base, load_task
from adapterfuse.harness import results_table
from adapterfuse.tasks.spec import TaskData

METHODS: dict[str, dict] = {  # the uniform-vs-learned comparison first: a cut-short run still has it
    "uniform": {"method": "uniform"},
    "learned (gradient)": {"method": "learned", "mode": "gradient", "epochs": 3},
    "task_arithmetic (λ on val)": {"method": "task_arithmetic"},
    "ties (d=0.2; λ on val)": {"method": "ties", "density": 0.2},
    "greedy soup": {"method": "greedy_soup"},
    "dare_linear (d=0.5; λ on val)": {"method": "dare_linear", "density": 0.5},
    "dare_ties (d=0.5; λ on val)": {"method": "dare_ties", "density": 0.5},
    "learned (gradient; per layer)": {"method": "learned", "mode": "gradient", "per_layer": True, "epochs": 3},
    "learned (gradient-free)": {"method": "learned", "mode": "gradient_free", "steps": 16},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts-dir", type=Path, default=Path("runs/experts"))
    parser.add_argument("--tasks", default="sst2,cola,stsb,mrpc,rte")
    parser.add_argument("--out", type=Path, default=Path("runs/merge"))
    parser.add_argument("--validation-per-task", type=int, default=100)
    parser.add_argument("--max-test", type=int, default=None, help="cap on dev examples per task (seeded subset)")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()

    tasks = args.tasks.split(",")
    base = load_base()
    library = ExpertLibrary.load([args.experts_dir / f"{t}-lora-r8-s0" for t in tasks], base.fingerprint)
    data = [load_task(t, validation_size=200, seed=0, max_test=args.max_test) for t in tasks]
    validation = [TaskData(d.task, [], d.validation[: args.validation_per_task], []) for d in data]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    done = (
        {json.loads(line)["predictor"]: json.loads(line) for line in log.read_text().splitlines()}
        if log.is_file()
        else {}
    )

    def record(result: dict) -> None:
        done[result["predictor"]] = result
        with open(log, "a") as fh:
            fh.write(json.dumps(result) + "\n")
        print(results_table([result]).splitlines()[-1], flush=True)

    if "base zero-shot" not in done:
        record(evaluate(ZeroShotPredictor(base), data))
    if "oracle" not in done:
        oracle = OraclePredictor(base, library)
        record(evaluate(oracle, data))
        del oracle
    for label in args.methods.split(","):
        if label in done:
            continue
        t0 = time.perf_counter()
        merged = adapterfuse.merge(library, base=base, validation=validation, **METHODS[label])
        fit_s = time.perf_counter() - t0
        predictor = merged.predictor(base, name=label)
        result = evaluate(predictor, data)
        meta = merged.metadata()
        result["merge"] = {
            "fit_seconds": round(fit_s, 1),
            "params": meta.get("params"),
            "search": meta.get("search"),
            "overall_truncation_error": meta["truncation_error"]["overall"],
        }
        record(result)
        del predictor, merged
        gc.collect()
    order = ["base zero-shot", "oracle", *[m for m in args.methods.split(",") if m in done]]
    print("\n" + results_table([done[name] for name in order]))
    for name in order:
        search = (done[name].get("merge") or {}).get("search") or {}
        if "learned" in search:
            print(f"{name}: learned weights {json.dumps(search['learned'].get('weights'))}")
        if "lambda_search" in search:
            print(f"{name}: λ search {json.dumps(search['lambda_search'])}")
        if "soup" in search:
            print(f"{name}: soup {json.dumps(search['soup'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
