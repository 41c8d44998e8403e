"""Merge speed, peak memory and exactness: adapterfuse against PEFT ``add_weighted_adapter``, one process.

Usage::

    python benchmarks/bench_merge.py [--experts 2,4,8] [--rank 8] [--repeats 3] [--base SPEC]

For K random rank-r LoRA experts on every linear layer of the base (seeded), it times:
- our ``task_arithmetic`` to rank r and to the exact rank K·r, against PEFT ``svd`` at the same rank;
- our ``ties`` with PEFT's convention (density 0.2, rank r; exact SVD, and the seeded randomized SVD of
  ``exact_svd=False``) against PEFT ``ties_svd`` (density 0.2, rank r, exact SVD);
- our ``ties`` at ``rank="auto"`` (the default: per module the smallest rank keeping 90% of ΔW's energy),
  its label giving the mean rank it chose, against the same PEFT ``ties_svd`` at rank r.
Only the merge itself is timed (each output's dense ΔW is formed afterwards, for the error). Peak
memory is the largest rise of the process's resident memory during the call (the kernel's high-water
mark, see ``benchmarks.memory``). Each output's relative error ||ΔW_out - ΔW_ref||_F / ||ΔW_ref||_F
over all modules is measured against a dense float64 reference of the same method computed in this
script. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
from memory import PeakMemory

from adapterfuse.backends.merge.registry import merge_deltas
from adapterfuse.base import load_base
from adapterfuse.delta import Deltas, deltas_from_peft
from adapterfuse.train.config import ALL_LINEAR


def make_peft(base_model, k: int, rank: int, seed: int):
    """A PEFT model holding K random LoRA adapters (both factors random, as after training)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ALL_LINEAR), init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base_model), config, adapter_name="e0")
    for i in range(1, k):
        model.add_adapter(f"e{i}", config)
    with torch.no_grad():  # PEFT's random init of B is large; scale to LoRA-like update norms
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    return model


def expert_deltas(model, k: int) -> list[Deltas]:
    from peft import get_peft_model_state_dict

    return [
        deltas_from_peft(
            get_peft_model_state_dict(model, adapter_name=f"e{i}"), model.peft_config[f"e{i}"].to_dict(), f"e{i}"
        )
        for i in range(k)
    ]


