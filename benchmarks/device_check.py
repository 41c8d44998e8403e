"""Device check: scoring, a K=8 ensemble pass, a router and a short training run on a device, against the CPU.

Usage::

    python benchmarks/device_check.py [--base SPEC|tiny] [--device auto] [--examples 32] [--k 8] [--steps 4]

The same four pieces of work run on the chosen device (``auto``: CUDA, then MPS, then CPU) and, when
that is not the CPU, on the CPU too:

- scoring: the base zero-shot on ``--examples`` SST-2 prompts (``ZeroShotPredictor``);
- ensemble: ``--k`` synthetic experts (random seeded rank-8 factors) pooled in one batched pass;
- router: Arrow routing over the same experts, per token in every adapted layer (no fitting data needed);
- training: ``train_expert`` for ``--steps`` steps of 8 examples (then its own scoring of 8 examples).

Prompts are SST-2 dev examples from GLUE_DIR, or synthetic sentences when it is unset. ``--base tiny``
is a 2-layer Llama (hidden 32) on the default tokenizer, for a check in seconds. Prints a Markdown table
of examples/s (tokens/s for training) per device and the speed-up over the CPU, and the largest
difference of the scored probabilities between the device and the CPU (autocast precision may differ).
Exits 1 if a device's probabilities are not finite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from bench_ensemble import prompts, sync
from synthetic import random_expert, tiny_llama

from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.backends.route.api import route
from adapterfuse.base import BaseModel, load_base, load_default_tokenizer, wrap_base
from adapterfuse.device import autocast_dtype, resolve_device
from adapterfuse.harness import ZeroShotPredictor
from adapterfuse.tasks.glue import get_task
from adapterfuse.tasks.spec import Example, TaskData
from adapterfuse.train.config import TrainConfig
from adapterfuse.train.expert import train_expert


def tiny_base(device: torch.device) -> BaseModel:
    """The test-sized base (:func:`synthetic.tiny_llama`) on the default tokenizer, on ``device``."""
    tokenizer = load_default_tokenizer()
    return wrap_base(tiny_llama(tokenizer, seed=0).to(device), tokenizer, "tiny")


def get_base(spec: str, device: torch.device) -> BaseModel:
    """The base ``spec`` (``tiny`` for the test-sized model) loaded onto ``device``."""
    return tiny_base(device) if spec == "tiny" else load_base(spec, device=device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``fn()``'s result and its wall seconds (the device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def train_rate(base: BaseModel, examples: list[Example], steps: int) -> float:
    """Training tokens/s of ``train_expert`` over ``steps`` steps of 8 examples (LoRA rank 8, the default modules)."""
    task = get_task("sst2")
    train = [Example(examples[i % len(examples)].fields, i % 2, i) for i in range(8 * steps)]
    data = TaskData(task, train, train[:8], train[:8])
    config = TrainConfig(max_train_examples=8 * steps, batch_size=8, epochs=1.0, max_eval_examples=8, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        expert = train_expert(base, task, config, out=Path(tmp) / "expert", data=data, progress=False)
    return float(expert.meta["training"]["train_tokens_per_s"])


def measure(base: BaseModel, examples: list[Example], k: int, steps: int) -> dict[str, object]:
    """Examples/s of scoring, the K-member ensemble and the router; tokens/s of training; the scored probabilities."""
    device, task, n = base.device, get_task("sst2"), len(examples)
    experts = [random_expert(base, f"e{i}", seed=i, task="sst2") for i in range(k)]
    zero = ZeroShotPredictor(base, batch_size=16)
    zero.predict_proba(task, examples[:2])  # warm-up: kernels, allocator
    probs, score_s = timed(partial(zero.predict_proba, task, examples), device)
    pooled = ensemble(experts, base, pooling="linear", batch_size=16)
    _, ens_s = timed(partial(pooled.predict_proba, task, examples), device)
    routed = route(experts, base, router="arrow", top_k=2, batch_size=16)
    _, route_s = timed(partial(routed.predict_proba, task, examples), device)
    return {
        "scoring": n / score_s,
        f"ensemble K={k}": n / ens_s,
        "router (arrow top-2)": n / route_s,
        "training (tokens/s)": train_rate(base, examples, steps),
        "probs": probs,
    }


def table(rows: dict[str, dict[str, object]], devices: list[str]) -> str:
    """The Markdown table: one row per piece of work, one column per device, and the speed-up over the CPU."""
    works = [w for w in rows[devices[0]] if w != "probs"]
    head = ["work", *(f"{d} /s" for d in devices)] + (["speed-up"] if len(devices) > 1 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in works:
        cells = [w, *(f"{float(rows[d][w]):,.1f}" for d in devices)]
        if len(devices) > 1:
            cells.append(f"{float(rows[devices[0]][w]) / float(rows['cpu'][w]):.1f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="base spec, or 'tiny' (default: the default base)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--examples", type=int, default=32, help="prompts scored (default 32)")
    parser.add_argument("--k", type=int, default=8, help="ensemble members (default 8)")
    parser.add_argument("--steps", type=int, default=4, help="training steps of 8 examples (default 4)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    examples, source = prompts(args.examples)
    devices = [str(device)] + (["cpu"] if device.type != "cpu" else [])
    print(
        f"base {args.base or 'default'}; {args.examples} prompts ({source}); K={args.k}; {args.steps} steps", flush=True
    )
    rows = {}
    for name in devices:
        dev = torch.device(name)
        t0 = time.perf_counter()
        rows[name] = measure(get_base(args.base or "default", dev), examples, args.k, args.steps)
        print(
            f"{name}: autocast {autocast_dtype(dev) or 'off (fp32)'}; done in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    print(table(rows, devices))
    if len(devices) > 1:
        gap = (rows[devices[0]]["probs"] - rows["cpu"]["probs"]).abs().max().item()  # type: ignore[operator]
        print(f"largest |p_{devices[0]} - p_cpu| of the scored probabilities: {gap:.2e}")
    if not all(torch.isfinite(rows[d]["probs"]).all() for d in devices):  # type: ignore[arg-type]
        print("non-finite probabilities", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
