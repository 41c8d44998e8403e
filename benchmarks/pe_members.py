"""Each member of a saved parameter-efficient ensemble scored alone, then the pooled ensemble.

Usage (GLUE_DIR set)::

    python benchmarks/pe_members.py runs/pe_ablations/pe/stsb-mimo-k4-<digest> [--max-test 500]

The dev subset is the seeded one the recipes score (``max_test`` inputs, seed 0). One pass gives every
member's label-word distribution (MIMO: the K slots of one packed pass); each member's is scored alone,
and the pooled one as the ensemble's predictor pools it. A member far below the others shows where an
ensemble loses.
"""

from __future__ import annotations

import argparse

from adapterfuse import load_base, load_task
from adapterfuse.backends.ensemble.pooling import pool
from adapterfuse.head import predictions
from adapterfuse.tasks.metrics import compute_metrics
from adapterfuse.train.pe.predictor import PEEnsemble


def main() -> None:
    """Print one row per member and one for the pooled ensemble."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a PE ensemble folder (as a recipe writes under OUT/pe)")
    parser.add_argument("--max-test", type=int, default=500, help="dev inputs, the recipes' seeded subset")
    args = parser.parse_args()

    ensemble = PEEnsemble.load(args.folder)
    base = load_base()
    data = load_task(ensemble.manifest["task"], max_test=args.max_test)
    spec, labels = data.task, [e.label for e in data.test]
    predictor = ensemble.predictor(base)
    log_probs = predictor.member_log_probs(spec, data.test)  # [K, n, labels]
    k = log_probs.shape[0]
    print(f"{ensemble.kind} K={k} on {spec.name}, {len(labels)} dev inputs ({', '.join(spec.metrics)} -> score)")
    print("| member | score |\n|---|---|")
    for i in range(k):
        metrics = compute_metrics(spec.metrics, predictions(spec, log_probs[i].exp()), labels)
        print(f"| {i} | {metrics['score']:.3f} |")
    pooled = pool(predictor.pooling, log_probs, [1.0 / k] * k)
    metrics = compute_metrics(spec.metrics, predictions(spec, pooled), labels)
    print(f"| pooled ({predictor.pooling}) | {metrics['score']:.3f} |")


if __name__ == "__main__":
    main()