def ties_reference(dense: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES in float64 under PEFT's convention (the one ``ties_svd`` uses), written out here: trim by magnitude,
    elect sign by mass, sum the agreeing weighted entries and divide by their count."""
    trimmed = []
    for d in dense:
        keep = max(1, math.floor(density * d.numel()))  # PEFT's and mergekit's count
        thresh = d.abs().flatten().kthvalue(d.numel() - keep + 1).values
        trimmed.append(torch.where(d.abs() >= thresh, d, torch.zeros_like(d)))
    stack = torch.stack([w * t for w, t in zip(weights, trimmed, strict=True)])
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    agree = (stack.sign() == sign) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def relative_error(modules: list[str], got: Callable[[str], torch.Tensor], ref: Callable[[str], torch.Tensor]) -> float:
    """||got - ref||_F / ||ref||_F over all modules, one module at a time (never all dense ΔW at once)."""
    num = den = 0.0
    for m in modules:
        r = ref(m)
        num += float((got(m).double() - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num / den)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Median seconds and median peak MiB of ``repeats`` calls, and the last result."""
    seconds, mibs, out = [], [], None
    for _ in range(repeats):
        with PeakMemory("cpu") as peak:
            t0 = time.perf_counter()
            out = fn()
            seconds.append(time.perf_counter() - t0)
        mibs.append(peak.mib)
    return statistics.median(seconds), statistics.median(mibs), out


def peft_merge(model, k: int, combination: str, rank: int, density: float | None = None) -> str:
    """Run PEFT's add_weighted_adapter; return the new adapter's name (its ΔW is read after timing)."""
    name = f"merged_{combination}_{rank}"
    if name in model.peft_config:
        model.delete_adapter(name)
    kwargs = {"density": density} if density is not None else {}
    model.add_weighted_adapter(
        [f"e{i}" for i in range(k)], [1.0 / k] * k, name, combination_type=combination, svd_rank=rank, **kwargs
    )
    return name


def peft_dense(model, name: str) -> Callable[[str], torch.Tensor]:
    """module -> the merged ΔW of PEFT adapter ``name`` there (formed on demand)."""
    layers = {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and name in m.lora_A
    }
    return lambda module: layers[module].get_delta_weight(name)


def bench_k(base, k: int, r: int, density: float, repeats: int, exact_ties: bool) -> list[tuple]:
    """Time our merges and PEFT's for K experts; one row per method."""
    model = make_peft(base.model, k, r, seed=k)
    experts = expert_deltas(model, k)
    w = [1.0 / k] * k
    modules = sorted(experts[0])

    def ref_ta(m: str) -> torch.Tensor:
        return sum(wi * e[m].dense(torch.float64) for wi, e in zip(w, experts, strict=True))

    def ref_ties(m: str) -> torch.Tensor:
        return ties_reference([e[m].dense(torch.float64) for e in experts], w, density)

    def ours(method: str, rank: int | str | None, **kw):
        return merge_deltas(experts, method, weights=w, rank=rank, **kw).deltas

    cases = [
        ("task_arithmetic, rank r", lambda: ours("task_arithmetic", r), lambda: peft_merge(model, k, "svd", r), ref_ta),
        (
            "task_arithmetic, exact rank K·r",
            lambda: ours("task_arithmetic", None),
            lambda: peft_merge(model, k, "svd", k * r),
            ref_ta,
        ),
        (
            "ties, rank r (randomized SVD)",
            lambda: ours("ties", r, density=density, convention="peft"),
            lambda: peft_merge(model, k, "ties_svd", r, density),
            ref_ties,
        ),
        (
            "ties, rank auto (the default)",
            lambda: ours("ties", "auto", density=density, convention="peft"),
            lambda: peft_merge(model, k, "ties_svd", r, density),
            ref_ties,
        ),
    ]
    if exact_ties:
        cases.append(
            (
                "ties, rank r (exact SVD)",
                lambda: ours("ties", r, density=density, exact_svd=True, convention="peft"),
                lambda: peft_merge(model, k, "ties_svd", r, density),
                ref_ties,
            )
        )
    rows = []
    for label, fn_ours, fn_peft, ref in cases:
        s_o, m_o, out_o = timed(fn_ours, repeats)
        s_p, m_p, out_p = timed(fn_peft, repeats)
        # Errors are computed after the clock stops, module by module.
        if "auto" in label:
            label += f", mean rank {statistics.mean(d.rank for d in out_o.values()):.0f}"
        rows.append(
            (
                k,
                label,
                s_o,
                s_p,
                m_o,
                m_p,
                relative_error(modules, lambda m, out=out_o: out[m].dense(), ref),
                relative_error(modules, peft_dense(model, out_p), ref),
            )
        )
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="2,4,8")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--base", default=None)
    parser.add_argument("--exact-ties", action="store_true", help="also time our TIES with a full SVD")
    args = parser.parse_args()
    base = load_base(args.base)
    r = args.rank
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, base {base.spec}", flush=True)
    for k in (int(x) for x in args.experts.split(",")):
        rows += bench_k(base, k, r, args.density, args.repeats, args.exact_ties)
    print(
        "\n| K | method | ours (s) | PEFT (s) | speed-up | ours peak MiB | PEFT peak MiB | ours rel. error "
        "| PEFT rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k, label, s_o, s_p, m_o, m_p, e_o, e_p in rows:
        print(
            f"| {k} | {label} | {s_o:.3f} | {s_p:.3f} | {s_p / s_o:.1f}x | {m_o:.0f} | {m_p:.0f} | {e_o:.2e} "
            f"| {e_p:.2e} |"
        )
    print(f"(medians of {args.repeats} runs each; errors against a dense float64 reference of the same method)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
