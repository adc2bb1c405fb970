"""Performance decay: the champion's ROC AUC on a newly labelled batch against its AUC on its own valid split.

Feature and score distributions cannot see concept drift (the same inputs, a new relation to the label); the
champion's performance on labelled new rows can. The two AUCs are from different rows, so their variances
(DeLong's, per AUC) add: the one-sided (1 - alpha) lower bound of the drop is
``drop - z * sqrt(var_reference + var_recent)``, and the champion has decayed when that bound exceeds
``monitoring.min_auc_drop``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from ctloop.metrics import classification_metrics
from ctloop.paired import auc_variance


@dataclass(frozen=True)
class Decay:
    """The champion's AUC on the reference and the recent labelled rows, the drop and its lower bound."""

    reference_roc_auc: float
    recent_roc_auc: float
    drop: float  # reference - recent
    standard_error: float
    lower: float  # one-sided (1 - alpha) lower bound of the drop
    alpha: float
    min_drop: float
    decayed: bool
    reference_rows: int
    recent_rows: int
    recent_metrics: dict[str, float | int]  # every metric on the recent rows at the champion's threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def performance_decay(y_reference: Any, p_reference: Any, y_recent: Any, p_recent: Any, *, threshold: float,
                      alpha: float, min_drop: float) -> Decay:
    """Has the champion's ROC AUC dropped, beyond ``min_drop`` and significantly, from reference to recent?"""
    y_ref, p_ref = np.asarray(y_reference), np.asarray(p_reference, dtype="float64")
    y_new, p_new = np.asarray(y_recent), np.asarray(p_recent, dtype="float64")
    recent = classification_metrics(y_new, p_new, threshold)
    auc_ref, var_ref = auc_variance(y_ref, p_ref)
    auc_new, var_new = auc_variance(y_new, p_new)
    se = float(np.sqrt(var_ref + var_new))
    drop = auc_ref - auc_new
    lower = drop - float(stats.norm.ppf(1 - alpha)) * se
    return Decay(reference_roc_auc=auc_ref, recent_roc_auc=auc_new, drop=drop, standard_error=se, lower=lower,
                 alpha=alpha, min_drop=min_drop, decayed=lower > min_drop, reference_rows=len(y_ref),
                 recent_rows=len(y_new), recent_metrics=recent)
