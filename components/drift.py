"""check_drift: compare the recent batch with the champion's training data and decide drift / no_drift.

The reference is the champion's own train split, found through its model card (``lineage.train_uri``, written by
the train step), so nothing extra is stored at training time and the reference is exactly the rows the champion
learned from. Its score reference is the champion's valid split (``lineage.valid_uri``): scores on rows the model
was fitted on are more confident than on new rows, which would read as a shift by itself.

Features compared: every model feature the recent batch has. The source features must be there; the derived
history features are only in the prediction log (the extract has raw rows), and the champion's scores need every
model feature, so on an extract with history features on, the score shift is reported as not measured.
No champion yet: the decision is ``drift`` (training is what creates one).
Outputs: per-feature metrics, an HTML report with histograms, and decision / drifted_features / reasons.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.decay import Decay, performance_decay
from ctloop.drift import DRIFT, NO_DRIFT, DriftReport, Reason, compare, one_per_entity, sample_rows
from ctloop.drift_report import render_html
from ctloop.errors import ChampionError, CtloopError, DataValidationError
from ctloop.model_runtime import LoadedModel, load_model
from ctloop.modeling import read_split
from ctloop.parquet_files import parquet_files
from ctloop.prediction_log import META_COLUMNS, local_path


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def check_drift(
    config: dict,
    run_id: str,
    recent: Input[Dataset],
    champion_uri: str,
    metrics: Output[Metrics],
    report: Output[HTML],
) -> NamedTuple("Outputs", decision=str, drifted_features=int, reasons=str):
    """Recent batch vs the champion's training data: decision "drift"/"no_drift", reasons a JSON list."""
    from components.drift import run_drift_step
    from ctloop.steps import run_step

    return run_step(run_drift_step, config, run_id, recent, champion_uri, metrics, report)


@dataclass(frozen=True)
class DriftCheck:
    report: DriftReport
    champion_dir: str | None
    reference_uri: str
    compared: list[str]
    decay: Decay | None = None  # None when the recent batch has no labels (of both classes)
    retrain: bool = False  # what monitoring.retrain_policy makes of drift and decay

    @property
    def decision(self) -> str:
        """The step's decision: ``drift`` (retrain) or ``no_drift``; under the decay policies, decay counts."""
        return DRIFT if self.retrain else NO_DRIFT


def _lineage_uri(champion: LoadedModel, key: str) -> str:
    uri = str((champion.card.data.get("lineage") or {}).get(key) or "")
    if not uri:
        raise ChampionError(f"champion model {champion.model_dir}: model_card.json has no lineage.{key}; the drift "
                            f"check needs the champion's {key.removesuffix('_uri')} split to compare with")
    return uri


def _read_reference(champion: LoadedModel, key: str, name: str) -> tuple[pd.DataFrame, str]:
    uri = _lineage_uri(champion, key)
    path = local_path(uri)
    if not path.is_dir():
        raise ChampionError(f"champion model {champion.model_dir}: its {name} split {uri} ({path}) is gone; the "
                            f"drift check compares with it (keep pipeline-root outputs as long as their models serve)")
    return read_split(path, champion.spec, name), uri


def read_recent(directory: str | Path) -> pd.DataFrame:
    path = Path(directory)
    files = parquet_files(path)
    if not files:
        raise DataValidationError(f"recent batch {path}: no Parquet files")
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return frame.drop(columns=[c for c in META_COLUMNS if c in frame.columns])


def no_champion_report(recent_rows: int) -> DriftReport:
    reason = Reason(check="no_champion", subject="batch", value=0.0, threshold=0.0, p_value=None, alpha=None,
                    drifted=True, message="DRIFT: no champion model yet, so nothing to compare with; training "
                                          "creates the first one")
    return DriftReport(decision=DRIFT, features=[], scores=None, reasons=[reason], alpha=0.0, tests=0,
                       rows_reference=0, rows_recent=recent_rows, notes=["no champion"])


