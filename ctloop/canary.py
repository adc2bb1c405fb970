"""The canary analysis: judge the canary against the champion on one window of the prediction log, then promote
it one step, roll it back or hold it. Written once over ``ctloop.registry.base.Registry``.

The canary is the version holding the ``canary`` alias while it is deployed on the production endpoint beside
the champion (``ctloop.rollout`` puts it there). Both sides are read from the same window of the production
endpoint's prediction log, split by ``__deployed_model_id``; each check is a one-sided test at level
``canary.p_value`` that must also exceed a size limit (docs/monitoring.md, "Canary analysis"):

- errors: share of failed requests, Fisher's exact test; worse  -> rollback
- latency: Mann-Whitney U on the request latencies, and the median ratio -> rollback
- latency_p99: share of requests slower than the pooled p99, Fisher's exact test, and the p99 ratio -> rollback
- scores: two-sample Kolmogorov-Smirnov on the probabilities (in shadow: on the same requests only) -> hold
- labels: where labels have arrived, the DeLong bound of the ROC AUC drop (``ctloop.decay``) -> hold

Fewer than ``canary.min_requests`` logged requests on either side: hold. Otherwise a canary that passes moves to
the next share of ``canary.steps``; reaching 100 moves ``champion`` compare-and-set, as ``ctloop.rollout`` does.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ctloop.config import CanarySettings, Settings
from ctloop.decay import performance_decay
from ctloop.drift import ks_test
from ctloop.errors import DataValidationError
from ctloop.prediction_log import (
    DEPLOYED_MODEL_ID,
    ERROR,
    LATENCY_MS,
    LOGGED_AT,
    PROBABILITY,
    REQUEST_ID,
    local_path,
    log_root,
    read_prediction_log,
)
from ctloop.registry.base import (
    CANARY_ALIAS,
    CHAMPION_ALIAS,
    AliasMoved,
    Deployed,
    Registry,
    find_deployed,
    split_of,
)
from ctloop.rollout import ChampionMoved, promote, retire

PROMOTE, ROLLBACK, HOLD, NO_CANARY = "promote", "rollback", "hold", "no_canary"
STEPS_DIR = "canary_steps"  # <log root>/canary_steps/<deployed id>-<share>.json: when the analysis moved it
LABELS_DIR = "labels"  # <log root>/labels/: files of (__request_id, label) for logged requests whose label arrived
LABEL_COLUMN = "label"
ROLLBACK_CHECKS = ("errors", "latency", "latency_p99")  # the others hold
_MIN_LABELLED = 50  # per side, with both classes present


@dataclass(frozen=True)
class Check:
    """One comparison of canary against champion."""

    name: str  # errors | latency | latency_p99 | scores | labels
    test: str
    champion: float  # the measure on the champion's side (error rate, median or p99 ms, mean score, AUC)
    canary: float
    size: float  # what the limit applies to: rate difference, latency ratio, KS distance, AUC drop (bound)
    limit: float
    p_value: float
    failed: bool


@dataclass(frozen=True)
class Verdict:
    decision: str  # promote | rollback | hold
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)
    champion_requests: int = 0
    canary_requests: int = 0
    matched: str = ""  # shadow: the same requests on both sides; split: one random split of the same window


@dataclass(frozen=True)
class CanaryOutcome:
    decision: str  # promote | rollback | hold | no_canary
    champion: str | None
    canary: str | None
    split_before: dict[str, int]
    split_after: dict[str, int]
    became_champion: bool = False
    verdict: Verdict | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the judgement -------------------------------------------------------------------------------------------


def requests_of(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per logged request (error, latency); rows of a log without request ids count one each."""
    if rows.empty:
        return pd.DataFrame({ERROR: pd.Series(dtype="float64"), LATENCY_MS: pd.Series(dtype="float64")})
    rows = rows.assign(**{c: rows.get(c, np.nan) for c in (REQUEST_ID, LATENCY_MS, ERROR)})
    ids = rows[REQUEST_ID].fillna("").astype(str)
    key = ids.where(ids != "", pd.Series(range(len(rows)), index=rows.index).astype(str).radd("#"))
    grouped = rows.assign(_key=key).groupby("_key", sort=False)
    return pd.DataFrame({ERROR: grouped[ERROR].max().fillna(0).astype(float),
                         LATENCY_MS: grouped[LATENCY_MS].first().astype(float)})


def error_check(champion: pd.DataFrame, canary: pd.DataFrame, s: CanarySettings) -> Check:
    e0, n0 = int(champion[ERROR].sum()), len(champion)
    e1, n1 = int(canary[ERROR].sum()), len(canary)
    p = float(stats.fisher_exact([[e1, n1 - e1], [e0, n0 - e0]], alternative="greater").pvalue)
    r0, r1 = e0 / n0, e1 / n1
    return Check("errors", "Fisher exact, one-sided (canary more failed requests)", r0, r1, r1 - r0,
                 s.max_error_rate_increase, p, p < s.p_value and r1 - r0 > s.max_error_rate_increase)


