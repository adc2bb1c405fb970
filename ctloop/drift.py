"""Drift between a reference (the champion's training data) and a recent batch, and the retrain decision.

Per feature:
- numeric: PSI over quantile bins of the reference's non-missing values, and the two-sample KS test;
- categorical: PSI over the reference's categories plus an ``__other__`` bucket (categories the reference does
  not have, or has too rarely to keep) and a ``__missing__`` bucket, and the chi-square test of the two count
  vectors;
- both: the change in missing rate, with the chi-square test of the 2x2 missing/present table.
Scores: PSI between the champion's scores on the reference and on the recent batch (bins from the reference
scores), the KS test, and the change in predicted positive rate at the champion's threshold.

PSI = sum over bins of (recent - reference) * ln(recent / reference), with fractions below ``epsilon`` raised to
``epsilon`` so empty bins stay finite.

Independence: the tests assume independent rows, and rows of one entity are not (they share its attributes), so
the check keeps one row per entity on each side (``one_per_entity``) before comparing.

Multiple testing: with ~16 features and tens of thousands of rows, a test on every feature almost always finds
some feature "significant" however trivial its shift. So a feature counts as drifted only when its PSI (the size
of the shift) reaches ``psi_alert`` AND its test is significant at the Bonferroni level ``p_value / m``, where m
is the number of tests run in the comparison. Significance controls the false alarms (the family-wise level
``p_value`` bounds them); the size keeps large samples from flagging shifts too small to matter. The false-alarm
and detection rates this gives are measured in tests/test_drift.py and reported in docs/monitoring.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from ctloop.config import MonitoringSettings
from ctloop.errors import DataValidationError

OTHER = "__other__"
MISSING = "__missing__"
DRIFT = "drift"
NO_DRIFT = "no_drift"

Status = Literal["drift", "warn", "ok"]


# ------------------------------------------------------------------------------------------- the statistics
def psi(reference: np.ndarray | list[float], recent: np.ndarray | list[float], epsilon: float) -> float:
    """Population stability index of two vectors of bin fractions (each summing to 1)."""
    ref = np.maximum(np.asarray(reference, dtype=np.float64), epsilon)
    cur = np.maximum(np.asarray(recent, dtype=np.float64), epsilon)
    if ref.shape != cur.shape:
        raise ValueError(f"psi: bin counts differ ({ref.shape} vs {cur.shape})")
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """The distinct interior quantile cut points of ``reference`` for ``bins`` equal-frequency bins.

    Cut points are observed values (the inverse of the empirical CDF), so a discrete feature is cut between its
    values, and ties collapse cut points: a count feature with many zeros gets fewer, wider bins.
    """
    values = np.asarray(reference, dtype=np.float64)
    if values.size == 0:
        return np.empty(0)
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="inverted_cdf"))


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin: (-inf, e0), [e0, e1), ..., [e_last, inf)."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=edges.size + 1).astype(np.int64)


def bin_labels(edges: np.ndarray) -> list[str]:
    if edges.size == 0:
        return ["all"]
    labels = [f"< {edges[0]:.4g}"]
    labels += [f"[{lo:.4g}, {hi:.4g})" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return labels + [f">= {edges[-1]:.4g}"]


def ks_test(reference: np.ndarray, recent: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value; (nan, nan) when a side is empty."""
    if len(reference) == 0 or len(recent) == 0:
        return math.nan, math.nan
    result = stats.ks_2samp(reference, recent)
    return float(result.statistic), float(result.pvalue)


