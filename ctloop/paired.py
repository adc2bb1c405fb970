"""Paired comparison of two models scored on the same rows: the difference in a metric and its lower bound.

ROC AUC uses DeLong's variance of the difference of two correlated AUCs (the fast midrank form of Sun & Xu,
2014); PR AUC and F1 use a paired bootstrap (both models' scores resampled together, so what the two share
cancels). Both give a one-sided (1 - alpha) lower confidence bound for (candidate - champion), which the gate
compares with ``-margin`` (non-inferiority) and ``+min_lift`` (superiority).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats
from sklearn import metrics as skm

Method = Literal["delong", "bootstrap"]


@dataclass(frozen=True)
class PairedDifference:
    """(candidate - champion) in ``metric`` on the same rows, with its standard error and bounds."""

    metric: str
    candidate: float
    champion: float
    difference: float
    standard_error: float
    lower: float  # one-sided (1 - alpha) lower confidence bound of the difference
    upper: float  # one-sided (1 - alpha) upper bound: lower and upper form the two-sided (1 - 2 alpha) interval
    alpha: float
    method: Method
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _structural_components(y: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's placement values: V10 per positive, V01 per negative (midranks handle ties)."""
    pos, neg = p[y == 1], p[y == 0]
    m, n = len(pos), len(neg)
    tx, ty = stats.rankdata(pos), stats.rankdata(neg)
    tz = stats.rankdata(np.concatenate([pos, neg]))
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return float(v10.mean()), v10, v01


def auc_variance(y: Any, p: Any) -> tuple[float, float]:
    """ROC AUC of one model and DeLong's variance of it."""
    auc, v10, v01 = _structural_components(np.asarray(y), np.asarray(p, dtype="float64"))
    return auc, float(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))


def delong(y: np.ndarray, candidate: np.ndarray, champion: np.ndarray, alpha: float) -> PairedDifference:
    """DeLong's test of two correlated ROC AUCs on the same rows."""
    y = np.asarray(y)
    auc_a, v10_a, v01_a = _structural_components(y, np.asarray(candidate, dtype="float64"))
    auc_b, v10_b, v01_b = _structural_components(y, np.asarray(champion, dtype="float64"))
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    cov = s10 / len(v10_a) + s01 / len(v01_a)
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    z = float(stats.norm.ppf(1 - alpha))
    diff = auc_a - auc_b
    return PairedDifference("roc_auc", auc_a, auc_b, diff, se, diff - z * se, diff + z * se, alpha, "delong",
                            len(y))


def _metric_fn(metric: str, thresholds: tuple[float, float]) -> Any:
    if metric == "pr_auc":
        return lambda y, p, _: skm.average_precision_score(y, p)
    if metric == "f1":
        return lambda y, p, which: skm.f1_score(y, p >= thresholds[which], zero_division=0)
    if metric == "roc_auc":
        return lambda y, p, _: skm.roc_auc_score(y, p)
    raise ValueError(f"paired comparison: unknown metric {metric!r}; expected roc_auc, pr_auc or f1")


def bootstrap(y: np.ndarray, candidate: np.ndarray, champion: np.ndarray, metric: str, alpha: float, *,
              samples: int, seed: int, thresholds: tuple[float, float] = (0.5, 0.5)) -> PairedDifference:
    """Paired bootstrap of (candidate - champion) in ``metric``: percentile bounds, resampling rows within each
    class (so every resample has both classes and the base rate of the rows)."""
    y = np.asarray(y)
    a, b = np.asarray(candidate, dtype="float64"), np.asarray(champion, dtype="float64")
    fn = _metric_fn(metric, thresholds)
    point_a, point_b = float(fn(y, a, 0)), float(fn(y, b, 1))
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = np.empty(samples)
    for i in range(samples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        diffs[i] = fn(y[idx], a[idx], 0) - fn(y[idx], b[idx], 1)
    lower, upper = np.quantile(diffs, [alpha, 1 - alpha])
    return PairedDifference(metric, point_a, point_b, point_a - point_b, float(diffs.std(ddof=1)), float(lower),
                            float(upper), alpha, "bootstrap", len(y))


def paired_difference(y: Any, candidate: Any, champion: Any, metric: str, alpha: float, *, samples: int = 1000,
                      seed: int = 0, thresholds: tuple[float, float] = (0.5, 0.5)) -> PairedDifference:
    """(candidate - champion) in ``metric`` with a one-sided (1 - alpha) lower bound: DeLong for roc_auc, a
    paired bootstrap for the others. ``thresholds`` are the two models' decision thresholds (for f1)."""
    y_arr = np.asarray(y)
    if len(y_arr) != len(candidate) or len(y_arr) != len(champion):
        raise ValueError(f"paired comparison: {len(y_arr)} labels, {len(candidate)} candidate and "
                         f"{len(champion)} champion scores: the two models must score the same rows")
    if metric == "roc_auc":
        return delong(y_arr, np.asarray(candidate), np.asarray(champion), alpha)
    return bootstrap(y_arr, np.asarray(candidate), np.asarray(champion), metric, alpha, samples=samples,
                     seed=seed, thresholds=thresholds)
