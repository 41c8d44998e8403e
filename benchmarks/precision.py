"""bf16 autocast against fp32 for the frozen base on this machine's CPU: training and scoring speed.

Usage (GLUE_DIR set)::

    python benchmarks/precision.py [--task sst2] [--train 96] [--score 64] [--repeats 2]

The base's precision follows the CPU (``adapterfuse.device.cpu_bf16``: bf16 only with AVX512-BF16 or AMX).
This script forces each choice in turn, alternating runs in one process, and prints the median examples
per second of ``train_expert`` and ``predict_proba`` under each, with their ratio, so the rule can be
checked on any CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import adapterfuse.device
from adapterfuse import TrainConfig, load_base, load_task, train_expert
from adapterfuse.head import predict_proba


def main() -> None:
    """Alternate bf16 and fp32 runs and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--train", type=int, default=96, help="training examples per run (batch 16)")
    parser.add_argument("--score", type=int, default=64, help="dev examples scored per run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    native = adapterfuse.device.cpu_bf16()
    base = load_base(device="cpu")
    data = load_task(args.task, validation_size=0, seed=0, max_test=args.score)
    speed: dict[str, dict[str, list[float]]] = {p: {"train": [], "score": []} for p in ("bf16", "fp32")}
    for _ in range(args.repeats):
        for precision in ("bf16", "fp32"):
            adapterfuse.device.cpu_bf16 = lambda bf16=(precision == "bf16"): bf16  # what autocast reads
            config = TrainConfig(max_train_examples=args.train, validation_size=0, max_eval_examples=16)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                train_expert(base, args.task, config, out=f"{tmp}/expert", progress=False)
                speed[precision]["train"].append(args.train / (time.perf_counter() - start))
            start = time.perf_counter()
            predict_proba(base.model, base.tokenizer, data.task, data.test, 32, True)
            speed[precision]["score"].append(len(data.test) / (time.perf_counter() - start))
    print(f"CPU computes bf16 natively: {native} (what the base uses by default: {'bf16' if native else 'fp32'})")
    for kind in ("train", "score"):
        bf16, fp32 = (statistics.median(speed[p][kind]) for p in ("bf16", "fp32"))
        print(f"{kind}: bf16 {bf16:.1f} ex/s, fp32 {fp32:.1f} ex/s, fp32/bf16 {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
