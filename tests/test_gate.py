from __future__ import annotations

import json
from typing import Any

import pytest

from ctloop.config import GateSettings
from ctloop.gate import decide

GATE = GateSettings(
    min_roc_auc=0.70, min_pr_auc=0.30, min_recall=0.40, min_precision=0.35, max_log_loss=0.60, max_brier=0.20,
    max_positive_rate_gap=0.10, primary_metric="roc_auc", tolerance=0.005, min_lift=0.0,
)
GOOD = {"roc_auc": 0.80, "pr_auc": 0.55, "f1": 0.60, "precision": 0.50, "recall": 0.70, "log_loss": 0.45,
        "brier": 0.15, "positive_rate": 0.30, "base_rate": 0.25, "n": 1000}
ALL_CHECKS = ["min_roc_auc", "min_pr_auc", "min_recall", "min_precision", "max_log_loss", "max_brier",
              "max_positive_rate_gap"]


def _by_check(decision: Any) -> dict[str, dict[str, Any]]:
    return {r["check"]: r for r in decision.reasons}


def test_first_model_passing_lists_every_check_with_numbers() -> None:
    d = decide(GOOD, None, GATE)
    assert d.passed and d.decision == "pass"
    checks = _by_check(d)
    assert list(checks) == [*ALL_CHECKS, "champion"]
    assert checks["min_roc_auc"] | {"message": None} == {
        "check": "min_roc_auc", "metric": "roc_auc", "value": 0.80, "threshold": 0.70, "comparator": ">=",
        "passed": True, "message": None,
    }
    assert checks["max_brier"]["comparator"] == "<=" and checks["max_brier"]["threshold"] == 0.20
    assert checks["max_positive_rate_gap"]["value"] == pytest.approx(0.05)
    assert "0.8000 >= 0.7000" in checks["min_roc_auc"]["message"]
    assert checks["champion"]["passed"] and "no champion" in checks["champion"]["message"]
    assert d.champion_value is None and d.candidate_value == 0.80
    assert json.loads(d.reasons_json()) == d.reasons


@pytest.mark.parametrize(
    ("check", "metric", "passing", "failing"),
    [
        ("min_roc_auc", "roc_auc", 0.70, 0.6999),
        ("min_pr_auc", "pr_auc", 0.30, 0.2999),
        ("min_recall", "recall", 0.40, 0.3999),
        ("min_precision", "precision", 0.35, 0.3499),
        ("max_log_loss", "log_loss", 0.60, 0.6001),
        ("max_brier", "brier", 0.20, 0.2001),
    ],
)
def test_each_threshold_passes_on_its_edge_and_fails_past_it(check: str, metric: str, passing: float,
                                                             failing: float) -> None:
    ok = decide({**GOOD, metric: passing}, None, GATE)
    assert ok.passed, ok.failed
    bad = decide({**GOOD, metric: failing}, None, GATE)
    assert not bad.passed and bad.decision == "fail"
    assert [r["check"] for r in bad.failed] == [check]
    failed = bad.failed[0]
    assert failed["value"] == failing and "FAILED" in failed["message"]


@pytest.mark.parametrize(
    ("positive_rate", "passed"), [(0.35, True), (0.15, True), (0.3501, False), (0.1499, False)]
)
def test_positive_rate_gap_guardrail_both_directions(positive_rate: float, passed: bool) -> None:
    d = decide({**GOOD, "positive_rate": positive_rate, "base_rate": 0.25}, None, GATE)
    gap = _by_check(d)["max_positive_rate_gap"]
    assert gap["passed"] is passed and d.passed is passed
    assert gap["value"] == pytest.approx(abs(positive_rate - 0.25))


def test_champion_comparison_no_regression_within_tolerance() -> None:
    champion = {**GOOD, "roc_auc": 0.805}
    at_edge = decide({**GOOD, "roc_auc": 0.800}, champion, GATE)  # 0.805 - 0.005: exactly on the edge
    assert at_edge.passed
    check = _by_check(at_edge)["champion_no_regression"]
    assert check["threshold"] == pytest.approx(0.800) and check["comparator"] == ">="
    assert "champion" not in _by_check(at_edge) and "champion_min_lift" not in _by_check(at_edge)
    assert at_edge.champion_value == 0.805

    worse = decide({**GOOD, "roc_auc": 0.7999}, champion, GATE)
    assert not worse.passed and [r["check"] for r in worse.failed] == ["champion_no_regression"]


def test_champion_min_lift_edges() -> None:
    gate = GATE.model_copy(update={"min_lift": 0.01})
    champion = {**GOOD, "roc_auc": 0.78}
    assert decide({**GOOD, "roc_auc": 0.79}, champion, gate).passed  # exactly +0.01
    short = decide({**GOOD, "roc_auc": 0.7899}, champion, gate)
    assert [r["check"] for r in short.failed] == ["champion_min_lift"]
    lift = _by_check(short)["champion_min_lift"]
    assert lift["threshold"] == pytest.approx(0.79) and lift["value"] == 0.7899
    # The no-regression check is still listed, and passes: the candidate is better, just not by enough.
    assert _by_check(short)["champion_no_regression"]["passed"]


def test_zero_tolerance_and_other_primary_metric() -> None:
    gate = GATE.model_copy(update={"tolerance": 0.0, "primary_metric": "pr_auc"})
    champion = {**GOOD, "pr_auc": 0.56, "roc_auc": 0.5}
    d = decide(GOOD, champion, gate)  # better roc_auc than the champion is irrelevant: pr_auc 0.55 < 0.56
    assert not d.passed and d.primary_metric == "pr_auc"
    assert _by_check(d)["champion_no_regression"]["metric"] == "pr_auc"
    assert decide({**GOOD, "pr_auc": 0.56}, champion, gate).passed


def test_first_model_is_not_compared_but_still_gated() -> None:
    d = decide({**GOOD, "roc_auc": 0.65}, None, GATE)
    assert not d.passed
    assert [r["check"] for r in d.failed] == ["min_roc_auc"]
    assert _by_check(d)["champion"]["passed"]


def test_several_failures_are_all_reported() -> None:
    d = decide({**GOOD, "roc_auc": 0.6, "brier": 0.3, "positive_rate": 0.9}, {**GOOD, "roc_auc": 0.9}, GATE)
    assert [r["check"] for r in d.failed] == ["min_roc_auc", "max_brier", "max_positive_rate_gap",
                                              "champion_no_regression"]


def test_nan_metric_fails_its_check() -> None:
    d = decide({**GOOD, "log_loss": float("nan")}, None, GATE)
    assert not d.passed and [r["check"] for r in d.failed] == ["max_log_loss"]
    assert "NaN" in d.failed[0]["message"]


def test_missing_metric_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="candidate metrics have no 'brier'"):
        decide({k: v for k, v in GOOD.items() if k != "brier"}, None, GATE)
    with pytest.raises(ValueError, match="champion metrics have no 'roc_auc'"):
        decide(GOOD, {"pr_auc": 0.5}, GATE)
    with pytest.raises(ValueError, match="must be a number"):
        decide({**GOOD, "recall": "high"}, None, GATE)
