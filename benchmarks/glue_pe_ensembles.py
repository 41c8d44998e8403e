"""Parameter-efficient ensembles on GLUE against one LoRA and K independent LoRAs, one table per task.

Usage (GLUE_DIR set, or --glue-dir)::

    python benchmarks/glue_pe_ensembles.py --out runs/pe_ensembles [--tasks sst2,rte] [--members 4]
        [--base PATH] [--max-train N] [--epochs E] [--max-test N] [--batch-size B] [--methods ...]

Rows: single LoRA; K LoRAs trained apart (seeds 0..K-1) pooled by the ensemble backend; BatchEnsemble-
LoRA, MIMO, CAMERO (K members each) and SWAG (K samples); ``batchensemble_split`` (not in the default
``--methods``) is BatchEnsemble with each step's batch cut into K blocks, one per member. Columns: the
dev score (GLUE dev, the harness's test split), the trained parameters, the stored parameters, the
training wall time (for the independent LoRAs: the sum of their K runs) and its ratio to the single
LoRA, the peak memory of training (its rise over the loaded base: allocated CUDA memory on a GPU,
resident memory on a CPU, see ``benchmarks.memory``) and its ratio to the single LoRA, and the
inference examples/s of the harness. Every model folder goes under ``<out>/<task>/`` and is reused on
a rerun; each row is appended to ``<out>/<task>/results.jsonl`` as soon as it is measured (a rerun
skips rows already there) and the tables are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from memory import PeakMemory

from adapterfuse import TrainConfig, load_base, load_task, train_expert
from adapterfuse.backends.ensemble.predictor import EnsemblePredictor
from adapterfuse.base import BaseModel
from adapterfuse.expert import Expert
from adapterfuse.harness import ModelPredictor, adapter_params, evaluate
from adapterfuse.head import Scoring
from adapterfuse.tasks.spec import TaskData
from adapterfuse.train.pe.options import PESpec
from adapterfuse.train.pe.predictor import MANIFEST, PEEnsemble
from adapterfuse.train.pe.train import train_pe_ensemble

# Per-task training caps (recipes/glue.yaml's, but RTE's epochs): the single LoRA row trains like an expert.
PLAN: dict[str, dict[str, Any]] = {
    "sst2": {"max_train_examples": 4000, "epochs": 1.0},
    "cola": {"max_train_examples": 6000, "epochs": 1.0, "balance_classes": True},
    "mrpc": {"max_train_examples": 3468, "epochs": 1.5},
    "stsb": {"max_train_examples": 5000, "epochs": 1.0},
    "rte": {"max_train_examples": 2290, "epochs": 2.0},
}
METHODS = ("single", "independent", "batchensemble", "mimo", "camero", "swag", "batchensemble_split")
# Rows that train a kind with non-default options: row name -> (kind, options).
# CAMERO runs with dropout on its hidden states, as in results.md's table (the default is no perturbation).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "batchensemble_split": ("batchensemble", {"be_data": "split"}),
    "camero": ("camero", {"camero_perturbation": "dropout"}),
}


def _label(method: str, k: int) -> str:
    return {
        "single": "single LoRA",
        "independent": f"{k} LoRAs pooled (ensemble backend)",
        "batchensemble": f"BatchEnsemble-LoRA ({k} members)",
        "mimo": f"MIMO ({k} slots)",
        "camero": f"CAMERO ({k} members)",
        "swag": f"SWAG ({k} samples)",
        "batchensemble_split": f"BatchEnsemble-LoRA ({k} members, batch split across members)",
    }[method]


def _expert(base: BaseModel, task: str, config: TrainConfig, folder: Path, data: TaskData) -> tuple[Expert, float]:
    """Train (or reuse) one LoRA expert; return it and its training wall time."""
    if not (folder / "adapterfuse.json").is_file():
        train_expert(base, task, config, out=folder, data=data, overwrite=folder.exists())
    expert = Expert.load(folder)
    return expert, float(expert.meta["training"]["train_wall_s"])


def run_method(
    method: str,
    base: BaseModel,
    task: str,
    config: TrainConfig,
    data: TaskData,
    train_data: TaskData,
    folder: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train (or reuse) one row's model and measure it on the dev split."""
    k, scoring = (
        args.members,
        {"batch_size": args.eval_batch_size, "autocast": config.autocast, "max_length": config.max_length},
    )
    peak = PeakMemory("cuda" if torch.cuda.is_available() else "cpu")
    with peak:
        predictor, wall, trained = _train(method, base, task, config, train_data, folder, k, scoring)
    result = evaluate(predictor, [data])
    return {
        "method": method,
        "predictor": predictor.name,
        "task": task,
        "dev": result["tasks"][task],
        "trained_params": trained,
        "stored_params": result["cost"]["stored_params"],
        "train_wall_s": wall,
        "train_peak_gib": round(peak.gib, 3),
        "train_peak_device": "cuda" if peak.cuda else "cpu",
        "examples_per_s": result["examples_per_s"],
    }


