"""Speed of the batched K-member ensemble forward against PEFT, in one process.

Usage::

    python benchmarks/bench_ensemble.py [--base SPEC] [--examples 64] [--ks 2,4,8] [--rank 8] [--repeats 5]

K synthetic members (random seeded factors of rank 8 on every linear layer; no training needed) score
the same length-sorted batches of SST-2 dev prompts (from GLUE_DIR; synthetic sentences when it is
unset), reading the label words only, in four ways:

- batched: ``BatchedEnsemble.member_logits``, one forward pass over the batch replicated K times;
- PEFT set_adapter: one ``PeftModel`` holding the K adapters, K sequential passes switching adapters;
- PEFT mixed batch: the same model, the batch replicated K times with ``adapter_names=`` (one adapter per row);
- ideal: one member's examples/s divided by K (one member = the faster of PEFT with one adapter and
  the batched path with K = 1).

Examples/s counts inputs scored by all K members. Runs alternate; medians are printed with their ratios
as a Markdown table, and the goals at the largest K (>= 0.9 of ideal, >= 1.3x PEFT mixed batches) are
reported as met or not. Exit status 1 only if the batched probabilities disagree with PEFT.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
from synthetic import random_expert

from adapterfuse import load_base
from adapterfuse.backends.ensemble.batched import BatchedEnsemble
from adapterfuse.expert import attach_experts
from adapterfuse.head import autocast_context, iter_batches, label_logits, label_token_ids
from adapterfuse.tasks.glue import get_task, read_split
from adapterfuse.tasks.spec import Example

_WORDS = (
    "the movie film was a great bad dull wonderful plot story actors acting script long short funny "
    "boring moving slow fine awful"
).split()


def prompts(n: int, seed: int = 0) -> tuple[list[Example], str]:
    """``n`` SST-2 dev examples from GLUE_DIR, or synthetic sentences of similar length when it is unset."""
    task = get_task("sst2")
    if os.environ.get("GLUE_DIR"):
        return read_split(task, "dev")[:n], f"SST-2 dev from {os.environ['GLUE_DIR']}"
    rng = random.Random(seed)
    return [
        Example((" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30))),), 0, i) for i in range(n)
    ], "synthetic sentences (GLUE_DIR unset)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Examples/s of one call of ``fn`` scoring ``n`` examples."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return n / (time.perf_counter() - t0)


def make_methods(base, experts, batches, labels, autocast: bool, device: torch.device):
    """The three ways of scoring the batches with K members; each returns ``[K, n, L]`` probabilities."""
    k = len(experts)
    batched = BatchedEnsemble(base.model, experts)
    peft = attach_experts(base.model, experts)
    names = [e.name for e in experts]

    @torch.no_grad()
    def ours():
        out = []
        for ids, mask in batches:
            with autocast_context(autocast, device):
                out.append(batched.member_logits(ids, mask, labels).softmax(-1))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def sequential():
        per_member = []
        for name in names:
            peft.set_adapter(name)
            rows = []
            for ids, mask in batches:
                with autocast_context(autocast, device):
                    rows.append(label_logits(peft, ids, mask, labels).softmax(-1))
            per_member.append(torch.cat(rows))
        return torch.stack(per_member)

    @torch.no_grad()
    def mixed():
        out = []
        for ids, mask in batches:
            rows = [name for name in names for _ in range(ids.shape[0])]
            # PEFT's own mixed-batch path (what PeftModel.forward(adapter_names=...) enables), reading
            # the label words off the last hidden state exactly as the other two do.
            with autocast_context(autocast, device), peft._enable_peft_forward_hooks(adapter_names=rows):
                logits = label_logits(peft, ids.repeat(k, 1), mask.repeat(k, 1), labels)
            out.append(logits.softmax(-1).view(k, ids.shape[0], -1))
        return torch.cat(out, dim=1)

    return {"batched": ours, "set_adapter": sequential, "mixed": mixed}


def single_member_speed(base, expert, batches, labels, autocast, device, n, repeats) -> float:
    """One member's examples/s: the faster of PEFT with one adapter and the batched path with K = 1."""
    methods = make_methods(base, [expert], batches, labels, autocast, device)
    speeds = {"batched": [], "set_adapter": []}
    for fn in ("batched", "set_adapter"):
        methods[fn]()  # warm-up
    for _ in range(repeats):
        for key in speeds:
            speeds[key].append(timed(methods[key], n, device))
    return max(statistics.median(v) for v in speeds.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="base model spec (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--examples", type=int, default=64, help="prompts scored per run")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per batch (x K rows)")
    parser.add_argument("--ks", default="2,4,8", help="ensemble sizes")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-autocast", action="store_true", help="fp32 instead of bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device, autocast = torch.device(args.device), not args.no_autocast
    base = load_base(args.base)
    base.model.to(device)
    examples, source = prompts(args.examples)
    task = get_task("sst2")
    labels = label_token_ids(task, base.tokenizer)
    batches = [
        (ids.to(device), mask.to(device))
        for _, ids, mask in iter_batches(task, examples, base.tokenizer, args.batch_size)
    ]
    n = len(examples)
    ks = [int(x) for x in args.ks.split(",")]
    experts = [random_expert(base, f"s{i}", rank=args.rank, seed=i, scale=0.1) for i in range(max(ks))]
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, base {base.spec}, "
        f"{n} prompts ({source}), batch size {args.batch_size}, rank {args.rank} on all linear layers, "
        f"{'bf16 autocast' if autocast else 'fp32'}, {args.repeats} alternating repeats",
        flush=True,
    )
    single = single_member_speed(base, experts[0], batches, labels, autocast, device, n, args.repeats)
    print(f"one member: {single:.1f} examples/s", flush=True)

    rows, ok = [], True
    for k in ks:
        # Exactness is checked in fp32 on a few prompts, where the three ways must agree to rounding; under
        # bf16 autocast they round differently (PEFT casts per adapter), so that difference is only shown.
        exact = make_methods(
            base, experts[:k], [(ids[:8], mask[:8]) for ids, mask in batches[:1]], labels, False, device
        )
        reference = exact["set_adapter"]()
        diff = max(float((exact[m]() - reference).abs().max()) for m in ("batched", "mixed"))
        ok &= diff <= 1e-4
        del exact
        methods = make_methods(base, experts[:k], batches, labels, autocast, device)
        reference = methods["set_adapter"]()
        diff_run = max(float((methods[m]() - reference).abs().max()) for m in ("batched", "mixed"))  # also warm-up
        speeds: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                speeds[name].append(timed(fn, n, device))
        med = {m: statistics.median(v) for m, v in speeds.items()}
        rows.append((k, med, single / k, diff, diff_run))
        print(
            f"K={k}: " + ", ".join(f"{m} {v:.1f}" for m, v in med.items()) + f" examples/s, max |Δp| fp32 "
            f"{diff:.2g}, as timed {diff_run:.2g}",
            flush=True,
        )
        del methods

    print(
        "\n| K | batched ex/s | PEFT set_adapter ex/s | PEFT mixed ex/s | ideal ex/s | batched / ideal "
        "| batched / mixed | batched / set_adapter | max abs Δp vs PEFT, fp32 | as timed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, med, ideal, diff, diff_run in rows:
        print(
            f"| {k} | {med['batched']:.1f} | {med['set_adapter']:.1f} | {med['mixed']:.1f} | {ideal:.1f} "
            f"| {med['batched'] / ideal:.2f} | {med['batched'] / med['mixed']:.2f}x "
            f"| {med['batched'] / med['set_adapter']:.2f}x | {diff:.1e} | {diff_run:.1e} |"
        )
    k, med, ideal, _, _ = rows[-1]
    print(f"\n(medians of {args.repeats} alternating runs in one process; ideal = one member's examples/s / K)")
    print(
        f"goal at K={k}: batched >= 0.9 x ideal: {'met' if med['batched'] >= 0.9 * ideal else 'NOT met'} "
        f"({med['batched'] / ideal:.2f}); batched >= 1.3x PEFT mixed: "
        f"{'met' if med['batched'] >= 1.3 * med['mixed'] else 'NOT met'} ({med['batched'] / med['mixed']:.2f}x)"
    )
    if not ok:
        print("ERROR: in fp32 the batched probabilities disagree with PEFT by more than 1e-4", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