def chi_square(reference_counts: np.ndarray | list[int], recent_counts: np.ndarray | list[int]) -> tuple[float, float]:
    """Pearson's chi-square test (no continuity correction) of a 2 x k table; buckets empty on both sides are
    dropped, and fewer than two buckets left means there is nothing to compare: (0.0, 1.0)."""
    table = np.array([reference_counts, recent_counts], dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    statistic, p_value, _, _ = stats.chi2_contingency(table, correction=False)
    return float(statistic), float(p_value)


def _fractions(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else np.zeros_like(counts, dtype=np.float64)


# --------------------------------------------------------------------------------------------- per feature
@dataclass(frozen=True)
class Histogram:
    """Bucket labels and the reference / recent fractions in each (unsmoothed), for reports and plots."""

    labels: list[str]
    reference: list[float]
    recent: list[float]


@dataclass(frozen=True)
class FeatureDrift:
    """One feature compared: the shift (PSI), its test, the missing rates; ``status`` is set by ``decide``."""

    name: str
    kind: Literal["numeric", "categorical"]
    psi: float  # nan when either side has no values
    test: Literal["ks", "chi2"]
    statistic: float
    p_value: float
    missing_reference: float
    missing_recent: float
    missing_p_value: float
    rows_reference: int
    rows_recent: int
    histogram: Histogram
    status: Status = "ok"
    reasons: list[str] = field(default_factory=list)


def _as_numeric(series: pd.Series, name: str, side: str) -> np.ndarray:
    try:
        return pd.to_numeric(series, errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        sample = series.dropna().astype(str).head(3).tolist()
        raise DataValidationError(f"{side} column {name!r}: expected numbers, found values such as {sample} "
                                  f"({exc})") from exc


def _as_category(series: pd.Series) -> pd.Series:
    """Strings with None for missing, the way the model sees categories (bool True and "True" agree)."""
    missing = series.isna().to_numpy()
    text = series.astype(object).to_numpy().astype(str).astype(object)
    text[missing] = None
    return pd.Series(text, index=series.index, dtype=object)


def numeric_drift(name: str, reference: pd.Series, recent: pd.Series, settings: MonitoringSettings) -> FeatureDrift:
    """PSI over the reference's quantile bins and the KS test, on the non-missing values of each side."""
    ref = _as_numeric(reference, name, "reference")
    cur = _as_numeric(recent, name, "recent")
    ref_ok, cur_ok = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    edges = quantile_edges(ref_ok, settings.bins)
    ref_counts, cur_counts = bin_counts(ref_ok, edges), bin_counts(cur_ok, edges)
    ref_frac, cur_frac = _fractions(ref_counts), _fractions(cur_counts)
    value = psi(ref_frac, cur_frac, settings.epsilon) if ref_ok.size and cur_ok.size else math.nan
    statistic, p_value = ks_test(ref_ok, cur_ok)
    return FeatureDrift(
        name=name, kind="numeric", psi=value, test="ks", statistic=statistic, p_value=p_value,
        **_missing(ref.size - ref_ok.size, ref.size, cur.size - cur_ok.size, cur.size),
        histogram=Histogram(bin_labels(edges), ref_frac.tolist(), cur_frac.tolist()),
    )


def category_buckets(reference: pd.Series, max_categories: int) -> list[str]:
    """The reference's categories kept as buckets: the most frequent ``max_categories`` (ties by name)."""
    counts = reference.dropna().value_counts()
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [str(k) for k, _ in ordered[:max_categories]]


def categorical_counts(values: pd.Series, buckets: list[str]) -> np.ndarray:
    """Counts per bucket: each kept category, then ``__other__``, then ``__missing__``."""
    codes = pd.Index(buckets, dtype=object).get_indexer(values.to_numpy(dtype=object)).astype(np.int64)
    codes[codes < 0] = len(buckets)  # not a kept category: other...
    codes[values.isna().to_numpy()] = len(buckets) + 1  # ...unless missing
    return np.bincount(codes, minlength=len(buckets) + 2).astype(np.int64)


def categorical_drift(name: str, reference: pd.Series, recent: pd.Series,
                      settings: MonitoringSettings) -> FeatureDrift:
    """PSI over the reference's categories + other + missing, and the chi-square test of the counts."""
    ref, cur = _as_category(reference), _as_category(recent)
    buckets = category_buckets(ref, settings.max_categories)
    ref_counts, cur_counts = categorical_counts(ref, buckets), categorical_counts(cur, buckets)
    ref_frac, cur_frac = _fractions(ref_counts), _fractions(cur_counts)
    value = psi(ref_frac, cur_frac, settings.epsilon) if len(ref) and len(cur) else math.nan
    statistic, p_value = chi_square(ref_counts, cur_counts)
    ref_missing, cur_missing = int(ref_counts[-1]), int(cur_counts[-1])
    return FeatureDrift(
        name=name, kind="categorical", psi=value, test="chi2", statistic=statistic, p_value=p_value,
        **_missing(ref_missing, len(ref), cur_missing, len(cur)),
        histogram=Histogram([*buckets, OTHER, MISSING], ref_frac.tolist(), cur_frac.tolist()),
    )


def _missing(ref_missing: int, ref_rows: int, cur_missing: int, cur_rows: int) -> dict[str, Any]:
    _, p_value = chi_square([ref_missing, ref_rows - ref_missing], [cur_missing, cur_rows - cur_missing])
    return {
        "missing_reference": ref_missing / ref_rows if ref_rows else math.nan,
        "missing_recent": cur_missing / cur_rows if cur_rows else math.nan,
        "missing_p_value": p_value,
        "rows_reference": ref_rows,
        "rows_recent": cur_rows,
    }


# ------------------------------------------------------------------------------------------------- scores
@dataclass(frozen=True)
class ScoreDrift:
    """The champion's scores compared: PSI + KS, and the predicted positive rate at its threshold."""

    psi: float
    ks_statistic: float
    p_value: float
    threshold: float
    positive_rate_reference: float
    positive_rate_recent: float
    positive_rate_p_value: float
    rows_reference: int
    rows_recent: int
    histogram: Histogram
    status: Status = "ok"
    reasons: list[str] = field(default_factory=list)


def score_drift(reference: np.ndarray, recent: np.ndarray, threshold: float,
                settings: MonitoringSettings) -> ScoreDrift:
    """The champion's score distribution on the reference vs the recent batch, and its positive rate."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(recent, dtype=np.float64)
    for side, scores in (("reference", ref), ("recent", cur)):
        if scores.size == 0 or not np.isfinite(scores).all():
            raise DataValidationError(f"champion scores on the {side} batch: expected finite probabilities, "
                                      f"found {scores.size} values ({int((~np.isfinite(scores)).sum())} not finite)")
    edges = quantile_edges(ref, settings.bins)
    ref_frac, cur_frac = _fractions(bin_counts(ref, edges)), _fractions(bin_counts(cur, edges))
    statistic, p_value = ks_test(ref, cur)
    ref_pos, cur_pos = int((ref >= threshold).sum()), int((cur >= threshold).sum())
    _, pos_p = chi_square([ref_pos, ref.size - ref_pos], [cur_pos, cur.size - cur_pos])
    return ScoreDrift(
        psi=psi(ref_frac, cur_frac, settings.epsilon), ks_statistic=statistic, p_value=p_value,
        threshold=threshold, positive_rate_reference=ref_pos / ref.size, positive_rate_recent=cur_pos / cur.size,
        positive_rate_p_value=pos_p, rows_reference=int(ref.size), rows_recent=int(cur.size),
        histogram=Histogram(bin_labels(edges), ref_frac.tolist(), cur_frac.tolist()),
    )


# ------------------------------------------------------------------------------------------------ decision
@dataclass(frozen=True)
class Reason:
    """One finding, with its numbers: a drifted or warned feature, a score shift, or the summary."""

    check: str  # feature_psi | missing_rate | score_psi | positive_rate | decision | ...
    subject: str  # the feature, "scores" or "batch"
    value: float
    threshold: float
    p_value: float | None
    alpha: float | None
    drifted: bool
    message: str


@dataclass(frozen=True)
class DriftReport:
    """Everything compared, the findings (``reasons[0]`` is the decision's summary) and the decision."""

    decision: Literal["drift", "no_drift"]
    features: list[FeatureDrift]
    scores: ScoreDrift | None
    reasons: list[Reason]
    alpha: float  # the per-test (Bonferroni) significance level
    tests: int
    rows_reference: int
    rows_recent: int
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why

    @property
    def drifted_features(self) -> list[str]:
        return [f.name for f in self.features if f.status == DRIFT]

    def reasons_json(self) -> str:
        return json.dumps([_finite(asdict(r)) for r in self.reasons], sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


def _finite(obj: Any) -> Any:
    """JSON has no NaN: missing numbers become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt_p(p: float) -> str:
    return "n/a" if p is None or math.isnan(p) else f"{p:.2g}"


def _judge_feature(f: FeatureDrift, s: MonitoringSettings, alpha: float) -> tuple[FeatureDrift, list[Reason]]:
    reasons: list[Reason] = []
    status: Status = "ok"
    significant = not math.isnan(f.p_value) and f.p_value < alpha
    if not math.isnan(f.psi) and f.psi >= s.psi_warn:
        drifted = f.psi >= s.psi_alert and significant
        status = DRIFT if drifted else "warn"
        verdict = ("drift" if drifted else
                   "warning" + ("" if significant else f" (not significant at {alpha:.2g})"))
        reasons.append(Reason(
            check="feature_psi", subject=f.name, value=f.psi, threshold=s.psi_alert, p_value=f.p_value,
            alpha=alpha, drifted=drifted,
            message=f"{f.name}: PSI {f.psi:.3f} (warn {s.psi_warn}, alert {s.psi_alert}), {f.test.upper()} "
                    f"p={_fmt_p(f.p_value)} vs alpha {alpha:.2g}: {verdict}"))
    change = abs(f.missing_recent - f.missing_reference) if f.rows_recent and f.rows_reference else 0.0
    if change > s.max_missing_rate_change:
        drifted = f.missing_p_value < alpha
        status = DRIFT if drifted or status == DRIFT else "warn"
        reasons.append(Reason(
            check="missing_rate", subject=f.name, value=change, threshold=s.max_missing_rate_change,
            p_value=f.missing_p_value, alpha=alpha, drifted=drifted,
            message=f"{f.name}: missing rate {f.missing_reference:.3f} -> {f.missing_recent:.3f} (change "
                    f"{change:.3f} > {s.max_missing_rate_change}), chi2 p={_fmt_p(f.missing_p_value)} vs alpha "
                    f"{alpha:.2g}: {'drift' if drifted else 'warning (not significant)'}"))
    return replace(f, status=status, reasons=[r.message for r in reasons]), reasons


def _judge_scores(sc: ScoreDrift, s: MonitoringSettings, alpha: float) -> tuple[ScoreDrift, list[Reason]]:
    reasons: list[Reason] = []
    shifted = sc.psi >= s.score_psi_alert and sc.p_value < alpha
    if sc.psi >= s.psi_warn:
        reasons.append(Reason(
            check="score_psi", subject="scores", value=sc.psi, threshold=s.score_psi_alert, p_value=sc.p_value,
            alpha=alpha, drifted=shifted,
            message=f"champion scores: PSI {sc.psi:.3f} (alert {s.score_psi_alert}), KS p={_fmt_p(sc.p_value)} vs "
                    f"alpha {alpha:.2g}: {'drift' if shifted else 'warning'}"))
    change = abs(sc.positive_rate_recent - sc.positive_rate_reference)
    moved = change > s.max_positive_rate_change and sc.positive_rate_p_value < alpha
    if change > s.max_positive_rate_change:
        reasons.append(Reason(
            check="positive_rate", subject="scores", value=change, threshold=s.max_positive_rate_change,
            p_value=sc.positive_rate_p_value, alpha=alpha, drifted=moved,
            message=f"predicted positive rate at threshold {sc.threshold}: {sc.positive_rate_reference:.3f} -> "
                    f"{sc.positive_rate_recent:.3f} (change {change:.3f} > {s.max_positive_rate_change}), chi2 "
                    f"p={_fmt_p(sc.positive_rate_p_value)}: {'drift' if moved else 'warning (not significant)'}"))
    status: Status = DRIFT if shifted or moved else ("warn" if reasons else "ok")
    return replace(sc, status=status, reasons=[r.message for r in reasons]), reasons


def decide(features: list[FeatureDrift], scores: ScoreDrift | None, settings: MonitoringSettings,
           notes: list[str] | None = None) -> DriftReport:
    """Judge every feature and the scores at the Bonferroni level, then decide drift / no_drift.

    Drift when at least ``min_drifted_features`` features drifted, or the scores did. The tests counted for
    the correction: one distribution and one missing-rate test per feature, plus two for the scores.
    """
    tests = 2 * len(features) + (2 if scores is not None else 0)
    alpha = settings.p_value / max(tests, 1)
    judged: list[FeatureDrift] = []
    reasons: list[Reason] = []
    for f in features:
        jf, rs = _judge_feature(f, settings, alpha)
        judged.append(jf)
        reasons.extend(rs)
    judged_scores = None
    if scores is not None:
        judged_scores, rs = _judge_scores(scores, settings, alpha)
        reasons.extend(rs)
    drifted = [f.name for f in judged if f.status == DRIFT]
    score_shift = judged_scores is not None and judged_scores.status == DRIFT
    is_drift = len(drifted) >= settings.min_drifted_features or score_shift
    parts = [f"{len(drifted)} of {len(judged)} features drifted (need {settings.min_drifted_features})"
             + (f": {', '.join(drifted)}" if drifted else "")]
    if judged_scores is not None:
        parts.append("the champion's scores shifted" if score_shift else "the champion's scores are stable")
    top = max((f for f in judged if not math.isnan(f.psi)), key=lambda f: f.psi, default=None)
    if top is not None:
        parts.append(f"largest feature PSI {top.psi:.3f} ({top.name})")
    summary = Reason(check="decision", subject="batch", value=float(len(drifted)),
                     threshold=float(settings.min_drifted_features), p_value=None, alpha=alpha, drifted=is_drift,
                     message=f"{'DRIFT' if is_drift else 'no drift'}: " + "; ".join(parts))
    rows_ref = max((f.rows_reference for f in judged), default=0)
    rows_cur = max((f.rows_recent for f in judged), default=0)
    return DriftReport(decision=DRIFT if is_drift else NO_DRIFT, features=judged, scores=judged_scores,
                       reasons=[summary, *reasons], alpha=alpha, tests=tests, rows_reference=rows_ref,
                       rows_recent=rows_cur, notes=list(notes or []))


# ---------------------------------------------------------------------------------------------- the whole
def one_per_entity(frame: pd.DataFrame, id_column: str, seed: int = 0) -> pd.DataFrame:
    """One row per entity, drawn at random (seeded): the rows the tests may treat as independent.

    An entity's rows share its attributes, so n rows of n / k entities carry about n / k rows' worth of evidence
    about the attributes' distribution; tests that count every row see shifts in pure noise.
    """
    if id_column not in frame.columns:
        raise DataValidationError(f"one row per entity: no id column {id_column!r}; found {list(frame.columns)}")
    # Sorted first: the draw depends on the rows, not on the order a multi-threaded reader returned them in.
    ordered = frame.sort_values(list(frame.columns), kind="mergesort", na_position="last").reset_index(drop=True)
    shuffled = ordered.sample(frac=1.0, random_state=seed)
    return shuffled.drop_duplicates(subset=[id_column]).sort_index().reset_index(drop=True)


def sample_rows(frame: pd.DataFrame, max_rows: int, seed: int = 0) -> pd.DataFrame:
    """At most ``max_rows`` rows, drawn without replacement; the same frame always gives the same sample."""
    if len(frame) <= max_rows:
        return frame
    keep = np.sort(np.random.default_rng(seed).choice(len(frame), size=max_rows, replace=False))
    return frame.iloc[keep].reset_index(drop=True)


def compare(
    reference: pd.DataFrame,
    recent: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    settings: MonitoringSettings,
    *,
    reference_scores: np.ndarray | None = None,
    recent_scores: np.ndarray | None = None,
    threshold: float = 0.5,
    notes: list[str] | None = None,
) -> DriftReport:
    """Every feature of ``numeric`` and ``categorical`` (both frames must have them), plus the scores when both
    score arrays are given; then the decision. Raises DataValidationError naming a missing column."""
    for side, frame in (("reference", reference), ("recent", recent)):
        missing = [c for c in numeric + categorical if c not in frame.columns]
        if missing:
            raise DataValidationError(f"{side} batch: missing feature column(s) {missing}; found "
                                      f"{list(frame.columns)}")
        if frame.empty:
            raise DataValidationError(f"{side} batch: no rows to compare")
    features = [numeric_drift(c, reference[c], recent[c], settings) for c in numeric]
    features += [categorical_drift(c, reference[c], recent[c], settings) for c in categorical]
    scores = None
    if reference_scores is not None and recent_scores is not None:
        scores = score_drift(reference_scores, recent_scores, threshold, settings)
    return decide(features, scores, settings, notes)
