"""ctloop.gate: every check on its edge, the champion alert, and the defaults on synthetic and sample-data models:
an uninformative model fails at any base rate, a calibrated AUC-0.80 model passes at any, a miscalibrated one fails
for its calibration."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from ctloop.config import GateSettings, Settings
from ctloop.features import FeatureSpec
from ctloop.gate import decide
from ctloop.metrics import classification_metrics
from ctloop.modeling import build_pipeline
from ctloop.paired import PairedDifference, paired_difference
from devtools.sample_data import CATEGORICAL_COLUMNS, NUMERIC_COLUMNS, generate_part

GATE = GateSettings(min_recall=0.40, min_precision=0.35)
GOOD = {"roc_auc": 0.80, "pr_auc": 0.55, "f1": 0.60, "precision": 0.50, "recall": 0.70, "log_loss": 0.45,
        "brier": 0.15, "positive_rate": 0.30, "base_rate": 0.25, "n": 1000, "brier_skill": 0.2,
        "log_loss_skill": 0.2, "pr_auc_lift": 2.2, "mean_probability": 0.25, "calibration_intercept": 0.0,
        "calibration_intercept_se": 0.05, "calibration_slope": 1.0, "calibration_slope_se": 0.05}
FLOORS = ["min_roc_auc", "min_brier_skill", "min_log_loss_skill", "min_pr_auc_lift", "min_recall", "min_precision",
          "calibration_intercept", "calibration_slope"]
Z = 1.6448536269514722  # one-sided 95%


def _by_check(decision: Any) -> dict[str, dict[str, Any]]:
    return {r["check"]: r for r in decision.reasons}


def _diff(lower: float, difference: float = 0.0, metric: str = "roc_auc") -> PairedDifference:
    return PairedDifference(metric, 0.80 + difference, 0.80, difference, 0.004, lower, 2 * difference - lower,
                            0.05, "delong", 1000)


def test_first_model_passing_lists_every_check_with_numbers() -> None:
    d = decide(GOOD, None, GATE)
    assert d.passed and d.decision == "pass"
    checks = _by_check(d)
    assert list(checks) == [*FLOORS, "champion"]
    assert checks["min_roc_auc"] | {"message": None} == {
        "check": "min_roc_auc", "metric": "roc_auc", "value": 0.80, "threshold": 0.70, "comparator": ">=",
        "passed": True, "message": None, "alert": False,
    }
    assert checks["min_pr_auc_lift"]["threshold"] == GateSettings().min_pr_auc_lift
    assert "0.8000 >= 0.7000" in checks["min_roc_auc"]["message"]
    assert checks["champion"]["passed"] and "no champion" in checks["champion"]["message"]
    assert d.champion_value is None and d.candidate_value == 0.80 and d.comparison is None
    assert json.loads(d.reasons_json()) == d.reasons


@pytest.mark.parametrize(
    ("check", "metric", "passing", "failing"),
    [
        ("min_roc_auc", "roc_auc", 0.70, 0.6999),
        ("min_brier_skill", "brier_skill", 0.02, 0.0199),
        ("min_log_loss_skill", "log_loss_skill", 0.05, 0.0499),
        ("min_pr_auc_lift", "pr_auc_lift", 1.3, 1.2999),
        ("min_recall", "recall", 0.40, 0.3999),
        ("min_precision", "precision", 0.35, 0.3499),
    ],
)
def test_each_floor_passes_on_its_edge_and_fails_past_it(check: str, metric: str, passing: float,
                                                         failing: float) -> None:
    ok = decide({**GOOD, metric: passing}, None, GATE)
    assert ok.passed, ok.failed
    bad = decide({**GOOD, metric: failing}, None, GATE)
    assert not bad.passed and bad.decision == "fail"
    assert [r["check"] for r in bad.failed] == [check]
    assert bad.failed[0]["value"] == failing and "FAILED" in bad.failed[0]["message"]


@pytest.mark.parametrize(
    ("intercept", "slope", "failed"),
    [
        (0.2 + Z * 0.05, 1.0, []),  # outside the band, but within its sampling error of the edge
        (0.2 + Z * 0.05 + 1e-6, 1.0, ["calibration_intercept"]),
        (-0.2 - Z * 0.05 - 1e-6, 1.0, ["calibration_intercept"]),
        (0.0, 0.8 - Z * 0.05, []),
        (0.0, 0.8 - Z * 0.05 - 1e-6, ["calibration_slope"]),
        (0.0, 1.25 + Z * 0.05 + 1e-6, ["calibration_slope"]),
    ],
)
def test_calibration_band_allows_for_sampling_error(intercept: float, slope: float, failed: list[str]) -> None:
    d = decide({**GOOD, "calibration_intercept": intercept, "calibration_slope": slope}, None, GATE)
    assert [r["check"] for r in d.failed] == failed
    assert "se 0.050" in _by_check(d)["calibration_intercept"]["message"]


def test_non_inferiority_uses_the_lower_bound_and_shows_the_interval() -> None:
    at_edge = decide(GOOD, GOOD, GATE, _diff(lower=-0.015, difference=-0.002))
    assert at_edge.passed
    check = _by_check(at_edge)["champion_non_inferiority"]
    assert check["threshold"] == pytest.approx(-0.015) and check["value"] == pytest.approx(-0.015)
    assert "90% interval [-0.0150, +0.0110]" in check["message"] and "delong" in check["message"]
    assert at_edge.comparison["lower"] == -0.015
    # A better point estimate does not help when the lower bound is past the margin.
    worse = decide(GOOD, GOOD, GATE, _diff(lower=-0.0151, difference=0.001))
    assert not worse.passed and [r["check"] for r in worse.failed] == ["champion_non_inferiority"]


def test_min_lift_needs_the_lower_bound_above_it() -> None:
    gate = GATE.model_copy(update={"min_lift": 0.01})
    assert decide(GOOD, GOOD, gate, _diff(lower=0.01, difference=0.02)).passed
    short = decide(GOOD, GOOD, gate, _diff(lower=0.0099, difference=0.03))
    assert [r["check"] for r in short.failed] == ["champion_min_lift"]
    assert _by_check(short)["champion_non_inferiority"]["passed"]


def test_comparison_must_be_of_the_primary_metric() -> None:
    with pytest.raises(ValueError, match="paired comparison of 'roc_auc'"):
        decide(GOOD, GOOD, GATE)
    with pytest.raises(ValueError, match="found 'pr_auc'"):
        decide(GOOD, GOOD, GATE, _diff(lower=0.0, metric="pr_auc"))


def test_champion_below_the_floors_is_an_alert_and_is_replaced_even_by_a_worse_candidate() -> None:
    champion = {**GOOD, "brier_skill": -0.05, "calibration_intercept": 0.9}
    d = decide(GOOD, champion, GATE, _diff(lower=-0.05, difference=-0.03))
    assert d.passed and d.champion_below_floors
    checks = _by_check(d)
    assert checks["champion_min_brier_skill"]["alert"] and checks["champion_calibration_intercept"]["alert"]
    assert not checks["champion_min_roc_auc"]["alert"]
    assert checks["champion_below_floors"]["alert"]
    assert "min_brier_skill, calibration_intercept" in checks["champion_below_floors"]["message"]
    assert checks["champion_non_inferiority"]["message"].startswith("waived")
    # ...but the candidate must still clear the floors itself.
    bad = decide({**GOOD, "roc_auc": 0.6}, champion, GATE, _diff(lower=-0.05))
    assert not bad.passed and [r["check"] for r in bad.failed] == ["min_roc_auc"]


def test_a_sound_champion_raises_no_alert() -> None:
    d = decide(GOOD, GOOD, GATE, _diff(lower=-0.005))
    assert d.passed and not d.champion_below_floors
    assert not any(r["alert"] for r in d.reasons) and "champion_below_floors" not in _by_check(d)


def test_nan_metric_fails_its_check() -> None:
    d = decide({**GOOD, "log_loss_skill": float("nan")}, None, GATE)
    assert not d.passed and [r["check"] for r in d.failed] == ["min_log_loss_skill"]
    assert "NaN" in d.failed[0]["message"]


def test_missing_metric_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="candidate metrics have no 'brier_skill'"):
        decide({k: v for k, v in GOOD.items() if k != "brier_skill"}, None, GATE)
    with pytest.raises(ValueError, match="champion metrics have no 'roc_auc'"):
        decide(GOOD, {"pr_auc": 0.5}, GATE, _diff(lower=0.0))
    with pytest.raises(ValueError, match="must be a number"):
        decide({**GOOD, "recall": "high"}, None, GATE)


def test_slope_band_must_be_a_band() -> None:
    with pytest.raises(ValueError, match="min_calibration_slope"):
        GateSettings(min_calibration_slope=1.3, max_calibration_slope=1.2)


# --- the defaults across base rates ----------------------------------------------------------------------

# logit p = a + s z, z ~ N(0, 1): calibrated by construction; (s, a) give a mean probability of the base rate
# and a population ROC AUC of 0.80 (found by root-finding on 400,000 draws).
CALIBRATED_080 = {0.02: (1.213, -4.572), 0.18: (1.340, -1.989), 0.5: (1.394, 0.0)}
N = 20_000


@pytest.mark.parametrize("base_rate", sorted(CALIBRATED_080))
def test_defaults_reject_no_skill_and_pass_a_calibrated_auc_080_model_at_any_base_rate(base_rate: float) -> None:
    s, a = CALIBRATED_080[base_rate]
    rng = np.random.default_rng(int(base_rate * 100))
    p = 1 / (1 + np.exp(-(a + s * rng.standard_normal(N))))
    y = (rng.random(N) < p).astype(int)
    gate = Settings().gate
    good = classification_metrics(y, p, 0.5)
    assert good["roc_auc"] == pytest.approx(0.80, abs=0.015)  # the premise
    assert decide(good, None, gate).passed, decide(good, None, gate).failed

    # No skill: the base rate for everyone, and scores that carry no information about the label.
    constant = classification_metrics(y, np.full(N, y.mean()), 0.5)
    noise = classification_metrics(y, np.clip(rng.beta(2, 2 / base_rate - 2, N), 1e-6, 1 - 1e-6), 0.5)
    for metrics in (constant, noise):
        d = decide(metrics, None, gate)
        failed = {r["check"] for r in d.failed}
        assert not d.passed
        assert {"min_roc_auc", "min_brier_skill", "min_log_loss_skill", "min_pr_auc_lift"} <= failed, failed


# --- a model fitted on the sample data, as the new user would ---------------------------------------

NUMERIC, CATEGORICAL = list(NUMERIC_COLUMNS), list(CATEGORICAL_COLUMNS)


def _sample(rows: int, seed: int) -> Any:
    frame = generate_part(Settings(), 0, rows=rows, seed=seed, batch=f"gate-{seed}").to_pandas()
    return frame[frame["churned"].isin([0, 1])]


def test_class_weighted_logistic_regression_is_rejected_for_its_calibration() -> None:
    spec = FeatureSpec("customer_id", "event_ts", "churned", NUMERIC, CATEGORICAL, history_enabled=False)
    train, test = _sample(30_000, 11), _sample(15_000, 12)
    y = test["churned"].to_numpy()

    def fitted(params: dict[str, Any]) -> np.ndarray:
        model = build_pipeline(spec, Settings().model.model_copy(update={"type": "logistic_regression",
                                                                          "params": params}))
        model.fit(train[spec.model_features], train["churned"])
        return model.predict_proba(test[spec.model_features])[:, 1]

    balanced, plain = fitted({}), fitted({"class_weight": None})  # the default is class_weight="balanced"
    gate = Settings().gate
    cand, champ = classification_metrics(y, balanced, 0.5), classification_metrics(y, plain, 0.5)
    assert 0.15 < cand["base_rate"] < 0.21 and cand["mean_probability"] > 0.30  # the premise
    comparison = paired_difference(y, balanced, plain, "roc_auc", gate.alpha)
    d = decide(cand, champ, gate, comparison)
    assert not d.passed and [r["check"] for r in d.failed] == ["calibration_intercept"]
    assert "mean probability" in d.failed[0]["message"]
    assert not d.champion_below_floors  # the calibrated champion clears every floor
    assert _by_check(d)["champion_non_inferiority"]["passed"]  # it ranks as well: only its calibration fails
