"""The expected-score decision against the most probable expert, over many fits of a raw-field task router.

Usage (GLUE_DIR set)::

    python benchmarks/route_decision.py --experts runs/glue/experts/{cola,sst2,stsb,mrpc,rte}-lora-r8-s0 \
        [--layers 1,6] [--pca 8] [--on fields] [--recipe recipes/glue.yaml]

A recipe fits each router once, on the first ``validation_per_task`` inputs of each task's validation
carve, so one number per row. A decision rule that changes a few dozen inputs deserves
more than that: this script fits a linear ``task`` router (``mean_last`` features with the shape,
``pca`` components) on several samples of the carve (``validation_size`` per task): the first and the
last ``validation_per_task``, five seeded random samples of that size, and all of it. For each fit it
scores top-1 routing by the most probable expert and by the expected score
(:mod:`adapterfuse.backends.route.routers.utility`, the utility matrix taken from the same fit inputs):

- on the full GLUE dev sets (the experts' answers are computed once, in one batched pass of all
  experts per task, then every decision is scored on them: the harness's metric, no model run per fit);
- on the carve inputs the fit did not use (none for the fit on all of it): inputs from the training
  distribution that no expert trained on and no router saw.

It prints the utility matrix of the harness's fit (the first inputs of each task: what ``route()``
fits on), then one row per layer and fit, then the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from adapterfuse import load_base
from adapterfuse.backends.route.data import PoolScores, RoutingData, top1_score
from adapterfuse.backends.route.routers.learned import FitOptions, LearnedRouter
from adapterfuse.backends.route.routers.utility import UtilityRouter, utility_matrix
from adapterfuse.expert import Expert
from adapterfuse.recipe.schema import load_recipe
from adapterfuse.tasks.glue import load_task
from adapterfuse.tasks.spec import TaskData


def fit_samples(per_task: int, size: int, n_tasks: int) -> list[tuple[str, torch.Tensor]]:
    """``(name, [n_tasks * size] bool mask)`` of each fit sample of the carve, rows task after task."""

    def mask(pick: list[int]) -> torch.Tensor:
        one = torch.zeros(size, dtype=torch.bool)
        one[pick] = True
        return one.repeat(n_tasks)

    out = [("first", mask(list(range(per_task)))), ("last", mask(list(range(size - per_task, size))))]
    for seed in range(5):
        out.append(
            (
                f"random {seed}",
                mask(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:per_task].tolist()),
            )
        )
    return [*out, ("all", mask(list(range(size))))]


def decide(router: LearnedRouter, fit: PoolScores, features: torch.Tensor, scores: PoolScores) -> tuple[float, float]:
    """The top-1 score of the most probable expert and of the expected-score choice on ``scores``' rows."""
    probable = router.probs(features).argmax(dim=1)
    utility = UtilityRouter(router, utility_matrix(fit)).choose(features, 1)[0][:, 0]
    return top1_score(scores, probable), top1_score(scores, utility)


def print_utility(fit: PoolScores, names: list[str]) -> None:
    """The utility matrix as a Markdown table: rows the experts, columns the tasks of their own expert."""
    u = utility_matrix(fit)
    print("| expert \\ task (validation score) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for name, row in zip(names, u.tolist(), strict=True):
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", nargs="+", required=True, type=Path)
    parser.add_argument("--layers", default="1", help="feature layers, comma-separated")
    parser.add_argument("--pca", type=int, default=8)
    parser.add_argument("--on", choices=("prompt", "fields"), default="fields")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/glue.yaml"), help="whose validation carve")
    parser.add_argument("--base", default=None)
    args = parser.parse_args()
    harness = load_recipe(args.recipe).harness
    base = load_base(args.base)
    experts = [Expert.load(p) for p in args.experts]
    data = [load_task(e.task, harness.validation_size, 0) for e in experts]
    carve = [TaskData(d.task, [], d.validation, []) for d in data]
    dev = [TaskData(d.task, [], d.test, []) for d in data]  # as "validation", so RoutingData scores it
    samples = fit_samples(harness.validation_per_task, harness.validation_size, len(data))
    names = [d.task.name for d in data]
    # The experts' answers do not depend on the feature layer: computed once, for every layer and fit.
    carve_scores = RoutingData(base, carve, args.on).scores(experts)
    dev_scores = RoutingData(base, dev, args.on).scores(experts)
    print_utility(carve_scores.rows(samples[0][1]), names)
    print(
        "| layer | fit on | dev: most probable | dev: expected score | unused carve: most probable "
        "| unused carve: expected score |"
    )
    print("|---|---|---|---|---|---|")
    summary = []
    for layer in (int(x) for x in args.layers.split(",")):
        on_carve = RoutingData(base, carve, args.on, layer=layer, shape=True, readout="mean_last")
        on_dev = RoutingData(base, dev, args.on, layer=layer, shape=True, readout="mean_last")
        rows = []
        for name, keep in samples:
            router = LearnedRouter.fit(
                on_carve.features[keep],
                carve_scores.own[keep],
                len(experts),
                FitOptions(target="task", pca=args.pca, pca_keep=on_carve.extractor.shape_dim),
            )
            fit = carve_scores.rows(keep)
            on_dev_pair = decide(router, fit, on_dev.features, dev_scores)
            held = decide(router, fit, on_carve.features[~keep], carve_scores.rows(~keep)) if name != "all" else None
            rows.append((on_dev_pair, held))
            print(
                f"| {layer} | {name} | {on_dev_pair[0]:.4f} | {on_dev_pair[1]:.4f} | "
                + (" | " if held is None else f"{held[0]:.4f} | {held[1]:.4f}")
                + " |",
                flush=True,
            )
        summary.append((layer, rows))
    print(
        "\n| layer | median dev: most probable | median dev: expected score | median unused carve: most probable "
        "| median unused carve: expected score |"
    )
    print("|---|---|---|---|---|")
    for layer, rows in summary:
        med = [statistics.median(r[0][i] for r in rows) for i in (0, 1)]
        held = [statistics.median(r[1][i] for r in rows if r[1] is not None) for i in (0, 1)]
        print(f"| {layer} | {med[0]:.4f} | {med[1]:.4f} | {held[0]:.4f} | {held[1]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
