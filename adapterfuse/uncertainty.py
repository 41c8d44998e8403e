"""How sure a predictor is, and whether it is right to be: NLL, Brier, ECE and its reliability diagram, entropy,
mutual information, AUROC.

Every function reads probabilities over a task's label words, ``[n, n_labels]``, the form every predictor
returns. Targets are the label words' one-hot vectors, and for regression the same two-level soft target
the training loss uses (:func:`adapterfuse.head.task_loss`), so the NLL here is the loss on held-out data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from adapterfuse.errors import ConfigError
from adapterfuse.head import label_log_likelihood, soft_targets
from adapterfuse.tasks.spec import TaskSpec

ECE_BINS = 15
"""Equal-mass bins of the expected calibration error (each holds ``n / ECE_BINS`` examples, give or take one)."""

_FLOOR = 1e-12  # a probability of exactly 0 would make one example's NLL infinite; clamp it to this


def nll(task: TaskSpec, probs: torch.Tensor, labels: Sequence[float]) -> float:
    """Mean negative log-likelihood of the gold labels (the soft target's cross-entropy for regression)."""
    return float(-label_log_likelihood(task, probs.float().clamp_min(_FLOOR).log(), labels).mean())


def brier(task: TaskSpec, probs: torch.Tensor, labels: Sequence[float]) -> float:
    """Mean over examples of the squared distance between the probabilities and the (soft) target."""
    return float(((probs.float() - soft_targets(task, labels)) ** 2).sum(dim=1).mean())


def reliability(probs: torch.Tensor, labels: Sequence[float], bins: int = ECE_BINS) -> dict[str, list[float]]:
    """The reliability diagram of the top class: confidence against accuracy over equal-mass bins.

    Args:
        probs: ``[n, n_labels]`` probabilities of a classification task.
        labels: the ``n`` gold class ids.
        bins: the number of bins; examples are sorted by confidence and split into ``bins`` near-equal groups.

    Returns:
        ``{"confidence": [...], "accuracy": [...], "count": [...]}``, one entry per bin, by rising confidence.

    Raises:
        ConfigError: ``bins`` below 1.
    """
    if bins < 1:
        raise ConfigError(f"ece bins: expected an integer >= 1, got {bins}")
    confidence, predicted = probs.float().max(dim=1)
    correct = (predicted == torch.tensor([int(v) for v in labels])).double().numpy()
    conf = confidence.double().numpy()
    groups = np.array_split(np.argsort(conf, kind="stable"), min(bins, len(conf)))
    return {
        "confidence": [float(conf[g].mean()) for g in groups],
        "accuracy": [float(correct[g].mean()) for g in groups],
        "count": [len(g) for g in groups],
    }


def ece(probs: torch.Tensor, labels: Sequence[float], bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top class, over equal-mass bins of confidence.

    Args:
        probs: ``[n, n_labels]`` probabilities of a classification task.
        labels: the ``n`` gold class ids.
        bins: the number of bins (see :func:`reliability`).

    Returns:
        ``sum_b (n_b / n) * |accuracy_b - confidence_b|``.

    Raises:
        ConfigError: ``bins`` below 1.
    """
    r = reliability(probs, labels, bins)
    total = 0.0
    for count, accuracy, confidence in zip(r["count"], r["accuracy"], r["confidence"], strict=True):
        total += count * abs(accuracy - confidence)
    return total / sum(r["count"])


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Each example's predictive entropy in nats, ``[n]``."""
    p = probs.double().clamp_min(_FLOOR)
    return -(p * p.log()).sum(dim=-1)


def normalised_entropy(task: TaskSpec, probs: torch.Tensor) -> torch.Tensor:
    """Each example's predictive entropy divided by ``log(n_labels)`` (a uniform answer's), in ``[0, 1]``,
    so that tasks with 2 and 6 label words share one scale."""
    return entropy(probs) / math.log(task.n_labels)


def mutual_information(member_probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The members' disagreement: entropy of the pooled distribution minus the members' mean entropy.

    Args:
        member_probs: ``[K, n, n_labels]`` each member's probabilities.
        weights: ``[K]`` non-negative member weights summing to 1 (``None``: uniform).

    Returns:
        ``[n]``, zero when every member says the same.
    """
    k = member_probs.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights.double()
    pooled = torch.einsum("k,knl->nl", w, member_probs.double())
    return entropy(pooled) - torch.einsum("k,kn->n", w, entropy(member_probs))


def auroc(in_task: Sequence[float] | torch.Tensor, out_of_task: Sequence[float] | torch.Tensor) -> float:
    """How well an uncertainty score tells out-of-task inputs (higher score expected) from in-task ones.

    Returns:
        The area under the ROC curve: 0.5 is chance, 1.0 a perfect separation.

    Raises:
        ConfigError: either group is empty.
    """
    a, b = np.asarray(in_task, dtype=np.float64), np.asarray(out_of_task, dtype=np.float64)
    if not len(a) or not len(b):
        raise ConfigError(f"auroc: expected in-task and out-of-task scores, got {len(a)} and {len(b)}")
    return float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))


def uncertainty_metrics(task: TaskSpec, probs: torch.Tensor, labels: Sequence[float]) -> dict[str, float]:
    """NLL and Brier for every task, ECE (over :data:`ECE_BINS` equal-mass bins) for classification.

    Returns:
        ``{"nll": ..., "brier": ..., "ece": ...}`` (no ``ece`` for regression, whose top class is no claim).
    """
    out = {"nll": nll(task, probs, labels), "brier": brier(task, probs, labels)}
    if not task.regression:
        out["ece"] = ece(probs, labels)
    return out
