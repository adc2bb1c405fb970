"""ctloop.drift: the statistics against hand-computed values, the decision rule, and the measured false-alarm and
detection rates on the sample data (the figures docs/monitoring.md quotes; `pytest -s` prints them)."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.drift import run_drift_check
from components.recent import gather_recent
from ctloop.config import MonitoringSettings, Settings, load_settings
from ctloop.drift import (
    MISSING,
    OTHER,
    bin_counts,
    categorical_drift,
    chi_square,
    compare,
    decide,
    ks_test,
    numeric_drift,
    psi,
    quantile_edges,
    score_drift,
)
from ctloop.errors import DataValidationError
from ctloop.features import FeatureSpec
from ctloop.modeling import train_model
from devtools.sample_data import CATEGORICAL_COLUMNS, NUMERIC_COLUMNS, generate_part, write_sample_data
from tests.modeling_fixtures import write_split

S = MonitoringSettings()
NUMERIC, CATEGORICAL = list(NUMERIC_COLUMNS), list(CATEGORICAL_COLUMNS)
REPO = Path(__file__).resolve().parents[1]


# --- the statistics, by hand -----------------------------------------------------------------------------


def test_psi_of_two_bins() -> None:
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    assert psi([0.5, 0.5], [0.25, 0.75], 1e-4) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5], 1e-4) == 0.0


def test_numeric_psi_uses_reference_quantile_bins_and_epsilon_for_empty_bins() -> None:
    reference = pd.Series(np.arange(1.0, 11.0))
    recent = pd.Series([1.0, 1, 1, 1, 6, 7, 8, 9, 10, 10])
    # The smallest values of 1..10 whose empirical CDF reaches 0.25 / 0.5 / 0.75: 3, 5, 8
    edges = quantile_edges(reference.to_numpy(), 4)
    assert edges.tolist() == [3.0, 5.0, 8.0]
    assert bin_counts(reference.to_numpy(), edges).tolist() == [2, 2, 3, 3]
    assert bin_counts(recent.to_numpy(), edges).tolist() == [4, 0, 2, 4]
    f = numeric_drift("x", reference, recent, MonitoringSettings(bins=4))
    # fractions .2 .2 .3 .3 -> .4 0 .2 .4; the empty bin counts as epsilon = 1e-4
    expected = ((0.4 - 0.2) * math.log(0.4 / 0.2) + (1e-4 - 0.2) * math.log(1e-4 / 0.2)
                + (0.2 - 0.3) * math.log(0.2 / 0.3) + (0.4 - 0.3) * math.log(0.4 / 0.3))
    assert f.psi == pytest.approx(expected)
    assert f.histogram.labels == ["< 3", "[3, 5)", "[5, 8)", ">= 8"]


def test_tied_quantiles_collapse_into_fewer_bins() -> None:
    counts = np.array([0] * 70 + [1] * 20 + [2] * 10, dtype=float)  # a count feature, mostly zero
    edges = quantile_edges(counts, 10)
    assert edges.tolist() == [0.0, 1.0]  # deciles: 0 up to the 7th, 1 for the 8th and 9th
    assert bin_counts(counts, edges).tolist() == [0, 70, 30]


def test_ks_matches_the_exact_permutation_distribution() -> None:
    reference, recent = np.array([1.0, 2, 3, 4]), np.array([2.5, 3.5, 5, 6])
    statistic, p_value = ks_test(reference, recent)
    assert statistic == pytest.approx(0.5)  # the ECDFs differ most at 2, 3 and 4: 0.5
    # Enumerate every way to split the 8 pooled values into two groups of 4: P(D >= 0.5).
    pooled = np.concatenate([reference, recent])
    grid = np.sort(pooled)

    def d(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.max(np.abs(np.searchsorted(np.sort(a), grid, side="right") / 4
                                   - np.searchsorted(np.sort(b), grid, side="right") / 4)))

    splits = [d(pooled[list(i)], np.delete(pooled, list(i))) for i in itertools.combinations(range(8), 4)]
    assert p_value == pytest.approx(sum(s >= 0.5 - 1e-12 for s in splits) / len(splits))


def test_chi_square_of_a_2x3_table() -> None:
    # expected counts 15 20 25 per row: 2 * (25/15 + 0 + 25/25) = 16/3, 2 degrees of freedom: p = exp(-x / 2)
    statistic, p_value = chi_square([10, 20, 30], [20, 20, 20])
    assert statistic == pytest.approx(16 / 3)
    assert p_value == pytest.approx(math.exp(-8 / 3))
    assert chi_square([5, 0], [7, 0]) == (0.0, 1.0)  # one bucket left: nothing to compare


def test_categorical_psi_has_other_and_missing_buckets() -> None:
    reference = pd.Series(["a"] * 6 + ["b"] * 3 + [None])
    recent = pd.Series(["a"] * 4 + ["c"] * 4 + [None] * 2)
    f = categorical_drift("plan", reference, recent, S)
    assert f.histogram.labels == ["a", "b", OTHER, MISSING]
    assert f.histogram.reference == pytest.approx([0.6, 0.3, 0.0, 0.1])
    assert f.histogram.recent == pytest.approx([0.4, 0.0, 0.4, 0.2])
    e = 1e-4
    expected = ((0.4 - 0.6) * math.log(0.4 / 0.6) + (e - 0.3) * math.log(e / 0.3) + (0.4 - e) * math.log(0.4 / e)
                + (0.2 - 0.1) * math.log(0.2 / 0.1))
    assert f.psi == pytest.approx(expected)
    assert (f.missing_reference, f.missing_recent) == (0.1, 0.2)
    statistic, _ = chi_square([6, 3, 0, 1], [4, 0, 4, 2])
    assert f.statistic == pytest.approx(statistic)


def test_rare_reference_categories_share_the_other_bucket() -> None:
    reference = pd.Series(["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5)
    f = categorical_drift("x", reference, reference, MonitoringSettings(max_categories=2))
    assert f.histogram.labels == ["a", "b", OTHER, MISSING]
    assert f.histogram.reference == pytest.approx([0.5, 0.3, 0.2, 0.0])
    assert f.psi == 0.0 and f.status == "ok"


def test_missing_rate_change_is_tested_and_flagged() -> None:
    rng = np.random.default_rng(3)
    ref = pd.Series(rng.normal(size=1000))
    cur = pd.Series(rng.normal(size=1000))
    ref[:100] = np.nan
    cur[:300] = np.nan
    report = compare(pd.DataFrame({"x": ref}), pd.DataFrame({"x": cur}), ["x"], [], S)
    (f,) = report.features
    assert (f.missing_reference, f.missing_recent) == (0.1, 0.3)
    # [[100, 900], [300, 700]] against expected [[200, 800], [200, 800]]: 50 + 12.5 + 50 + 12.5 = 125
    assert f.missing_p_value == pytest.approx(chi_square([100, 900], [300, 700])[1])
    assert chi_square([100, 900], [300, 700])[0] == pytest.approx(125.0)
    assert f.status == "drift" and report.decision == "drift"
    assert any(r.check == "missing_rate" and r.drifted for r in report.reasons)


def test_missing_columns_and_empty_batches_are_named() -> None:
    frame = pd.DataFrame({"x": [1.0, 2.0]})
    with pytest.raises(DataValidationError, match=r"recent batch: missing feature column\(s\) \['y'\]"):
        compare(frame.assign(y=1.0), frame, ["x", "y"], [], S)
    with pytest.raises(DataValidationError, match="recent batch: no rows"):
        compare(frame, frame.iloc[:0], ["x"], [], S)
    with pytest.raises(DataValidationError, match=r"recent column 'x': expected numbers.*'abc'"):
        compare(frame, pd.DataFrame({"x": ["abc", "1"]}), ["x"], [], S)


# --- the decision rule -----------------------------------------------------------------------------------


def test_a_trivial_shift_in_a_huge_sample_is_significant_but_not_drift() -> None:
    """Large-sample pedantry: KS finds a 0.02-sd shift in 200k rows, PSI says it does not matter."""
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"x": rng.normal(0, 1, 200_000)})
    cur = pd.DataFrame({"x": rng.normal(0.02, 1, 200_000)})
    report = compare(ref, cur, ["x"], [], S)
    (f,) = report.features
    assert f.p_value < report.alpha  # "significant"
    assert f.psi < S.psi_warn
    assert f.status == "ok" and report.decision == "no_drift"


def test_a_large_psi_from_a_tiny_sample_is_a_warning_not_drift() -> None:
    rng = np.random.default_rng(5)
    ref = pd.DataFrame({"x": rng.normal(0, 1, 10_000)})
    cur = pd.DataFrame({"x": rng.normal(0.6, 1, 12)})
    report = compare(ref, cur, ["x"], [], S)
    (f,) = report.features
    assert f.psi >= S.psi_alert and f.p_value >= report.alpha  # the premise: big PSI, not significant
    assert f.status == "warn" and report.decision == "no_drift"
    assert "not significant" in report.reasons[1].message


def test_bonferroni_level_and_min_drifted_features() -> None:
    rng = np.random.default_rng(1)
    ref = pd.DataFrame({"a": rng.normal(0, 1, 5000), "b": rng.normal(0, 1, 5000), "c": rng.normal(0, 1, 5000)})
    cur = pd.DataFrame({"a": rng.normal(1, 1, 5000), "b": rng.normal(0, 1, 5000), "c": rng.normal(0, 1, 5000)})
    one = compare(ref, cur, ["a", "b", "c"], [], S)
    assert one.tests == 6 and one.alpha == pytest.approx(S.p_value / 6)
    assert one.drifted_features == ["a"] and one.decision == "drift"
    two = compare(ref, cur, ["a", "b", "c"], [], MonitoringSettings(min_drifted_features=2))
    assert two.drifted_features == ["a"] and two.decision == "no_drift"
    assert two.reasons[0].message.startswith("no drift: 1 of 3 features drifted (need 2): a")


def test_score_shift_and_positive_rate_change_decide_on_their_own() -> None:
    rng = np.random.default_rng(2)
    ref_scores, cur_scores = rng.beta(2, 5, 20_000), rng.beta(3, 4, 5000)
    sd = score_drift(ref_scores, cur_scores, 0.5, S)
    assert sd.positive_rate_reference == pytest.approx((ref_scores >= 0.5).mean())
    assert sd.positive_rate_recent == pytest.approx((cur_scores >= 0.5).mean())
    report = decide([], sd, S)
    assert report.tests == 2 and report.decision == "drift"
    assert {r.check for r in report.reasons if r.drifted} >= {"score_psi", "positive_rate", "decision"}
    stable = decide([], score_drift(ref_scores, rng.beta(2, 5, 5000), 0.5, S), S)
    assert stable.decision == "no_drift" and stable.scores.status == "ok"


# --- measured on the sample data, in the production set-up ---------------------------------------------------
#
# The champion is trained on a stationary 100,000-row batch covering the 18 months up to a week ago (train split =
# the oldest 70% of its cleaned rows, valid the next 15%, as the transform cuts them); then a new 5,000-row batch
# lands over the last week, and the check runs as the monitoring pipeline runs it: collect_recent's extract over
# the last recent_days, check_drift against the champion's card. Default monitoring settings throughout.

RUNS, NEW_ROWS = 20, 5_000
END = datetime(2026, 6, 1, tzinfo=UTC)


def _split(directory: Path, frame: pd.DataFrame, spec: FeatureSpec) -> Path:
    for c in spec.numeric:
        frame[c] = frame[c].astype("float64")
    return write_split(directory, frame, spec, parts=1)


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path]:
    root = tmp_path_factory.mktemp("production")
    settings = load_settings(REPO / "ctloop.yaml", [
        f"local.workdir={root}", "model.type=logistic_regression", "model.params={}", "data.history_features=false",
        f"monitoring.window_end='{END.isoformat()}'"])
    spec = FeatureSpec("customer_id", "event_ts", "churned", NUMERIC, CATEGORICAL, history_enabled=False)
    base = generate_part(settings, 0, rows=100_000, seed=7, batch="base", start=END - timedelta(days=548),
                         end=END - timedelta(days=settings.monitoring.recent_days)).to_pandas()
    base = base[base["churned"].isin([0, 1]) & base["customer_id"].notna() & base["event_ts"].notna()]
    base = base.drop_duplicates(["customer_id", "event_ts"]).sort_values("event_ts")
    cuts = base["event_ts"].quantile([0.70, 0.85])
    train = _split(root / "train", base[base["event_ts"] < cuts[0.70]].copy(), spec)
    valid = _split(root / "valid", base[(base["event_ts"] >= cuts[0.70]) & (base["event_ts"] < cuts[0.85])].copy(),
                   spec)
    train_model(settings, train, valid, root / "champion", "run-champion",
                {"train_uri": str(train), "valid_uri": str(valid)})
    return settings, root / "champion"


def _check(settings: Settings, champion: Path, root: Path, drift: float, seed: int, concept_drift: float = 0.0,
           policy: str = "on_drift"):
    """A new batch lands over the last week; the monitoring steps collect it and check it."""
    workdir = root / f"drift{drift}-concept{concept_drift}-seed{seed}-{policy}"
    s = settings.with_overrides({"local.workdir": str(workdir), "monitoring.retrain_policy": policy})
    recent_days = timedelta(days=s.monitoring.recent_days)
    write_sample_data(s.local.landing_dir, s, rows=NEW_ROWS, seed=100 + seed, drift=drift, batch="new",
                      start=END - recent_days, end=END, concept_drift=concept_drift)
    out = workdir / "recent"
    gather_recent(s, run_id=f"mon-{seed}", output_path=str(out), output_uri=str(out))
    return run_drift_check(s, out, str(champion))


def _monitor(settings: Settings, champion: Path, root: Path, drift: float, seed: int):
    return _check(settings, champion, root, drift, seed).report


def test_false_alarms_on_stationary_data_in_the_production_set_up(production, tmp_path: Path) -> None:
    settings, champion = production
    alarms = []
    for seed in range(RUNS):
        report = _monitor(settings, champion, tmp_path, 0.0, seed)
        if report.decision == "drift":
            alarms.append((seed, report.reasons[0].message))
    print(f"\nstationary: drift in {len(alarms)}/{RUNS} runs {alarms}")
    assert len(alarms) <= 1, alarms


def test_a_drift_03_batch_is_detected_in_the_production_set_up(production, tmp_path: Path) -> None:
    settings, champion = production
    detected, found = 0, {}
    for seed in range(RUNS):
        report = _monitor(settings, champion, tmp_path, 0.3, seed)
        detected += report.decision == "drift"
        for r in report.reasons[1:]:
            if r.drifted:
                found[r.subject] = found.get(r.subject, 0) + 1
        assert any("one row per customer_id" in n for n in report.notes)
    print(f"\ndrift=0.3: detected in {detected}/{RUNS} runs; drifted subjects {found}")
    assert detected >= 18


def test_concept_drift_is_caught_by_on_decay_and_not_by_on_drift(production, tmp_path: Path) -> None:
    """Same inputs, a new label relation: the features cannot see it, the champion's AUC on the labels can."""
    settings, champion = production
    for seed in range(3):
        concept = _check(settings, champion, tmp_path, 0.0, seed, concept_drift=1.0, policy="on_decay")
        d = concept.decay
        print(f"\nconcept drift seed {seed}: AUC {d.reference_roc_auc:.3f} -> {d.recent_roc_auc:.3f}, lower bound "
              f"{d.lower:+.3f}; feature/score decision {concept.report.decision}")
        assert d.decayed and concept.decision == "drift"
        assert concept.report.decision == "no_drift"  # no feature or score moved: on_drift alone would not retrain
        assert [r.check for r in concept.report.reasons if r.drifted] == ["performance_decay"]
        stable = _check(settings, champion, tmp_path, 0.0, seed, policy="on_drift_or_decay")
        assert stable.decay is not None and not stable.decay.decayed and stable.decision == "no_drift"
    on_drift = _check(settings, champion, tmp_path, 0.0, 0, concept_drift=1.0, policy="on_drift")
    assert on_drift.decay.decayed and on_drift.decision == "no_drift"
