"""The promotion gate: a pure decision over candidate (and champion) test metrics.

Three groups of checks, every one reported with its numbers whether it passed or not:
  (a) absolute thresholds: roc_auc, pr_auc, recall, precision at or above their minimums;
  (b) guardrails: log loss and Brier score at or below their maximums, and the predicted positive rate within
      ``max_positive_rate_gap`` of the actual base rate;
  (c) champion comparison (both scored on the same test rows): no regression beyond ``tolerance`` on the
      primary metric, and, when ``min_lift > 0``, an improvement of at least ``min_lift``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ctloop.config import GateSettings

# Thresholds such as ``champion - tolerance`` are computed in floating point; a value exactly on the edge
# (0.800 vs 0.805 - 0.005 = 0.8000000000000002) must count as on the edge, not below it.
_EPS = 1e-12

_MINIMUMS = (("min_roc_auc", "roc_auc"), ("min_pr_auc", "pr_auc"), ("min_recall", "recall"),
             ("min_precision", "precision"))
_MAXIMUMS = (("max_log_loss", "log_loss"), ("max_brier", "brier"))


@dataclass(frozen=True)
class GateCheck:
    check: str
    metric: str
    value: float | None
    threshold: float | None
    comparator: str  # ">=", "<=", or "n/a" for the informational no-champion entry
    passed: bool
    message: str


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    primary_metric: str
    candidate_value: float
    champion_value: float | None
    reasons: list[dict[str, Any]] = field(default_factory=list)

    @property
    def decision(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.reasons if not r["passed"]]

    def reasons_json(self) -> str:
        return json.dumps(self.reasons, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decision": self.decision}


def _metric(metrics: dict[str, Any], name: str, whose: str) -> float:
    if name not in metrics:
        raise ValueError(f"gate: {whose} metrics have no {name!r}; found {sorted(metrics)}")
    value = metrics[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"gate: {whose} metric {name!r} must be a number, found {value!r}")
    return float(value)


def _compare(check: str, metric: str, value: float, threshold: float, comparator: str,
             what: str) -> GateCheck:
    if math.isnan(value) or math.isnan(threshold):
        return GateCheck(check, metric, value, threshold, comparator, False,
                         f"FAILED: {metric} {value} {comparator} {threshold}: NaN does not compare ({what})")
    passed = value >= threshold - _EPS if comparator == ">=" else value <= threshold + _EPS
    verdict = "ok" if passed else "FAILED"
    return GateCheck(check, metric, value, threshold, comparator, passed,
                     f"{verdict}: {metric} {value:.4f} {comparator} {threshold:.4f} ({what})")


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, gate: GateSettings) -> GateDecision:
    """Judge ``candidate`` test metrics (keys as ``ctloop.metrics.classification_metrics``) against ``gate``.

    ``champion`` holds the champion's metrics on the same test rows, or None for the first model, in which
    case only the absolute thresholds and guardrails apply. Raises ValueError if a needed metric is missing.
    """
    checks: list[GateCheck] = []
    for setting, metric in _MINIMUMS:
        limit = getattr(gate, setting)
        checks.append(_compare(setting, metric, _metric(candidate, metric, "candidate"), limit, ">=",
                               f"gate.{setting}"))
    for setting, metric in _MAXIMUMS:
        limit = getattr(gate, setting)
        checks.append(_compare(setting, metric, _metric(candidate, metric, "candidate"), limit, "<=",
                               f"gate.{setting}"))
    gap = abs(_metric(candidate, "positive_rate", "candidate") - _metric(candidate, "base_rate", "candidate"))
    checks.append(_compare(
        "max_positive_rate_gap", "positive_rate_gap", gap, gate.max_positive_rate_gap, "<=",
        f"|predicted positive rate {candidate['positive_rate']:.4f} - base rate {candidate['base_rate']:.4f}|"
        ", gate.max_positive_rate_gap",
    ))

    primary = gate.primary_metric
    cand_value = _metric(candidate, primary, "candidate")
    champ_value: float | None = None
    if champion is None:
        checks.append(GateCheck(
            "champion", primary, cand_value, None, "n/a", True,
            "no champion: first model, judged on absolute thresholds and guardrails only",
        ))
    else:
        champ_value = _metric(champion, primary, "champion")
        checks.append(_compare(
            "champion_no_regression", primary, cand_value, champ_value - gate.tolerance, ">=",
            f"champion {champ_value:.4f} - gate.tolerance {gate.tolerance:.4f}",
        ))
        if gate.min_lift > 0:
            checks.append(_compare(
                "champion_min_lift", primary, cand_value, champ_value + gate.min_lift, ">=",
                f"champion {champ_value:.4f} + gate.min_lift {gate.min_lift:.4f}",
            ))

    reasons = [asdict(c) for c in checks]
    return GateDecision(
        passed=all(c.passed for c in checks),
        primary_metric=primary,
        candidate_value=cand_value,
        champion_value=champ_value,
        reasons=reasons,
    )
