from __future__ import annotations

import math

import numpy as np
import pytest

from ctloop.metrics import (
    METRIC_NAMES,
    calibration,
    choose_threshold,
    classification_metrics,
    confusion,
    pr_curve_points,
    roc_curve_points,
)

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


def test_skill_scores_are_relative_to_the_base_rate_predictor() -> None:
    m = classification_metrics(Y, P, threshold=0.5)
    b = 0.5
    assert m["brier_skill"] == pytest.approx(1 - m["brier"] / (b * (1 - b)))
    assert m["log_loss_skill"] == pytest.approx(1 - m["log_loss"] / math.log(2))
    assert m["pr_auc_lift"] == pytest.approx(m["pr_auc"] / b)
    assert m["mean_probability"] == pytest.approx(np.mean(P))
    # The constant predictor of the base rate has no skill by definition, at any base rate.
    y = np.array([1] * 3 + [0] * 97)
    constant = classification_metrics(y, np.full(100, 0.03), 0.5)
    assert constant["brier_skill"] == pytest.approx(0) and constant["log_loss_skill"] == pytest.approx(0)
    assert constant["calibration_intercept"] == pytest.approx(0, abs=1e-9) and constant["calibration_slope"] == 0


def test_calibration_intercept_and_slope_recover_a_known_miscalibration() -> None:
    rng = np.random.default_rng(4)
    z = rng.standard_normal(200_000)
    true_logit = -1.5 + z
    y = (rng.random(z.size) < 1 / (1 + np.exp(-true_logit))).astype(int)
    # Too high by 0.5 on the logit scale: the recalibration is true = model - 0.5, intercept -0.5, slope 1.
    shifted = calibration(y, 1 / (1 + np.exp(-(true_logit + 0.5))))
    assert shifted.intercept == pytest.approx(-0.5, abs=3 * shifted.intercept_se) and shifted.intercept_se < 0.01
    assert shifted.slope == pytest.approx(1.0, abs=3 * shifted.slope_se)
    # Too extreme: model logit = true / 0.8, so true = 0.8 * model: slope 0.8.
    extreme = calibration(y, 1 / (1 + np.exp(-true_logit / 0.8)))
    assert extreme.slope == pytest.approx(0.8, abs=3 * extreme.slope_se) and extreme.slope_se < 0.01
    exact = calibration(y, 1 / (1 + np.exp(-true_logit)))
    assert abs(exact.intercept) < 3 * exact.intercept_se and abs(exact.slope - 1) < 3 * exact.slope_se


@pytest.mark.parametrize(
    ("objective", "kwargs", "threshold", "value"),
    [
        # F1 at 0.8: tp 2, fp 0, fn 1 -> 4/5; at 0.35: tp 3, fp 2 -> 6/8; at 0.9: 2/3.
        ("f_beta", {}, 0.8, 0.8),
        # F2 weighs recall: at 0.35, 5 * 3 / (5 * 3 + 0 + 2) = 15/17 beats 0.8's 10/(10 + 4) = 5/7.
        ("f_beta", {"beta": 2.0}, 0.35, 15 / 17),
        # Costs: a miss costs 10, a false alarm 1: predicting everyone positive from 0.35 costs 2 false alarms.
        ("cost", {"cost_false_negative": 10.0}, 0.35, 2 / 6),
        ("fixed", {"fixed": 0.5}, 0.5, 2 / 3),
    ],
)
def test_threshold_is_chosen_for_the_objective(objective: str, kwargs: dict, threshold: float,
                                               value: float) -> None:
    chosen, achieved = choose_threshold(Y, P, objective, **kwargs)
    assert chosen == pytest.approx(threshold) and achieved == pytest.approx(value)
