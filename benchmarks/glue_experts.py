"""Train the GLUE experts of docs/results.md and print zero-shot against trained, side by side.

Usage (GLUE_DIR set; writes experts under --out, skips experts that are already finished)::

    python benchmarks/glue_experts.py --out runs/experts [--tasks sst2,cola] [--method adalora]

Each task's training examples and epochs are capped so one expert trains in at most ~20 minutes on
the 2-core CPU machine. Prints a Markdown table and writes ``<out>/summary-<method>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from adapterfuse import TrainConfig, load_base, load_task, train_expert
from adapterfuse.expert import Expert
from adapterfuse.harness import ZeroShotPredictor, evaluate

# Caps that fit ~20 minutes per expert here (pair tasks have ~3x longer prompts than SST-2/CoLA).
PLAN: dict[str, dict] = {
    "sst2": {"max_train_examples": 4000, "epochs": 1.0},
    "cola": {"max_train_examples": 6000, "epochs": 1.0, "balance_classes": True},
    "mrpc": {"max_train_examples": 3468, "epochs": 1.5},
    "stsb": {"max_train_examples": 5000, "epochs": 1.0},
    "rte": {"max_train_examples": 2290, "epochs": 1.5},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tasks", default=",".join(PLAN))
    parser.add_argument("--method", default="lora", choices=["lora", "adalora"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base = load_base()
    rows = []
    for task in args.tasks.split(","):
        config = TrainConfig(method=args.method, rank=args.rank, seed=args.seed, **PLAN[task])
        data = load_task(task, config.validation_size, config.seed, config.max_train_examples)
        zero = evaluate(ZeroShotPredictor(base), [data])["tasks"][task]
        folder = args.out / f"{task}-{args.method}-r{args.rank}-s{args.seed}"
        if (folder / "adapterfuse.json").is_file():
            expert = Expert.load(folder)
        else:
            t0 = time.perf_counter()
            expert = train_expert(base, task, config, out=folder, data=data)
            print(f"{task}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        tr = expert.meta["training"]
        row = {
            "task": task,
            "zero_shot": zero,
            "expert": expert.meta["scores"]["test"],
            "train_examples": tr["train_examples"],
            "epochs": tr["epochs"],
            "steps": tr["steps"],
            "train_wall_s": tr["train_wall_s"],
            "tokens_per_s": tr["train_tokens_per_s"],
            "adalora_ranks": expert.meta.get("adalora_ranks"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / f"summary-{args.method}.json").write_text(json.dumps(rows, indent=2))
    print("\n| task | metric | zero-shot | expert | train examples | epochs | wall (min) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for m in (k for k in r["expert"] if k != "score"):
            print(
                f"| {r['task']} | {m} | {r['zero_shot'][m]:.3f} | {r['expert'][m]:.3f} | {r['train_examples']} "
                f"| {r['epochs']:g} | {r['train_wall_s'] / 60:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
