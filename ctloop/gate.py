"""The promotion gate: a pure decision over candidate (and champion) test metrics.

Every check is reported with its numbers whether it passed or not:
  (a) floors relative to the no-skill baseline (the constant predictor that says the base rate): ROC AUC,
      Brier skill, log-loss skill, PR-AUC lift, and optionally recall and precision at the card's threshold;
  (b) calibration: the calibration intercept within +-``max_calibration_intercept`` and the slope within
      [``min_calibration_slope``, ``max_calibration_slope``], failing only when the estimate is outside the band
      by more than its sampling error (one-sided, level ``alpha``);
  (c) champion comparison, paired on the same test rows (``ctloop.paired``): non-inferiority, the one-sided
      lower bound of (candidate - champion) at least ``-margin``; and, when ``min_lift > 0``, at least
      ``+min_lift``.
The champion is held to (a) and (b) too. A champion below them raises an alert, and the comparison is then
waived: a candidate that clears the floors replaces it even if it is not better.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

from ctloop.config import GateSettings
from ctloop.paired import PairedDifference

# Edges such as ``band + z * se`` are computed in floating point; a value exactly on the edge must count as on
# it, not past it.
_EPS = 1e-12

# The entries about the champion comparison itself (the rest of the champion_* entries are its floor checks).
COMPARISON_CHECKS = ("champion", "champion_below_floors", "champion_non_inferiority", "champion_min_lift")

_MINIMUMS = (("min_roc_auc", "roc_auc"), ("min_brier_skill", "brier_skill"), ("min_log_loss_skill", "log_loss_skill"),
             ("min_pr_auc_lift", "pr_auc_lift"), ("min_recall", "recall"), ("min_precision", "precision"))


@dataclass(frozen=True)
class GateCheck:
    check: str
    metric: str
    value: float | None
    threshold: float | None
    comparator: str  # ">=", "<=", "in", or "n/a" for informational entries
    passed: bool  # False blocks the promotion
    message: str
    alert: bool = False  # the champion failed this check: reported, never blocking


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    primary_metric: str
    candidate_value: float
    champion_value: float | None
    reasons: list[dict[str, Any]] = field(default_factory=list)
    comparison: dict[str, Any] | None = None  # the PairedDifference, when there is a champion
    champion_below_floors: bool = False

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


def _calibration(metrics: dict[str, Any], gate: GateSettings, whose: str) -> list[GateCheck]:
    """The calibration band checks; an estimate fails only when outside the band beyond z * its standard error."""
    z = NormalDist().inv_cdf(1 - gate.alpha)
    checks = []
    a, a_se = _metric(metrics, "calibration_intercept", whose), _metric(metrics, "calibration_intercept_se", whose)
    band = gate.max_calibration_intercept
    passed = -band - z * a_se - _EPS <= a <= band + z * a_se + _EPS
    mean, base = _metric(metrics, "mean_probability", whose), _metric(metrics, "base_rate", whose)
    checks.append(GateCheck(
        "calibration_intercept", "calibration_intercept", a, band, "in", passed,
        f"{'ok' if passed else 'FAILED'}: calibration intercept {a:+.3f} (se {a_se:.3f}) within +-{band:.3f} "
        f"(gate.max_calibration_intercept, one-sided alpha {gate.alpha}); mean probability {mean:.4f} vs base "
        f"rate {base:.4f}"))
    b, b_se = _metric(metrics, "calibration_slope", whose), _metric(metrics, "calibration_slope_se", whose)
    lo, hi = gate.min_calibration_slope, gate.max_calibration_slope
    passed = lo - z * b_se - _EPS <= b <= hi + z * b_se + _EPS
    checks.append(GateCheck(
        "calibration_slope", "calibration_slope", b, lo if b < lo else hi, "in", passed,
        f"{'ok' if passed else 'FAILED'}: calibration slope {b:.3f} (se {b_se:.3f}) within [{lo:.3f}, {hi:.3f}] "
        f"(gate.min/max_calibration_slope, one-sided alpha {gate.alpha})"))
    return checks


def floors(metrics: dict[str, Any], gate: GateSettings, whose: str = "candidate") -> list[GateCheck]:
    """The floors relative to the no-skill baseline and the calibration band, for one model's test metrics."""
    checks = []
    for setting, metric in _MINIMUMS:
        limit = getattr(gate, setting)
        checks.append(_compare(setting, metric, _metric(metrics, metric, whose), limit, ">=", f"gate.{setting}"))
    return checks + _calibration(metrics, gate, whose)