def run_drift_check(settings: Settings, recent_dir: str | Path, champion_dir: str | None) -> DriftCheck:
    """Compare the recent batch in ``recent_dir`` with the champion at ``champion_dir`` (None: no champion)."""
    m = settings.monitoring
    recent = read_recent(recent_dir)
    if len(recent) < m.min_rows:
        raise DataValidationError(f"recent batch {recent_dir}: {len(recent)} rows; expected at least "
                                  f"{m.min_rows} (monitoring.min_rows)")
    if not champion_dir:
        return DriftCheck(no_champion_report(len(recent)), None, "", [], retrain=True)
    try:
        champion = load_model(champion_dir)
    except CtloopError as exc:
        raise ChampionError(f"champion model {champion_dir} cannot be loaded: {exc}") from exc
    spec = champion.spec
    reference, reference_uri = _read_reference(champion, "train_uri", "train")
    missing_source = [c for c in spec.numeric + spec.categorical if c not in recent.columns]
    if missing_source:
        raise DataValidationError(f"recent batch {recent_dir}: missing feature column(s) {missing_source} the "
                                  f"champion was trained on; found {list(recent.columns)}")
    unknown = [c for c in m.exclude_features if c not in spec.model_features]
    if unknown:
        raise DataValidationError(f"monitoring.exclude_features: {unknown} are not features of the champion "
                                  f"{champion_dir}; its features are {spec.model_features}")
    numeric = [c for c in spec.model_numeric if c in recent.columns and c not in m.exclude_features]
    categorical = [c for c in spec.categorical if c not in m.exclude_features]
    notes = [f"excluded by monitoring.exclude_features: {m.exclude_features}"] if m.exclude_features else []
    absent = [c for c in spec.model_features if c not in recent.columns]
    if absent:
        notes.append(f"derived feature(s) {absent} are not in the recent batch (only the prediction log has "
                     f"them): not compared, and the champion scored both sides with them unknown")
    rows = (len(reference), len(recent))
    if spec.id_column in recent.columns:
        notes.append(f"one row per {spec.id_column}: reference {rows[0]} -> {reference[spec.id_column].nunique()}"
                     f" rows, recent {rows[1]} -> {recent[spec.id_column].nunique()} rows")
    else:
        notes.append(f"the recent batch has no {spec.id_column!r} column: its rows are compared as if independent")
    reference, recent = _entities(reference, spec.id_column, m.max_rows), _entities(recent, spec.id_column, m.max_rows)
    valid = _entities(_read_reference(champion, "valid_uri", "valid")[0], spec.id_column, m.max_rows)
    # Features not compared (absent, or excluded as expected to move) are unknown to the champion on both sides,
    # so the scores compare what the compared features do to them.
    unknown = absent + [c for c in m.exclude_features if c not in absent]
    scores = {"reference_scores": _score(champion, _blank(valid, unknown), "reference (valid split)"),
              "recent_scores": _score(champion, _blank(recent, unknown), "recent batch"),
              "threshold": champion.threshold}
    report = compare(reference, recent, numeric, categorical, m, notes=notes, **scores)
    decay = None
    label = spec.label_column
    labelled = recent[label].isin([0, 1]).to_numpy() if label in recent.columns else np.zeros(len(recent), bool)
    if label in recent.columns and recent[label][labelled].nunique() == 2:  # both classes: the AUC is measurable
        decay = performance_decay(valid[label], scores["reference_scores"], recent[label][labelled].astype(int),
                                  scores["recent_scores"][labelled], threshold=champion.threshold,
                                  alpha=m.p_value, min_drop=m.min_auc_drop)
    if decay is not None:
        report = replace(report, reasons=[*report.reasons, _decay_reason(decay)])
    drifted = report.decision == DRIFT
    decayed = decay is not None and decay.decayed
    retrain = {"on_decay": decayed, "on_drift_or_decay": drifted or decayed}.get(m.retrain_policy, drifted)
    return DriftCheck(report, str(champion_dir), reference_uri, numeric + categorical, decay, retrain)


