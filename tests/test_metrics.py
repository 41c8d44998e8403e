from __future__ import annotations

import math

import pytest

from adapterfuse.errors import ConfigError
from adapterfuse.tasks.metrics import compute_metrics


def test_accuracy_and_f1_by_hand():
    # tp=2, fp=1, fn=1, tn=1 -> acc 3/5, precision 2/3, recall 2/3, f1 2/3
    out = compute_metrics(["accuracy", "f1"], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["score"] == pytest.approx((0.6 + 2 / 3) / 2)


def test_matthews_by_hand():
    preds, labels = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
    tp, tn, fp, fn = 2, 1, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics(["mcc"], preds, labels)["mcc"] == pytest.approx(mcc)
    assert compute_metrics(["mcc"], [1, 1, 1], [1, 0, 1])["mcc"] == 0.0  # constant prediction


def test_pearson_spearman_by_hand():
    preds, labels = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    mp, ml = 2.5, 2.5
    cov = sum((p - mp) * (y - ml) for p, y in zip(preds, labels, strict=False))
    var = sum((p - mp) ** 2 for p in preds)
    out = compute_metrics(["pearson", "spearman"], preds, labels)
    assert out["pearson"] == pytest.approx(cov / var)  # equal variances here
    assert out["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert compute_metrics(["pearson"], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])["pearson"] == 0.0


def test_bad_metric_inputs():
    with pytest.raises(ConfigError, match="unknown"):
        compute_metrics(["bleu"], [1], [1])
    with pytest.raises(ConfigError, match="2 predictions but 1 labels"):
        compute_metrics(["accuracy"], [1, 0], [1])