def _as_alert(check: GateCheck) -> GateCheck:
    """A champion's floor check: never blocking, an alert when it failed."""
    verdict = "ok" if check.passed else "ALERT"
    message = f"champion {verdict}: {check.message.split(': ', 1)[1]}"
    return GateCheck(f"champion_{check.check}", check.metric, check.value, check.threshold, check.comparator,
                     True, message, alert=not check.passed)


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, gate: GateSettings,
           comparison: PairedDifference | None = None) -> GateDecision:
    """Judge ``candidate`` test metrics (keys as ``ctloop.metrics.classification_metrics``) against ``gate``.

    ``champion`` holds the champion's metrics on the same test rows, or None for the first model, in which case
    only the floors apply; with a champion, ``comparison`` is the paired difference of the primary metric on
    those rows. Raises ValueError if a needed metric (or the comparison) is missing.
    """
    checks = floors(candidate, gate)
    primary = gate.primary_metric
    cand_value = _metric(candidate, primary, "candidate")
    champ_value: float | None = None
    below = False
    if champion is None:
        checks.append(GateCheck(
            "champion", primary, cand_value, None, "n/a", True,
            "no champion: first model, judged on the floors and calibration only",
        ))
    else:
        if comparison is None or comparison.metric != primary:
            raise ValueError(f"gate: a champion needs the paired comparison of {primary!r} on the same rows, "
                             f"found {None if comparison is None else comparison.metric!r}")
        champ_value = _metric(champion, primary, "champion")
        champion_checks = [_as_alert(c) for c in floors(champion, gate, "champion")]
        below = any(c.alert for c in champion_checks)
        checks += champion_checks
        c = comparison
        interval = (f"{primary} difference {c.difference:+.4f} (candidate {c.candidate:.4f} - champion "
                    f"{c.champion:.4f}), {100 * (1 - 2 * c.alpha):.0f}% interval [{c.lower:+.4f}, {c.upper:+.4f}], "
                    f"{c.method}, {c.n} rows")
        ok = c.lower >= -gate.margin - _EPS
        if below:
            failed = [x.check.removeprefix("champion_") for x in champion_checks if x.alert]
            checks.append(GateCheck(
                "champion_below_floors", primary, cand_value, None, "n/a", True,
                f"ALERT: the champion fails {', '.join(failed)} on this test split; the comparison is waived and "
                f"a candidate that clears the floors replaces it", alert=True))
        checks.append(GateCheck(
            "champion_non_inferiority", primary, c.lower, -gate.margin, ">=", ok or below,
            f"{'ok' if ok else ('waived' if below else 'FAILED')}: lower bound {c.lower:+.4f} >= -gate.margin "
            f"{-gate.margin:+.4f}; {interval}"))
        if gate.min_lift > 0:
            lifted = c.lower >= gate.min_lift - _EPS
            checks.append(GateCheck(
                "champion_min_lift", primary, c.lower, gate.min_lift, ">=", lifted or below,
                f"{'ok' if lifted else ('waived' if below else 'FAILED')}: lower bound {c.lower:+.4f} >= "
                f"gate.min_lift {gate.min_lift:+.4f}"))

    reasons = [asdict(c) for c in checks]
    return GateDecision(
        passed=all(c.passed for c in checks),
        primary_metric=primary,
        candidate_value=cand_value,
        champion_value=champ_value,
        reasons=reasons,
        comparison=comparison.to_dict() if comparison is not None else None,
        champion_below_floors=below,
    )
