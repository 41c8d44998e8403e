"""Overhead of each router as a fraction of one base forward pass on the same batch.

Usage::

    python benchmarks/bench_route.py [--base SPEC] [--examples 64] [--batch-size 64] [--experts 8] [--rank 8]
                                     [--layers 1,2,4] [--arrow-top-k 2] [--repeats 5]

The same length-sorted batches of SST-2 dev prompts (from GLUE_DIR; synthetic sentences when it is
unset) are timed in these ways, reading the label words only:

- base: one plain forward pass of the base (the unit every other row is divided by);
- learned (layer L): the routing step of the learned router: the feature pass stopped after block L,
  mean pooling, the classifier and top-k (fitted here on random labels: only its cost matters);
- clustered (layer L): the same feature pass, nearest centroid and top-k;
- arrow fused: the adapted forward with E synthetic experts (rank 8 on every linear layer) routed per
  token in one fused rank-E·r update, and, for contrast, arrow per-expert: the same sum expert by expert.

Overheads are reported as ``router time / base time`` (goal: learned and clustered <= 5%) and the Arrow
forward as a multiple of the base pass (goal: <= 1.6x with 8 experts). Medians over alternating repeats
are printed as a Markdown table. Exit status 1 only if the fused and per-expert Arrow answers disagree.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from synthetic import random_expert

from adapterfuse import load_base
from adapterfuse.backends.route.features import FeatureExtractor, n_layers, routing_texts
from adapterfuse.backends.route.routers.arrow import ArrowModel
from adapterfuse.backends.route.routers.cluster import ClusterRouter
from adapterfuse.backends.route.routers.learned import FitOptions, LearnedRouter
from adapterfuse.head import autocast_context, iter_batches, label_logits, label_token_ids
from adapterfuse.tasks.glue import get_task, read_split
from adapterfuse.tasks.spec import Example

_WORDS = (
    "the movie film was a great bad dull wonderful plot story actors acting script long short funny "
    "boring moving slow fine awful"
).split()


def prompts(n: int, seed: int = 0) -> tuple[list[Example], str]:
    """``n`` SST-2 dev examples from GLUE_DIR, or synthetic sentences of similar length when it is unset."""
    if os.environ.get("GLUE_DIR"):
        return read_split(get_task("sst2"), "dev")[:n], f"SST-2 dev from {os.environ['GLUE_DIR']}"
    rng = random.Random(seed)
    return [
        Example((" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30))),), 0, i) for i in range(n)
    ], "synthetic sentences (GLUE_DIR unset)"


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def make_arrow(base, args, device) -> ArrowModel:
    """Arrow over ``args.experts`` synthetic seeded rank-``args.rank`` experts on every linear layer."""
    experts = [random_expert(base, f"s{i}", rank=args.rank, seed=i, scale=0.1) for i in range(args.experts)]
    arrow = ArrowModel(base.model, [e.deltas for e in experts], top_k=args.arrow_top_k, temperature=0.1)
    arrow.model.to(device)
    return arrow


def make_methods(base, batches, labels, args, device) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """Every timed method (name -> zero-argument callable) and what each one times."""
    autocast, k = not args.no_autocast, args.experts
    methods: dict[str, Callable[[], object]] = {}
    what: dict[str, str] = {}

    @torch.no_grad()
    def run_model(model):
        out = []
        for ids, mask in batches:
            with autocast_context(autocast, device):
                out.append(label_logits(model, ids, mask, labels).float().softmax(-1))
        return torch.cat(out)

    methods["base"], what["base"] = (lambda: run_model(base.model)), "plain base forward"
    gen = torch.Generator().manual_seed(0)
    for layer in args.layers:
        extractor = FeatureExtractor(base, layer, autocast=autocast)
        feats = torch.cat([extractor.pooled(ids, mask).cpu() for ids, mask in batches])
        fake = torch.randint(0, k, (len(feats),), generator=gen)
        learned = LearnedRouter.fit(feats, fake, k, FitOptions(hidden=args.hidden, epochs=5))
        clustered = ClusterRouter.fit(
            feats, torch.randn(len(feats), k, generator=gen), min(args.clusters, len(feats)), n_init=1
        )

        def route_with(router, ext=extractor):
            return [router.choose(ext.pooled(ids, mask).cpu(), 1) for ids, mask in batches]

        methods[f"learned (layer {layer})"] = lambda r=learned, f=route_with: f(r)
        methods[f"clustered (layer {layer})"] = lambda r=clustered, f=route_with: f(r)
        for name in ("learned", "clustered"):
            what[f"{name} (layer {layer})"] = f"feature pass to block {extractor.layer}/{n_layers(base.model)} + router"
    arrow = make_arrow(base, args, device)

    def arrow_run(fused: bool):
        arrow.set_fused(fused)
        return run_model(arrow.model)

    methods["arrow fused"] = lambda: arrow_run(True)
    methods["arrow per-expert"] = lambda: arrow_run(False)
    what["arrow fused"] = f"adapted forward, {k} experts, one rank-{k}·{args.rank} update, top-{args.arrow_top_k}"
    what["arrow per-expert"] = f"adapted forward, {k} experts summed one by one (reference)"
    return methods, what


@torch.no_grad()
def arrow_agreement(base, args, batch, labels, device) -> float:
    """Max |Δp| between the fused and the per-expert Arrow forward on 8 prompts, in fp32.

    They are equal up to summation order; under bf16 autocast that order flips roundings, and a flipped
    top-k choice in a later layer then changes the answer, so exactness is only meaningful in fp32.
    """
    arrow = make_arrow(base, args, device)
    ids, mask = batch[0][:8], batch[1][:8]
    out = []
    for fused in (True, False):
        arrow.set_fused(fused)
        out.append(label_logits(arrow.model, ids, mask, labels).float().softmax(-1))
    return float((out[0] - out[1]).abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="base model spec (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--examples", type=int, default=64, help="prompts timed per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8, help="experts routed among")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", default="1,2,4", help="feature layers of the learned/clustered routers")
    parser.add_argument("--hidden", type=int, default=0, help="hidden size of the learned router")
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--arrow-top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-autocast", action="store_true", help="fp32 instead of bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.layers = [int(x) for x in args.layers.split(",")]

    device = torch.device(args.device)
    base = load_base(args.base)
    base.model.to(device)
    args.layers = sorted({min(layer, n_layers(base.model)) for layer in args.layers})
    examples, source = prompts(args.examples)
    task = get_task("sst2")
    labels = label_token_ids(task, base.tokenizer)
    batches = [
        (ids.to(device), mask.to(device))
        for _, ids, mask in iter_batches(task, examples, base.tokenizer, args.batch_size)
    ]
    assert routing_texts(task, examples[:1], "prompt")  # the texts the routers see are the prompts
    methods, what = make_methods(base, batches, labels, args, device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, base {base.spec} "
        f"({n_layers(base.model)} blocks), {len(examples)} prompts ({source}), batch size {args.batch_size}, "
        f"{args.experts} experts of rank {args.rank}, {'bf16 autocast' if not args.no_autocast else 'fp32'}, "
        f"{args.repeats} alternating repeats",
        flush=True,
    )
    agree = arrow_agreement(base, args, batches[0], labels, device)
    for fn in methods.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            times[name].append(seconds(fn, device))
    med = {name: statistics.median(v) for name, v in times.items()}
    unit = med["base"]
    print("\n| method | what is timed | ms per run | / base pass | goal |")
    print("|---|---|---|---|---|")
    for name, t in med.items():
        if name == "base":
            goal = "—"
        elif name.startswith(("learned", "clustered")):
            goal = f"<= 5% {'met' if t / unit <= 0.05 else 'not met'}"
        elif name == "arrow fused":
            goal = f"<= 1.6x {'met' if t / unit <= 1.6 else 'not met'}"
        else:
            goal = "reference"
        shown = f"{t / unit:.1%}" if name.startswith(("learned", "clustered")) else f"{t / unit:.2f}x"
        print(f"| {name} | {what[name]} | {t * 1e3:.1f} | {shown} | {goal} |")
    print(f"\narrow fused vs per-expert (fp32, 8 prompts): max |Δp| = {agree:.2e}")
    return 0 if agree <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
