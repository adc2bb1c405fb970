"""Binary-classification metrics shared by training (validation split), the gate (test split) and reports.

A row is predicted positive when its probability is ``>= threshold``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

METRIC_NAMES = (
    "roc_auc", "pr_auc", "f1", "precision", "recall", "log_loss", "brier", "positive_rate", "base_rate", "n",
)


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
    return {
        "roc_auc": float(skm.roc_auc_score(y, p)),
        "pr_auc": float(skm.average_precision_score(y, p)),
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, zero_division=0)),
        "log_loss": float(skm.log_loss(y, p, labels=[0, 1])),
        "brier": float(skm.brier_score_loss(y, p)),
        "positive_rate": float(pred.mean()),
        "base_rate": float(y.mean()),
        "n": len(y),
    }


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
