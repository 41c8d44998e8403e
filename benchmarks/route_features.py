"""How well routing features identify the task, with no expert run: a task-target router per feature setting.

Usage (GLUE_DIR set)::

    python benchmarks/route_features.py [--tasks cola,sst2,stsb,mrpc,rte] [--layer 1] [--recipe recipes/glue.yaml]
        [--train-per-task N] [--pca K]

For the prompt and the raw fields, with the ``mean`` and ``mean_last`` readouts and with and without the
text's shape, a linear :class:`~adapterfuse.route.learned.LearnedRouter` (target ``task``) is fitted on
the validation inputs the recipe carves (``validation_per_task`` per task, data seed 0) and read on the
full GLUE dev sets. ``--pca K`` projects the features onto their top K principal components first
(the shape passes through). ``--train-per-task N`` adds each task's first N training inputs to the fit: a task
label costs nothing, so a task-target router could fit on many more inputs. It prints the share of
dev inputs sent to their own task's expert (the routing accuracy of a task-target router, before any
expert runs) and where the rest went.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from adapterfuse import load_base
from adapterfuse.recipe.schema import load_recipe
from adapterfuse.route.features import SHAPE_DIM, FeatureExtractor
from adapterfuse.route.learned import LearnedRouter
from adapterfuse.tasks.glue import capped_subset, load_task

SETTINGS = [(on, readout, shape) for on in ("prompt", "fields") for readout in ("mean", "mean_last")
            for shape in (False, True)]


def identify(extractor: FeatureExtractor, data: list, on: str, per_task: int,
             train: int = 0, pca: int = 0) -> tuple[float, torch.Tensor]:
    """Fit a task-target router on validation (and ``train`` training) features, projected onto ``pca``
    principal components first if asked (the shape passes through); return its dev accuracy and
    confusion matrix."""
    # A seeded sample of train, not its first rows: the files are grouped by source.
    fit = [list(d.validation[:per_task]) + capped_subset(d.train, train, 0) for d in data]
    x = torch.cat([extractor.features(d.task, examples, on) for d, examples in zip(data, fit, strict=True)])
    y = torch.cat([torch.full((len(examples),), i) for i, examples in enumerate(fit)])
    router = LearnedRouter.fit(x, y, len(data), target="task", pca=pca, pca_keep=SHAPE_DIM if extractor.shape else 0)
    truth = torch.cat([torch.full((len(d.test),), i) for i, d in enumerate(data)])
    chosen = router.probs(torch.cat([extractor.features(d.task, d.test, on) for d in data])).argmax(dim=1)
    confusion = torch.zeros(len(data), len(data), dtype=torch.long)
    confusion.index_put_((truth, chosen), torch.ones_like(truth), accumulate=True)
    return float((chosen == truth).float().mean()), confusion


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="cola,sst2,stsb,mrpc,rte")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/glue.yaml"), help="whose validation carve")
    parser.add_argument("--train-per-task", type=int, default=0, help="training inputs added to the fit per task")
    parser.add_argument("--pca", type=int, default=0, help="principal components the router sees (0: all features)")
    parser.add_argument("--base", default=None)
    args = parser.parse_args()
    harness = load_recipe(args.recipe).harness
    tasks = args.tasks.split(",")
    data = [load_task(t, harness.validation_size, 0) for t in tasks]
    base = load_base(args.base)
    print(f"| routing text | readout | shape | dev task identification (layer {args.layer}) "
          "| misrouted (task -> chosen: n) |")
    print("|---|---|---|---|---|")
    for on, readout, shape in SETTINGS:
        extractor = FeatureExtractor(base, args.layer, shape=shape, readout=readout)
        accuracy, confusion = identify(extractor, data, on, harness.validation_per_task, args.train_per_task,
                                       args.pca)
        worst = sorted(((int(confusion[i, j]), tasks[i], tasks[j]) for i in range(len(tasks))
                        for j in range(len(tasks)) if i != j and confusion[i, j] > 0), reverse=True)[:3]
        print(f"| {on} | {readout} | {'yes' if shape else 'no'} | {accuracy:.4f} | "
              + ", ".join(f"{a} -> {b}: {n}" for n, a, b in worst) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
