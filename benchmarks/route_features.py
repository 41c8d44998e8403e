"""How well routing features identify the task, with no expert run: a task-target router per feature setting.

Usage (GLUE_DIR set)::

    python benchmarks/route_features.py [--tasks cola,sst2,stsb,mrpc,rte] [--layer 1[,2,...]]
        [--recipe recipes/glue.yaml] [--train-per-task N] [--pca K] [--shape-version V] [--eval-train M]
        [--on fields] [--readout mean_last]

For the prompt and the raw fields, with the ``mean`` and ``mean_last`` readouts and with and without the
text's shape, a linear :class:`~adapterfuse.backends.route.routers.learned.LearnedRouter` (target ``task``) is fitted on
the validation inputs the recipe carves (``validation_per_task`` per task, data seed 0) and read on the
full GLUE dev sets. ``--pca K`` projects the features onto their top K principal components first
(the shape passes through). ``--train-per-task N`` adds each task's first N training inputs to the fit: a task
label costs nothing, so a task-target router could fit on many more inputs. ``--shape-version`` picks
the text's shape (1: the four counts; 2, the default: with the length asymmetry). It prints the share
of dev inputs sent to their own task's expert (the routing accuracy of a task-target router, before
any expert runs) and where the rest went. ``--eval-train M`` also reads the router on M seeded training
inputs per task that it was not fitted on: the same question on inputs from the fit's distribution,
so a feature chosen by it is not chosen on dev. ``--on``, ``--readout`` and ``--shape`` keep only those settings.
``--layer`` takes a comma-separated list: one row per layer and setting, in one process (the base
loaded once), which is how the raw-field router's layer is chosen on held-out training inputs.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from adapterfuse import load_base
from adapterfuse.backends.route.features import SHAPE_VERSION, FeatureExtractor
from adapterfuse.backends.route.routers.learned import FitOptions, LearnedRouter
from adapterfuse.recipe.schema import load_recipe
from adapterfuse.tasks.glue import load_task
from adapterfuse.tasks.spec import capped_subset

SETTINGS = [
    (on, readout, shape) for on in ("prompt", "fields") for readout in ("mean", "mean_last") for shape in (False, True)
]


def held_out_train(examples: list, fitted: list, n: int) -> list:
    """A seeded sample of ``n`` training inputs that are not in ``fitted``."""
    used = set(fitted)
    rest = [e for e in examples if e not in used]
    return [rest[i] for i in sorted(random.Random(1).sample(range(len(rest)), min(n, len(rest))))]


def identify(
    extractor: FeatureExtractor, data: list, on: str, per_task: int, train: int = 0, pca: int = 0, eval_train: int = 0
) -> tuple[float, torch.Tensor, float | None]:
    """Fit a task-target router on validation (and ``train`` training) features, projected onto ``pca``
    principal components first if asked (the shape passes through); return its dev accuracy, its dev
    confusion matrix and (with ``eval_train``) its accuracy on that many held-out training inputs per task."""
    # A seeded sample of train, not its first rows: the files are grouped by source.
    fit = [list(d.validation[:per_task]) + capped_subset(d.train, train, 0) for d in data]
    x = torch.cat([extractor.features(d.task, examples, on) for d, examples in zip(data, fit, strict=True)])
    y = torch.cat([torch.full((len(examples),), i) for i, examples in enumerate(fit)])
    router = LearnedRouter.fit(x, y, len(data), FitOptions(target="task", pca=pca, pca_keep=extractor.shape_dim))

    def chosen(sets: list) -> tuple[torch.Tensor, torch.Tensor]:
        truth = torch.cat([torch.full((len(examples),), i) for i, examples in enumerate(sets)])
        feats = torch.cat([extractor.features(d.task, examples, on) for d, examples in zip(data, sets, strict=True)])
        return truth, router.probs(feats).argmax(dim=1)

    truth, picked = chosen([d.test for d in data])
    confusion = torch.zeros(len(data), len(data), dtype=torch.long)
    confusion.index_put_((truth, picked), torch.ones_like(truth), accumulate=True)
    on_train = None
    if eval_train:
        t_truth, t_picked = chosen([held_out_train(d.train, f, eval_train) for d, f in zip(data, fit, strict=True)])
        on_train = float((t_picked == t_truth).float().mean())
    return float((picked == truth).float().mean()), confusion, on_train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="cola,sst2,stsb,mrpc,rte")
    parser.add_argument("--layer", default="1", help="feature layer(s), comma-separated")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/glue.yaml"), help="whose validation carve")
    parser.add_argument("--train-per-task", type=int, default=0, help="training inputs added to the fit per task")
    parser.add_argument("--pca", type=int, default=0, help="principal components the router sees (0: all features)")
    parser.add_argument(
        "--shape-version",
        type=int,
        default=SHAPE_VERSION,
        choices=(1, 2),
        help="1: the four counts; 2: with the length asymmetry",
    )
    parser.add_argument("--eval-train", type=int, default=0, help="also read on this many held-out train inputs")
    parser.add_argument("--on", choices=("prompt", "fields"), default=None, help="only this routing text")
    parser.add_argument("--readout", choices=("mean", "mean_last"), default=None, help="only this readout")
    parser.add_argument("--shape", choices=("yes", "no"), default=None, help="only with (or without) the shape")
    parser.add_argument("--base", default=None)
    args = parser.parse_args()
    harness = load_recipe(args.recipe).harness
    tasks = args.tasks.split(",")
    data = [load_task(t, harness.validation_size, 0) for t in tasks]
    base = load_base(args.base)
    extra = " | held-out train" if args.eval_train else ""
    print(
        f"| layer | routing text | readout | shape | dev task identification | misrouted (task -> chosen: n){extra} |"
    )
    print("|---|---|---|---|---|---|" + ("---|" if args.eval_train else ""))
    for layer, (on, readout, shape) in ((int(x), s) for x in args.layer.split(",") for s in SETTINGS):
        wanted = (args.on, on), (args.readout, readout), (args.shape, "yes" if shape else "no")
        if any(asked not in (None, value) for asked, value in wanted):
            continue
        extractor = FeatureExtractor(base, layer, shape=args.shape_version if shape else 0, readout=readout)
        accuracy, confusion, on_train = identify(
            extractor, data, on, harness.validation_per_task, args.train_per_task, args.pca, args.eval_train
        )
        worst = sorted(
            (
                (int(confusion[i, j]), tasks[i], tasks[j])
                for i in range(len(tasks))
                for j in range(len(tasks))
                if i != j and confusion[i, j] > 0
            ),
            reverse=True,
        )[:3]
        print(
            f"| {layer} | {on} | {readout} | {'yes' if shape else 'no'} | {accuracy:.4f} | "
            + ", ".join(f"{a} -> {b}: {n}" for n, a, b in worst)
            + ("" if on_train is None else f" | {on_train:.4f}")
            + " |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
