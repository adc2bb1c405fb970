"""Binary-classification metrics shared by training (validation split), the gate (test split) and reports.

A row is predicted positive when its probability is ``>= threshold``.

Besides the raw metrics, each is also given relative to the no-skill baseline that predicts the base rate b of the
scored rows for everyone, so that one gate setting means the same thing at any base rate:
- ``brier_skill`` = 1 - Brier / (b (1 - b))      (the constant predictor's Brier score is b (1 - b));
- ``log_loss_skill`` = 1 - log loss / H(b)       (its log loss is the entropy H(b));
- ``pr_auc_lift`` = PR AUC / b                   (a random ranking's average precision is b).
Calibration (Cox): ``calibration_slope`` and ``calibration_intercept`` of the logistic recalibration
``logit P(y=1) = a + b logit(p)``; the intercept is ``a`` with the slope fixed at 1 (calibration in the large,
0 when the mean probability is right on the logit scale), the slope is ``b`` from the two-parameter fit (1 when
the spread of the probabilities is right, < 1 when they are too extreme).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn import metrics as skm

METRIC_NAMES = (
    "roc_auc", "pr_auc", "f1", "precision", "recall", "log_loss", "brier", "positive_rate", "base_rate", "n",
    "brier_skill", "log_loss_skill", "pr_auc_lift", "mean_probability", "calibration_intercept",
    "calibration_intercept_se", "calibration_slope", "calibration_slope_se",
)
# Probabilities are clipped this far from 0 and 1 before taking logits (sklearn's log_loss clips the same way).
_CLIP = 1e-15


def _validate(y_true: Any, proba: Any, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype="float64")
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"metrics: expected 1-d labels and probabilities, found shapes {y.shape}, {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"metrics: {len(y)} labels but {len(p)} probabilities")
    if len(y) == 0:
        raise ValueError("metrics: no rows to score")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        bad = p[~(np.isfinite(p) & (p >= 0) & (p <= 1))][:5].tolist()
        raise ValueError(f"metrics: probabilities must be finite numbers in [0, 1], found e.g. {bad}")
    labels = set(np.unique(y).tolist())
    if not labels <= {0, 1}:
        raise ValueError(f"metrics: labels must be 0/1, found values {sorted(labels - {0, 1}, key=str)[:5]}")
    if len(labels) < 2:
        raise ValueError(
            f"metrics: the labels hold only class {labels.pop()} ({len(y)} rows); ROC AUC, PR AUC and log "
            "loss need both classes: the split is too small or the label is constant"
        )
    if threshold is not None and not 0 < threshold < 1:
        raise ValueError(f"metrics: threshold must be in (0, 1), found {threshold}")
    return y.astype("int64"), p


def classification_metrics(y_true: Any, proba: Any, threshold: float) -> dict[str, float | int]:
    """Ranking, thresholded and calibration metrics of positive-class probabilities against 0/1 labels.

    Raises ValueError when the labels hold one class only (AUCs are undefined), or on malformed input.
    """
    y, p = _validate(y_true, proba, threshold)
    pred = (p >= threshold).astype("int64")
    base = float(y.mean())
    pr_auc = float(skm.average_precision_score(y, p))
    log_loss = float(skm.log_loss(y, p, labels=[0, 1]))
    brier = float(skm.brier_score_loss(y, p))
    cal = calibration(y, p)
    return {
        "roc_auc": float(skm.roc_auc_score(y, p)),
        "pr_auc": pr_auc,
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, zero_division=0)),
        "log_loss": log_loss,
        "brier": brier,
        "positive_rate": float(pred.mean()),
        "base_rate": base,
        "n": len(y),
        "brier_skill": 1.0 - brier / (base * (1.0 - base)),
        "log_loss_skill": 1.0 - log_loss / _entropy(base),
        "pr_auc_lift": pr_auc / base,
        "mean_probability": float(p.mean()),
        "calibration_intercept": cal.intercept,
        "calibration_intercept_se": cal.intercept_se,
        "calibration_slope": cal.slope,
        "calibration_slope_se": cal.slope_se,
    }


def _entropy(b: float) -> float:
    return float(-(b * np.log(b) + (1 - b) * np.log(1 - b)))


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _CLIP, 1 - _CLIP)
    return np.log(q / (1 - q))


def _logistic_fit(y: np.ndarray, x: np.ndarray | None, offset: np.ndarray,
                  steps: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood coefficients of ``logit P(y=1) = offset + [1, x] @ beta`` by Newton's method, and
    their standard errors (from the inverse Fisher information)."""
    design = np.ones((len(y), 1)) if x is None else np.column_stack([np.ones(len(y)), x])
    beta = np.zeros(design.shape[1])
    for _ in range(steps):
        eta = np.clip(offset + design @ beta, -35, 35)
        mu = 1 / (1 + np.exp(-eta))
        w = mu * (1 - mu)
        hessian = design.T @ (design * w[:, None])
        step = np.linalg.lstsq(hessian, design.T @ (y - mu), rcond=None)[0]
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    eta = np.clip(offset + design @ beta, -35, 35)
    w = 1 / (1 + np.exp(-eta)) * (1 - 1 / (1 + np.exp(-eta)))
    covariance = np.linalg.pinv(design.T @ (design * w[:, None]))
    return beta, np.sqrt(np.maximum(np.diag(covariance), 0.0))