def _latencies(champion: pd.DataFrame, canary: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return (champion[LATENCY_MS].dropna().to_numpy(float), canary[LATENCY_MS].dropna().to_numpy(float))


def _ratio(canary: float, champion: float) -> float:
    return canary / champion if champion > 0 else math.inf


def latency_check(champion: pd.DataFrame, canary: pd.DataFrame, s: CanarySettings) -> Check:
    """The canary is slower on most requests: Mann-Whitney U and the ratio of the medians.

    A stall of the whole serving machine (a busy host, a pause) slows the requests in flight on both sides alike;
    it moves the medians little, while it can lift the p99 of either side to the stall's length."""
    lat0, lat1 = _latencies(champion, canary)
    if len(lat0) == 0 or len(lat1) == 0:
        return Check("latency", "not measured (no latencies logged)", math.nan, math.nan, math.nan,
                     s.max_latency_median_ratio, math.nan, False)
    p = float(stats.mannwhitneyu(lat1, lat0, alternative="greater").pvalue)
    median0, median1 = float(np.median(lat0)), float(np.median(lat1))
    ratio = _ratio(median1, median0)
    return Check("latency", "Mann-Whitney U, one-sided (canary slower); and the median ratio", median0, median1,
                 ratio, s.max_latency_median_ratio, p, p < s.p_value and ratio > s.max_latency_median_ratio)


def latency_tail_check(champion: pd.DataFrame, canary: pd.DataFrame, s: CanarySettings) -> Check:
    """The canary is slower on its slowest requests: its share above the pooled p99, and the ratio of the p99s."""
    lat0, lat1 = _latencies(champion, canary)
    if len(lat0) == 0 or len(lat1) == 0:
        return Check("latency_p99", "not measured (no latencies logged)", math.nan, math.nan, math.nan,
                     s.max_latency_p99_ratio, math.nan, False)
    cut = float(np.quantile(np.concatenate([lat0, lat1]), 0.99))
    k0, k1 = int((lat0 > cut).sum()), int((lat1 > cut).sum())
    p = float(stats.fisher_exact([[k1, len(lat1) - k1], [k0, len(lat0) - k0]], alternative="greater").pvalue)
    p99_0, p99_1 = float(np.quantile(lat0, 0.99)), float(np.quantile(lat1, 0.99))
    ratio = _ratio(p99_1, p99_0)
    return Check("latency_p99", "share above the pooled p99, Fisher exact, one-sided; and the p99 ratio", p99_0,
                 p99_1, ratio, s.max_latency_p99_ratio, p, p < s.p_value and ratio > s.max_latency_p99_ratio)


def score_check(champion: pd.DataFrame, canary: pd.DataFrame, s: CanarySettings) -> Check:
    p0 = champion[PROBABILITY].dropna().to_numpy(float)
    p1 = canary[PROBABILITY].dropna().to_numpy(float)
    d, p = ks_test(p0, p1)
    failed = bool(not math.isnan(p) and p < s.p_value and d > s.max_score_ks)
    return Check("scores", "two-sample Kolmogorov-Smirnov", float(np.mean(p0)) if len(p0) else math.nan,
                 float(np.mean(p1)) if len(p1) else math.nan, d, s.max_score_ks, p, failed)


def label_check(champion: pd.DataFrame, canary: pd.DataFrame, s: CanarySettings, threshold: float) -> Check | None:
    """The AUC drop from champion to canary on their labelled rows; None when too few labels have arrived."""
    sides = [side.dropna(subset=[LABEL_COLUMN, PROBABILITY]) for side in (champion, canary)]
    if any(len(side) < _MIN_LABELLED or side[LABEL_COLUMN].nunique() < 2 for side in sides):
        return None
    decay = performance_decay(sides[0][LABEL_COLUMN].astype(int), sides[0][PROBABILITY],
                              sides[1][LABEL_COLUMN].astype(int), sides[1][PROBABILITY],
                              threshold=threshold, alpha=s.p_value, min_drop=s.min_auc_drop)
    p = float(stats.norm.sf(decay.drop / decay.standard_error)) if decay.standard_error > 0 else math.nan
    return Check("labels", "ROC AUC drop, DeLong, one-sided lower bound", decay.reference_roc_auc,
                 decay.recent_roc_auc, decay.lower, s.min_auc_drop, p, decay.decayed)


def judge(log: pd.DataFrame, champion_id: str, canary_id: str, s: CanarySettings, shadow: bool = False,
          threshold: float = 0.5) -> Verdict:
    """The decision on one window of the prediction log (``log``: rows of both deployed models, labels joined
    as ``label`` where they arrived)."""
    ids = log[DEPLOYED_MODEL_ID].astype(str) if not log.empty else pd.Series(dtype=str)
    rows0, rows1 = log[ids == champion_id], log[ids == canary_id]
    if LOGGED_AT in log and not rows1.empty:
        # Before the canary's first logged request the champion served alone, at another time and load.
        first = pd.to_datetime(rows1[LOGGED_AT], utc=True).min()
        rows0 = rows0[pd.to_datetime(rows0[LOGGED_AT], utc=True) >= first]
    matched = "split"
    if shadow and REQUEST_ID in log:
        # The shadow answered copies of requests the champion answered: compare on exactly those.
        both = set(rows0[REQUEST_ID].dropna()) & set(rows1[REQUEST_ID].dropna())
        rows0, rows1 = rows0[rows0[REQUEST_ID].isin(both)], rows1[rows1[REQUEST_ID].isin(both)]
        matched = "shadow"
    req0, req1 = requests_of(rows0), requests_of(rows1)
    if min(len(req0), len(req1)) < s.min_requests:
        return Verdict(HOLD, [f"waiting for data: {len(req0)} champion and {len(req1)} canary requests logged, "
                              f"{s.min_requests} needed on each side (canary.min_requests)"], [],
                       len(req0), len(req1), matched)
    checks = [error_check(req0, req1, s), latency_check(req0, req1, s), latency_tail_check(req0, req1, s),
              score_check(rows0, rows1, s)]
    if LABEL_COLUMN in log and (labels := label_check(rows0, rows1, s, threshold)) is not None:
        checks.append(labels)
    failed = [c for c in checks if c.failed]
    reasons = [f"{c.name}: champion {c.champion:.4g}, canary {c.canary:.4g}; {c.test}: size {c.size:.4g} "
               f"(limit {c.limit:g}), p = {c.p_value:.2g} (level {s.p_value:g})" for c in failed]
    if any(c.name in ROLLBACK_CHECKS for c in failed):
        decision = ROLLBACK
    elif failed:
        decision = HOLD
    else:
        decision, reasons = PROMOTE, ["no check failed"]
    return Verdict(decision, reasons, checks, len(req0), len(req1), matched)


# -- reading the window --------------------------------------------------------------------------------------


def read_window(settings: Settings, now: datetime | None = None, since: datetime | None = None) -> pd.DataFrame:
    """The production endpoint's prediction log over the last ``canary.window_hours`` (from ``since`` if later),
    with the labels that have arrived joined on the request id (single-instance requests)."""
    end = (now or datetime.now(UTC)).astimezone(UTC)
    start = end - timedelta(hours=settings.canary.window_hours)
    if since is not None:
        start = max(start, since.astimezone(UTC))
    root = log_root(settings, settings.deploy.production_endpoint)
    log = read_prediction_log(root, start, end)
    labels = read_labels(root)
    if labels is None or log.empty or REQUEST_ID not in log:
        return log
    # A label belongs to one instance: only requests of one instance (on each side) get theirs.
    per_side = log.groupby([REQUEST_ID, DEPLOYED_MODEL_ID])[REQUEST_ID].transform("size")
    joined = log.merge(labels, on=REQUEST_ID, how="left")
    joined.loc[(per_side != 1).to_numpy(), LABEL_COLUMN] = np.nan
    return joined


def read_labels(root: str) -> pd.DataFrame | None:
    folder = local_path(root) / LABELS_DIR
    files = sorted(p for p in folder.glob("*") if p.suffix in (".parquet", ".jsonl")) if folder.is_dir() else []
    if not files:
        return None
    frames = [pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_json(p, lines=True, dtype=False)
              for p in files]
    labels = pd.concat(frames, ignore_index=True)
    missing = {REQUEST_ID, LABEL_COLUMN} - set(labels.columns)
    if missing:
        raise DataValidationError(f"labels in {folder}: expected columns {REQUEST_ID!r} and {LABEL_COLUMN!r}, "
                                  f"found {list(labels.columns)}")
    return labels[[REQUEST_ID, LABEL_COLUMN]].drop_duplicates(REQUEST_ID, keep="last")


def _steps_dir(settings: Settings) -> Path:
    return local_path(log_root(settings, settings.deploy.production_endpoint)) / STEPS_DIR


def _step_file(settings: Settings, canary: Deployed, share: int) -> Path:
    return _steps_dir(settings) / f"{canary.id}-{share}.json"


def step_started(settings: Settings, canary: Deployed) -> datetime | None:
    """When the canary analysis moved ``canary`` to its current share (None: the deploy step put it there)."""
    path = _step_file(settings, canary, canary.traffic)
    if not path.is_file():
        return None
    try:
        return datetime.fromisoformat(json.loads(path.read_text())["since"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataValidationError(f"canary step record {path}: expected {{\"since\": <ISO time>}}, found "
                                  f"{path.read_text()[:200]!r} ({exc})") from exc


def record_step(settings: Settings, canary: Deployed, share: int, at: datetime) -> None:
    """Note that ``canary`` gets ``share`` from ``at`` on: the next judgement reads the log from then."""
    path = _step_file(settings, canary, share)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"since": at.astimezone(UTC).isoformat()}))