def _train(
    method: str,
    base: BaseModel,
    task: str,
    config: TrainConfig,
    train_data: TaskData,
    folder: Path,
    k: int,
    scoring: dict[str, Any],
) -> tuple[Any, float, int]:
    """Train (or reuse) one row's model; return its predictor, training wall time and trained parameters."""
    if method == "single":
        expert, wall = _expert(base, task, config, folder / "lora-s0", train_data)
        predictor = ModelPredictor(
            _label(method, k),
            expert.attach(base.model),
            base.tokenizer,
            stored_params=adapter_params([expert]),
            **scoring,
        )
        trained = adapter_params([expert])
    elif method == "independent":
        runs = [
            _expert(base, task, config.model_copy(update={"seed": config.seed + i}), folder / f"lora-s{i}", train_data)
            for i in range(k)
        ]
        experts, wall = [e for e, _ in runs], sum(w for _, w in runs)
        predictor = EnsemblePredictor(base, experts, "linear", scoring=Scoring(**scoring), name=_label(method, k))
        trained = adapter_params(experts)
    else:
        out = folder / f"{method}-k{k}"
        if not (out / MANIFEST).is_file():
            kind, options = VARIANTS.get(method, (method, {}))
            train_pe_ensemble(
                base, task, PESpec(kind, k, config, options), out=out, data=train_data, overwrite=out.exists()
            )
        ensemble = PEEnsemble.load(out)
        predictor = ensemble.predictor(base, name=_label(method, k), **scoring)
        wall, trained = ensemble.manifest["training"]["train_wall_s"], ensemble.manifest["training"]["trained_params"]
    return predictor, wall, trained


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of one task's rows (training time and memory relative to the single LoRA when measured)."""
    single = next((r for r in rows if r["method"] == "single"), None)
    metrics = [m for m in rows[0]["dev"] if m not in ("n", "seconds", "examples_per_s")]
    head = [
        "method",
        *[f"dev {m}" for m in metrics],
        "trained params",
        "stored params",
        "train wall (s)",
        "x single",
        "train peak rise (GiB)",
        "x single",
        "inference ex/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ratio(r: dict[str, Any], key: str) -> str:
        return f"{r[key] / single[key]:.2f}" if single and r.get(key) and single.get(key) else "—"

    for r in rows:
        device = r.get("train_peak_device", "cuda")  # rows written before CPU peaks were measured: CUDA or none
        peak = "—" if r.get("train_peak_gib") is None else f"{r['train_peak_gib']:.2f} ({device})"
        cells = [
            r["predictor"],
            *[f"{r['dev'][m]:.3f}" for m in metrics],
            f"{r['trained_params']:,}",
            f"{r['stored_params']:,}",
            f"{r['train_wall_s']:.1f}",
            ratio(r, "train_wall_s"),
            peak,
            ratio(r, "train_peak_gib"),
            f"{r['examples_per_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pe_ensembles"))
    parser.add_argument("--base", default=None, help="base model spec (default: the built-in default base)")
    parser.add_argument("--glue-dir", type=Path, default=None, help="sets GLUE_DIR")
    parser.add_argument("--tasks", default="sst2,rte")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS[:6]), help=f"some of {','.join(METHODS)}")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train", type=int, default=None, help="override the per-task cap of PLAN")
    parser.add_argument("--epochs", type=float, default=None, help="override the per-task epochs of PLAN")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--validation-size", type=int, default=200, help="carved from train as the experts were")
    parser.add_argument("--max-test", type=int, default=None, help="cap on dev examples (seeded subset)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--no-autocast", action="store_true", help="run the base in fp32 (default: bf16 autocast)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.glue_dir is not None:
        os.environ["GLUE_DIR"] = str(args.glue_dir)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; expected some of {','.join(METHODS)}")
    base = load_base(args.base)
    if torch.cuda.is_available():
        base.model.to("cuda")
    tables = []
    for task in args.tasks.split(","):
        plan = {**PLAN.get(task, {})}
        plan.update({k: v for k, v in (("max_train_examples", args.max_train), ("epochs", args.epochs)) if v})
        config = TrainConfig(
            rank=args.rank,
            seed=args.seed,
            batch_size=args.batch_size,
            validation_size=args.validation_size,
            autocast=not args.no_autocast,
            **plan,
        )
        data = load_task(task, config.validation_size, config.seed, config.max_train_examples, args.max_test)
        # Training's own end-of-run evaluation is kept token-sized: the harness measures dev below.
        train_data = TaskData(data.task, data.train, [], data.test[:4])
        folder = args.out / task
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "results.jsonl"
        done = {json.loads(x)["method"]: json.loads(x) for x in log.read_text().splitlines()} if log.is_file() else {}
        for method in args.methods.split(","):
            if method not in done:
                t0 = time.perf_counter()
                done[method] = run_method(method, base, task, config, data, train_data, folder, args)
                with open(log, "a") as fh:
                    fh.write(json.dumps(done[method]) + "\n")
                print(
                    f"{task} {method}: {json.dumps(done[method]['dev'])} ({time.perf_counter() - t0:.0f} s)", flush=True
                )
        rows = [done[m] for m in args.methods.split(",")]
        tables.append(
            f"### {task} (K = {args.members}, {config.max_train_examples} training examples, "
            f"{config.epochs:g} epochs, dev n = {len(data.test)})\n\n{table(rows)}"
        )
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
