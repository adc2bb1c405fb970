from __future__ import annotations

import math

import numpy as np
import pytest

from ctloop.metrics import METRIC_NAMES, classification_metrics, confusion, pr_curve_points, roc_curve_points

Y = [0, 0, 1, 1, 0, 1]
P = [0.1, 0.4, 0.35, 0.8, 0.6, 0.9]


def test_metrics_match_hand_computed_values() -> None:
    m = classification_metrics(Y, P, threshold=0.5)
    assert set(m) == set(METRIC_NAMES)
    # Positive/negative pairs ranked correctly: 0.35 beats only 0.1; 0.8 and 0.9 beat all three negatives.
    assert m["roc_auc"] == pytest.approx(7 / 9)
    # Predicted positive at >= 0.5: rows 3, 4, 5 -> tp=2 (0.8, 0.9), fp=1 (0.6), fn=1 (0.35).
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["positive_rate"] == pytest.approx(0.5)
    assert m["base_rate"] == pytest.approx(0.5)
    assert m["n"] == 6 and isinstance(m["n"], int)
    y, p = np.array(Y), np.array(P)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert m["log_loss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    # Average precision: precision at each positive's rank (0.9 -> 1/1, 0.8 -> 2/2, 0.35 -> 3/5), averaged.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 3 / 5) / 3)


def test_threshold_is_inclusive() -> None:
    assert classification_metrics(Y, P, threshold=0.6)["positive_rate"] == pytest.approx(3 / 6)
    assert classification_metrics(Y, P, threshold=0.61)["positive_rate"] == pytest.approx(2 / 6)


def test_confusion_rows_are_actual_columns_predicted() -> None:
    assert confusion(Y, P, 0.5) == [[2, 1], [1, 2]]
    assert confusion(Y, P, 0.95) == [[3, 0], [3, 0]]


def test_roc_points_are_finite_and_thinned() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    p = np.clip(y * 0.3 + rng.random(5000) * 0.7, 0, 1)
    full = roc_curve_points(y, p, max_points=10_000)
    thin = roc_curve_points(y, p, max_points=50)
    assert len(full["thresholds"]) > 50
    assert 2 <= len(thin["thresholds"]) <= 50
    for curve in (full, thin):
        assert all(math.isfinite(v) for key in ("fpr", "tpr", "thresholds") for v in curve[key])
        assert len(curve["fpr"]) == len(curve["tpr"]) == len(curve["thresholds"])
        assert curve["fpr"] == sorted(curve["fpr"]) and curve["tpr"] == sorted(curve["tpr"])
    # Thinning keeps both ends of the finite curve.
    assert thin["fpr"][0] == full["fpr"][0] and thin["tpr"][-1] == full["tpr"][-1] == 1.0


def test_one_class_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="only class 1 .*both classes"):
        classification_metrics([1, 1, 1], [0.2, 0.5, 0.9], 0.5)


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        ([0, 1], [0.5], "2 labels but 1 probabilities"),
        ([0, 1], [0.5, float("nan")], "finite numbers in \\[0, 1\\]"),
        ([0, 1], [0.5, 1.2], "finite numbers in \\[0, 1\\]"),
        ([0, 2], [0.5, 0.5], "labels must be 0/1, found values \\[2\\]"),
        ([], [], "no rows"),
    ],
)
def test_malformed_input_is_rejected(y: list, p: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, p, 0.5)


def test_pr_points_match_average_precision_and_are_thinned() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 4000)
    p = np.clip(y * 0.25 + rng.random(4000) * 0.75, 0, 1)
    full = pr_curve_points(y, p, max_points=100_000)
    thin = pr_curve_points(y, p, max_points=40)
    assert 2 <= len(thin["thresholds"]) <= 40 < len(full["thresholds"])
    for curve in (full, thin):
        assert len(curve["precision"]) == len(curve["recall"]) == len(curve["thresholds"])
        assert all(0.0 <= v <= 1.0 for key in ("precision", "recall") for v in curve[key])
        assert curve["recall"] == sorted(curve["recall"], reverse=True)  # thresholds ascend, recall falls
    # The step-wise area under the full curve is average precision (the pr_auc the gate uses).
    r = full["recall"] + [0.0]
    area = sum((r[i] - r[i + 1]) * full["precision"][i] for i in range(len(full["precision"])))
    assert area == pytest.approx(classification_metrics(y, p, 0.5)["pr_auc"], abs=1e-9)
    with pytest.raises(ValueError, match="max_points"):
        pr_curve_points(y, p, max_points=1)