def clear_steps(settings: Settings, canary: Deployed) -> None:
    """Forget ``canary``'s steps once it is rolled back or champion (a later deployment starts afresh)."""
    for path in _steps_dir(settings).glob(f"{canary.id}-*.json"):
        path.unlink(missing_ok=True)


# -- acting on it --------------------------------------------------------------------------------------------


def find_canary(registry: Registry, production: str) -> tuple[Deployed, Deployed] | None:
    """(champion's deployment, canary's deployment) on production, or None when no canary is there."""
    champion, canary = registry.find_version(CHAMPION_ALIAS), registry.find_version(CANARY_ALIAS)
    if champion is None or canary is None or champion.version == canary.version:
        return None
    deployed = registry.deployments(production)
    pair = find_deployed(deployed, champion.version), find_deployed(deployed, canary.version)
    return None if None in pair else pair  # type: ignore[return-value]


def next_step(steps: list[int], current: int) -> int:
    """The next share of ``steps`` above ``current`` (100 once past the last)."""
    return next((s for s in steps if s > current), 100)


def apply(registry: Registry, production: str, champion: Deployed, canary: Deployed, decision: str,
          steps: list[int]) -> bool:
    """Carry ``decision`` out; True when the canary became champion."""
    if decision == ROLLBACK:
        registry.undeploy(production, canary, {champion.id: 100})
        return False
    if decision != PROMOTE:
        return False
    share = next_step(steps, canary.traffic)
    registry.set_traffic(production, {canary.id: share, champion.id: 100 - share})
    if share < 100:
        return False
    try:
        promote(registry, canary.version, champion.version)
    except AliasMoved as moved:
        registry.set_traffic(production, {canary.id: canary.traffic, champion.id: champion.traffic})
        raise ChampionMoved(f"canary {canary.version} not promoted: champion moved from {champion.version} to "
                            f"{moved.found or '(none)'} meanwhile; the split is back as it was") from moved
    retire(registry, production, {canary.version})
    return True


