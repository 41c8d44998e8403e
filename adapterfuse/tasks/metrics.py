"""The official GLUE metrics, from scikit-learn and scipy (``evaluate`` needs the Hub at run time)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from adapterfuse.errors import ConfigError


def _corr(fn, preds: np.ndarray, labels: np.ndarray) -> float:
    # A constant prediction has no correlation; scipy warns and returns nan, we report 0.
    if np.std(preds) == 0 or np.std(labels) == 0:
        return 0.0
    return float(fn(preds, labels)[0])


METRICS = {
    "accuracy": lambda p, y: float(accuracy_score(y, p)),
    "f1": lambda p, y: float(f1_score(y, p, zero_division=0.0)),
    "mcc": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": lambda p, y: _corr(pearsonr, p, y),
    "spearman": lambda p, y: _corr(spearmanr, p, y),
}


def compute_metrics(names: Sequence[str], preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Compute the named metrics and their mean as ``score`` (GLUE averages a task's metrics).

    Args:
        names: metric names, from ``accuracy``, ``f1``, ``mcc``, ``pearson``, ``spearman``.
        preds: predicted class ids, or predicted scores for correlations.
        labels: gold class ids or scores.

    Returns:
        ``{name: value, ..., "score": mean}``.

    Raises:
        ConfigError: for an unknown metric or mismatched lengths.
    """
    if len(preds) != len(labels):
        raise ConfigError(f"metrics: {len(preds)} predictions but {len(labels)} labels; expected equal counts")
    if not preds:
        raise ConfigError("metrics: no predictions to score; expected at least one example")
    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    out: dict[str, float] = {}
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"metric {name!r}: unknown; expected one of {', '.join(METRICS)}")
        value = METRICS[name](p, y)
        out[name] = 0.0 if math.isnan(value) else value
    out["score"] = float(np.mean([out[n] for n in names]))
    return out