@dataclass(frozen=True)
class Calibration:
    intercept: float
    intercept_se: float
    slope: float
    slope_se: float


def calibration(y_true: Any, proba: Any) -> Calibration:
    """Calibration intercept (slope fixed at 1) and calibration slope of probabilities against 0/1 labels, with
    their standard errors.

    A perfectly calibrated model has (0, 1). A model whose mean probability is too high has a negative
    intercept; one whose probabilities are too extreme has a slope below 1. A constant predictor has no spread
    to calibrate: slope 0 (standard error 0).
    """
    y, p = _validate(y_true, proba)
    yf, lp = y.astype("float64"), _logit(p)
    (intercept,), (intercept_se,) = _logistic_fit(yf, None, lp)
    if np.ptp(lp) == 0:
        return Calibration(float(intercept), float(intercept_se), 0.0, 0.0)
    (_, slope), (_, slope_se) = _logistic_fit(yf, lp, np.zeros(len(y)))
    return Calibration(float(intercept), float(intercept_se), float(slope), float(slope_se))


Objective = Literal["f_beta", "cost", "fixed"]


def choose_threshold(y_true: Any, proba: Any, objective: Objective, *, beta: float = 1.0,
                     cost_false_positive: float = 1.0, cost_false_negative: float = 1.0,
                     fixed: float = 0.5) -> tuple[float, float]:
    """The decision threshold that serves ``objective`` best on these rows, and the objective's value there.

    ``f_beta``: the largest F-beta; ``cost``: the smallest mean cost per row, ``cost_false_positive`` for each
    false alarm and ``cost_false_negative`` for each missed positive; ``fixed``: ``fixed`` itself (its F-beta).
    Candidates are the observed probabilities (predicted positive at ``>=``), so the choice is exact on the rows.
    """
    y, p = _validate(y_true, proba)
    if objective == "fixed":
        pred = p >= fixed
        return float(fixed), float(skm.fbeta_score(y, pred, beta=beta, zero_division=0))
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    last = np.r_[ps[1:] != ps[:-1], True]  # the last row of each run of tied probabilities
    tp = np.cumsum(ys)[last].astype("float64")
    fp = np.cumsum(1 - ys)[last].astype("float64")
    thresholds = ps[last]
    positives = float(ys.sum())
    if objective == "f_beta":
        b2 = beta * beta
        score = (1 + b2) * tp / ((1 + b2) * tp + b2 * (positives - tp) + fp)
        best = int(np.argmax(score))
        value = float(score[best])
    elif objective == "cost":
        cost = (cost_false_positive * fp + cost_false_negative * (positives - tp)) / len(y)
        best = int(np.argmin(cost))
        value = float(cost[best])
    else:
        raise ValueError(f"choose_threshold: objective must be f_beta, cost or fixed, found {objective!r}")
    # Predicted positive at >= threshold, and a threshold must lie in (0, 1).
    return float(np.clip(thresholds[best], 1e-6, 1 - 1e-6)), value


def roc_curve_points(y: Any, p: Any, max_points: int = 200) -> dict[str, list[float]]:
    """ROC curve as ``fpr``, ``tpr``, ``thresholds`` lists, at most ``max_points`` long, finite thresholds.

    sklearn's first threshold is ``inf`` (the "predict nothing" point); KFP's ``log_roc_curve`` rejects
    non-finite numbers, so it is dropped. Thinning keeps the first and last points and evenly spaced ones.
    """
    if max_points < 2:
        raise ValueError(f"roc_curve_points: max_points must be >= 2, found {max_points}")
    y_arr, p_arr = _validate(y, p)
    fpr, tpr, thr = skm.roc_curve(y_arr, p_arr, drop_intermediate=True)
    keep = np.isfinite(thr)
    fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    if len(thr) > max_points:
        idx = np.unique(np.linspace(0, len(thr) - 1, max_points).round().astype(int))
        fpr, tpr, thr = fpr[idx], tpr[idx], thr[idx]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


def pr_curve_points(y: Any, p: Any, max_points: int = 200) -> dict[str, list[float]]:
    """Precision-recall curve as ``precision``, ``recall``, ``thresholds`` lists, thinned to ``max_points``."""
    if max_points < 2:
        raise ValueError(f"pr_curve_points: max_points must be >= 2, found {max_points}")
    y_arr, p_arr = _validate(y, p)
    precision, recall, thr = skm.precision_recall_curve(y_arr, p_arr, drop_intermediate=True)
    # sklearn appends the (recall 0, precision 1) end point without a threshold: keep the pairs that have one.
    precision, recall = precision[:-1], recall[:-1]
    if len(thr) > max_points:
        idx = np.unique(np.linspace(0, len(thr) - 1, max_points).round().astype(int))
        precision, recall, thr = precision[idx], recall[idx], thr[idx]
    return {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": thr.tolist()}


def confusion(y: Any, p: Any, threshold: float) -> list[list[int]]:
    """2x2 confusion matrix ``[[tn, fp], [fn, tp]]``: rows are the actual class 0/1, columns the predicted."""
    y_arr, p_arr = _validate(y, p, threshold)
    pred = (p_arr >= threshold).astype("int64")
    matrix = skm.confusion_matrix(y_arr, pred, labels=[0, 1])
    return [[int(v) for v in row] for row in matrix]