def _decay_reason(d: Decay) -> Reason:
    verdict = "DECAYED" if d.decayed else "stable"
    return Reason(
        check="performance_decay", subject="champion", value=d.drop, threshold=d.min_drop, p_value=None,
        alpha=d.alpha, drifted=d.decayed,
        message=f"champion ROC AUC {d.reference_roc_auc:.4f} on its valid split ({d.reference_rows} rows) -> "
                f"{d.recent_roc_auc:.4f} on the recent labelled rows ({d.recent_rows}): drop {d.drop:+.4f}, "
                f"one-sided {100 * (1 - d.alpha):.0f}% lower bound {d.lower:+.4f} vs monitoring.min_auc_drop "
                f"{d.min_drop}: {verdict}")


def _entities(frame: pd.DataFrame, id_column: str, max_rows: int) -> pd.DataFrame:
    """One row per entity when the frame has the id column, then at most ``max_rows`` rows."""
    if id_column in frame.columns:
        frame = one_per_entity(frame, id_column)
    return sample_rows(frame, max_rows)


def _blank(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``frame`` with ``columns`` unknown (NaN): the same on both sides, so the score comparison stays fair."""
    return frame.assign(**{c: np.nan for c in columns}) if columns else frame


def _score(champion: LoadedModel, frame: pd.DataFrame, what: str) -> np.ndarray:
    try:
        return champion.predict_proba(frame)
    except Exception as exc:  # whatever the champion's own pipeline raises on these rows
        raise ChampionError(f"champion model {champion.model_dir} cannot score the {what}: "
                            f"{type(exc).__name__}: {exc}") from exc


def run_drift_step(config: dict, run_id: str, recent: Any, champion_uri: str, metrics: Any,
                   report: Any) -> tuple[str, int, str]:
    """The component body: check, fill the metrics and the HTML report, return the step outputs."""
    from components.evaluate import champion_path

    settings = Settings.from_param(config)
    check = run_drift_check(settings, recent.path, champion_path(champion_uri))
    r = check.report
    for f in r.features:
        if np.isfinite(f.psi):
            metrics.log_metric(f"psi_{f.name}", round(float(f.psi), 6))
    metrics.log_metric("drifted_features", len(r.drifted_features))
    metrics.log_metric("recent_rows", r.rows_recent)
    metrics.log_metric("reference_rows", r.rows_reference)
    if r.scores is not None:
        metrics.log_metric("score_psi", round(r.scores.psi, 6))
        metrics.log_metric("positive_rate_reference", round(r.scores.positive_rate_reference, 6))
        metrics.log_metric("positive_rate_recent", round(r.scores.positive_rate_recent, 6))
    if check.decay is not None:
        d = check.decay
        for name, value in (("champion_reference_roc_auc", d.reference_roc_auc), ("auc_drop", d.drop),
                            ("auc_drop_lower", d.lower), ("decayed", int(d.decayed)),
                            *((f"champion_recent_{k}", v) for k, v in d.recent_metrics.items())):
            metrics.log_metric(name, round(float(value), 6))
    metrics.metadata.update({"run_id": run_id, "decision": check.decision, "drift_decision": r.decision,
                             "retrain_policy": settings.monitoring.retrain_policy,
                             "champion_uri": champion_uri or "", "reference_uri": check.reference_uri,
                             "alpha": r.alpha})

    described = ("source", "origin", "window_start", "window_end")
    context = {"decision (retrain policy " + settings.monitoring.retrain_policy + ")": check.decision,
               "run id": run_id, "champion": champion_uri or "none", "reference (train split)": check.reference_uri,
               "recent batch": recent.uri,
               **{f"recent {k}": v for k, v in (recent.metadata or {}).items() if k in described}}
    out = Path(report.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render_html(r, context))
    tmp.replace(out)
    report.metadata.update({"run_id": run_id, "decision": check.decision})
    return check.decision, len(r.drifted_features), r.reasons_json()