def run_canary(settings: Settings, registry: Registry, now: datetime | None = None,
               log: pd.DataFrame | None = None) -> CanaryOutcome:
    """Find the canary on production, judge it on the prediction log since it got its current share (``log``:
    that window, given), act on it."""
    production = settings.deploy.production_endpoint
    before = split_of(registry.deployments(production))
    pair = find_canary(registry, production)
    if pair is None:
        return CanaryOutcome(NO_CANARY, None, None, before, before)
    champion, canary = pair
    if canary.traffic >= 100:
        # Judged and moved to 100% by an earlier run that stopped before the champion moved: finish that.
        verdict = Verdict(PROMOTE, ["the canary already serves 100%: the champion moves to it"])
        became = apply(registry, production, champion, canary, PROMOTE, settings.canary.steps)
        clear_steps(settings, canary)
        return CanaryOutcome(PROMOTE, champion.version, canary.version, before,
                             split_of(registry.deployments(production)), became, verdict)
    recorded = log is None  # a window read here starts at the current step's record; a given one is as given
    if log is None:
        try:
            log = read_window(settings, now, since=step_started(settings, canary))
        except DataValidationError as exc:
            if settings.monitoring.sample_rate <= 0:
                raise DataValidationError(f"canary {canary.version}: cannot be judged with prediction logging "
                                          f"off (monitoring.sample_rate 0)") from exc
            log = pd.DataFrame(columns=[DEPLOYED_MODEL_ID])  # nothing logged yet: waiting for data
    verdict = judge(log, champion.id, canary.id, settings.canary, shadow=canary.traffic == 0)
    if recorded and verdict.decision == PROMOTE and (share := next_step(settings.canary.steps, canary.traffic)) < 100:
        # Before the split moves: each share is judged on requests served at that share only.
        record_step(settings, canary, share, now or datetime.now(UTC))
    became = apply(registry, production, champion, canary, verdict.decision, settings.canary.steps)
    if became or verdict.decision == ROLLBACK:
        clear_steps(settings, canary)
    return CanaryOutcome(verdict.decision, champion.version, canary.version, before,
                         split_of(registry.deployments(production)), became, verdict)
