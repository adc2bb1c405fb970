"""The model: reading splits, the scikit-learn Pipeline, and training with a model card.

What a model directory holds, and how it is loaded and scored, is ``ctloop.model_runtime``'s: training writes
``model.joblib``, ``model.onnx`` (when the pipeline converts) and ``model_card.json`` there.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from ctloop.config import ModelSettings, Settings
from ctloop.errors import DataValidationError
from ctloop.features import FeatureSpec
from ctloop.metrics import choose_threshold, classification_metrics
from ctloop.model_runtime import (
    CARD_FILE,
    MODEL_FILE,
    ONNX_CHECK_FILE,
    ONNX_FILE,
    card_features,
    to_category_strings,
    to_float64,
)
from ctloop.threads import fit_threads

__all__ = ["CARD_FILE", "MODEL_FILE"]

EXPERIMENTS_FILE = "experiments.jsonl"
UNKNOWN_GIT_SHA = "unknown"


# ---------------------------------------------------------------------------------------------------- splits
def read_split(directory: str | Path, spec: FeatureSpec, name: str) -> pd.DataFrame:
    """Read a split directory of Parquet part files (``_``-prefixed files skipped) in a canonical row order.

    Rows are ordered by a hash of their content, so the same rows give the same frame (and the same fitted
    model) however the writer partitioned them. Raises DataValidationError on missing columns or a bad label.
    """
    path = Path(directory)
    if not path.is_dir():
        raise DataValidationError(f"{name} split: {path} is not a directory of Parquet files")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises a handful of types for unreadable/empty directories
        raise DataValidationError(f"{name} split: cannot read Parquet files under {path}: {exc}") from exc
    required = [spec.label_column, *spec.model_features]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataValidationError(
            f"{name} split {path}: missing column(s) {missing} required by the feature spec; "
            f"found {list(frame.columns)}"
        )
    if frame.empty:
        raise DataValidationError(f"{name} split {path}: no rows")
    frame[spec.label_column] = _label(frame[spec.label_column], f"{name} split {path}")
    order = np.argsort(_row_hashes(frame), kind="stable")
    return frame.iloc[order].reset_index(drop=True)


def _label(column: pd.Series, where: str) -> pd.Series:
    if column.isna().any():
        nulls = int(column.isna().sum())
        raise DataValidationError(f"{where}: label column {column.name!r} has {nulls} null(s)")
    values = set(pd.unique(column).tolist())
    if not values <= {0, 1}:  # True/False compare equal to 1/0
        bad = sorted((v for v in values if v not in (0, 1)), key=str)[:5]
        raise DataValidationError(f"{where}: label column {column.name!r} must hold 0/1, found values {bad}")
    return column.astype("int64")


def _row_hashes(frame: pd.DataFrame) -> np.ndarray:
    return pd.util.hash_pandas_object(frame[sorted(frame.columns)], index=False).to_numpy()


def data_checksum(frame: pd.DataFrame) -> str:
    """Content hash of a split: independent of row order and part-file layout, sensitive to any value."""
    digest = hashlib.sha256()
    digest.update(json.dumps({c: str(frame[c].dtype) for c in sorted(frame.columns)}).encode())
    digest.update(np.sort(_row_hashes(frame)).tobytes())
    return "sha256:" + digest.hexdigest()


# -------------------------------------------------------------------------------------------------- pipeline
_ESTIMATORS = {
    "logistic_regression": LogisticRegression,
    "hist_gradient_boosting": HistGradientBoostingClassifier,
}


def _defaults(model: ModelSettings) -> dict[str, Any]:
    if model.type == "logistic_regression":
        return {"class_weight": "balanced", "max_iter": 1000, "random_state": model.seed}
    # Early stopping off: every row of the train split is used for fitting and the fit needs no random split.
    return {"early_stopping": False, "random_state": model.seed}


def _coerce_integral(params: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    """Pipeline parameters travel as protobuf Structs, turning ``200`` into ``200.0``; sklearn wants ints."""
    out = {}
    for key, value in params.items():
        default = allowed[key]
        int_like = default is None or (isinstance(default, int) and not isinstance(default, bool))
        if isinstance(value, float) and value.is_integer() and int_like:
            value = int(value)
        out[key] = value
    return out


def make_classifier(model: ModelSettings) -> Any:
    """The configured classifier with the project defaults, overridden by ``model.params``.

    Raises ValueError naming any unknown hyper-parameter and listing the allowed ones.
    """
    if model.type not in _ESTIMATORS:
        raise ValueError(f"model.type: {model.type!r} is not one of {sorted(_ESTIMATORS)}")
    estimator = _ESTIMATORS[model.type]()
    allowed = estimator.get_params(deep=False)
    unknown = sorted(set(model.params) - set(allowed))
    if unknown:
        raise ValueError(
            f"model.params: unknown hyper-parameter(s) {unknown} for {model.type}; allowed: {sorted(allowed)}"
        )
    if "random_state" in model.params:
        raise ValueError("model.params: 'random_state' is set from model.seed; set model.seed instead")
    return estimator.set_params(**{**_defaults(model), **_coerce_integral(model.params, allowed)})


def build_pipeline(spec: FeatureSpec, model: ModelSettings) -> Pipeline:
    """Preprocessing (impute, scale, one-hot) of the spec's model features, then the configured classifier.

    A missing category is a category of its own (``to_category_strings`` names it), so the categorical branch
    needs no imputer.
    """
    numeric = Pipeline([
        ("as_float", FunctionTransformer(to_float64, feature_names_out="one-to-one")),
        ("impute", SimpleImputer(strategy="median", add_indicator=True)),
        ("scale", StandardScaler()),
    ])
    categorical = Pipeline([
        ("as_str", FunctionTransformer(to_category_strings, feature_names_out="one-to-one")),
        ("onehot", OneHotEncoder(handle_unknown="infrequent_if_exist",
                                 min_frequency=model.category_min_frequency or None, sparse_output=False)),
    ])
    transformers = []
    if spec.model_numeric:
        transformers.append(("numeric", numeric, list(spec.model_numeric)))
    if spec.categorical:
        transformers.append(("categorical", categorical, list(spec.categorical)))
    if not transformers:
        raise ValueError("feature spec has no model features")
    return Pipeline([
        ("preprocess", ColumnTransformer(transformers, remainder="drop")),
        ("classifier", make_classifier(model)),
    ])


# -------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    card: dict[str, Any]
    valid_metrics: dict[str, float | int]
    checksum: str
    rows: dict[str, int]


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)


def train_model(
    settings: Settings,
    train_dir: str | Path,
    valid_dir: str | Path,
    model_dir: str | Path,
    run_id: str,
    lineage: dict[str, Any] | None = None,
) -> TrainResult:
    """Fit on the train split, score the valid split, write ``model.joblib`` and ``model_card.json``, log.

    ``lineage`` is recorded in the card as is; its ``git_sha`` (default "unknown") is lifted to the top level.
    """
    lineage = dict(lineage or {})
    spec = FeatureSpec.read(train_dir)
    valid_spec = FeatureSpec.read(valid_dir)
    if valid_spec != spec:
        raise DataValidationError(
            f"feature specs differ: {Path(train_dir)} has {spec.to_json()}, "
            f"{Path(valid_dir)} has {valid_spec.to_json()}"
        )
    train = read_split(train_dir, spec, "train")
    valid = read_split(valid_dir, spec, "valid")
    label = spec.label_column
    if train[label].nunique() < 2:
        raise DataValidationError(
            f"train split {Path(train_dir)}: label column {label!r} holds one class only "
            f"({train[label].iloc[0]}); a classifier needs both"
        )

    pipeline = build_pipeline(spec, settings.model)
    with fit_threads(settings):
        pipeline.fit(train[spec.model_features], train[label])
    valid_proba = pipeline.predict_proba(valid[spec.model_features])[:, 1]
    m = settings.model
    threshold, objective_value = choose_threshold(
        valid[label].to_numpy(), valid_proba, m.threshold_objective, beta=m.threshold_beta,
        cost_false_positive=m.cost_false_positive, cost_false_negative=m.cost_false_negative, fixed=m.threshold)
    valid_metrics = classification_metrics(valid[label].to_numpy(), valid_proba, threshold)

    checksum = data_checksum(train)
    rows = {"train": len(train), "valid": len(valid)}
    hyper = _json_safe(pipeline.named_steps["classifier"].get_params(deep=False))
    card = {
        "model_type": settings.model.type,
        "display_name": settings.model.display_name,
        "label": label,
        "threshold": threshold,
        "threshold_selection": {"objective": m.threshold_objective, "beta": m.threshold_beta,
                                "cost_false_positive": m.cost_false_positive,
                                "cost_false_negative": m.cost_false_negative, "split": "valid",
                                "objective_value": objective_value},
        "features": card_features(spec.model_numeric, spec.categorical),
        "feature_spec": asdict(spec),
        "training_data": {
            "checksum": checksum,
            "rows": rows,
            "positive_rate": {"train": float(train[label].mean()), "valid": float(valid[label].mean())},
        },
        "hyperparameters": hyper,
        "seed": settings.model.seed,
        "category_min_frequency": settings.model.category_min_frequency,
        "versions": library_versions(),
        "git_sha": str(lineage.get("git_sha") or UNKNOWN_GIT_SHA),
        "run_id": run_id,
        "lineage": _json_safe(lineage),
        "validation_metrics": valid_metrics,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out = write_model(model_dir, pipeline, card)
    card = json.loads((out / CARD_FILE).read_text())  # as written, with the ONNX export's outcome
    log_experiment(settings, run_id, params={"model_type": settings.model.type, **hyper},
                   metrics={f"valid_{k}": v for k, v in valid_metrics.items()})
    return TrainResult(model_dir=out, card=card, valid_metrics=valid_metrics, checksum=checksum, rows=rows)


def library_versions() -> dict[str, str]:
    return {
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
        "pandas": pd.__version__,
        "numpy": np.__version__,
        "joblib": joblib.__version__,
    }


def _replace_atomically(target: Path, write: Any) -> None:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_model(model_dir: str | Path, pipeline: Pipeline, card: dict[str, Any]) -> Path:
    """Write the model, its ONNX export, then its card, each to a temp file renamed into place.

    The card goes last and any stale card (and ONNX check) is removed first, so a card always describes the
    files beside it. A pipeline that does not convert to ONNX gets no ``model.onnx``; the card's
    ``onnx.reason`` says why, and it is served by scikit-learn.
    """
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (CARD_FILE, ONNX_CHECK_FILE, ONNX_FILE):
        (out / stale).unlink(missing_ok=True)
    _replace_atomically(out / MODEL_FILE, lambda p: joblib.dump(pipeline, p))
    onnx_bytes, reason = _onnx_export(pipeline, card)
    if onnx_bytes is not None:
        _replace_atomically(out / ONNX_FILE, lambda p: p.write_bytes(onnx_bytes))
    card = {**card, "onnx": {"file": ONNX_FILE if onnx_bytes is not None else None, "reason": reason}}
    _replace_atomically(out / CARD_FILE, lambda p: p.write_text(json.dumps(card, indent=2, sort_keys=True)))
    return out


def _onnx_export(pipeline: Pipeline, card: dict[str, Any]) -> tuple[bytes | None, str]:
    try:
        from ctloop.onnx_export import export_onnx

        features = card.get("features") or []
        numeric = [f["name"] for f in features if f["type"] == "numeric"]
        categorical = [f["name"] for f in features if f["type"] == "categorical"]
        return export_onnx(pipeline, numeric, categorical), ""
    except Exception as exc:  # noqa: BLE001 - any conversion failure leaves the model to scikit-learn
        return None, f"ONNX export failed: {type(exc).__name__}: {str(exc)[:300]}"


# ------------------------------------------------------------------------------------------------ experiments
_RUN_NAME_BAD = re.compile(r"[^a-z0-9-]+")


def experiment_run_name(run_id: str, experiment: str) -> str:
    """A Vertex experiment run name for ``run_id``: ``[a-z0-9][a-z0-9-]*``, and ``<experiment>-<run>`` <= 128.

    Names that had to be shortened or rewritten get a hash suffix so distinct run ids stay distinct.
    """
    clean = _RUN_NAME_BAD.sub("-", run_id.lower()).strip("-") or "run"
    limit = 127 - len(experiment)
    if clean != run_id or len(clean) > limit:
        suffix = hashlib.sha256(run_id.encode()).hexdigest()[:8]
        clean = f"{clean[: max(1, limit - 9)].rstrip('-')}-{suffix}"
    return clean


def log_experiment(settings: Settings, run_id: str, params: dict[str, Any], metrics: dict[str, Any],
                   **vertex_init: Any) -> None:
    """Record a training run: a Vertex AI Experiments run (cloud) or a line of ``experiments.jsonl`` (local).

    Re-logging the same ``run_id`` replaces its earlier record (local) or resumes the existing run (cloud).
    ``vertex_init`` passes extra keyword arguments to ``aiplatform.init`` (credentials, api_endpoint).
    """
    params = {k: v if isinstance(v, int | float | str) and not isinstance(v, bool) else str(v)
              for k, v in params.items()}
    metrics = {k: float(v) for k, v in metrics.items()}
    if settings.backend == "cloud":
        _log_vertex(settings, run_id, params, metrics, vertex_init)
    else:
        _log_local(settings, run_id, params, metrics)


def _log_local(settings: Settings, run_id: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
    path = settings.local.runs_dir / EXPERIMENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("run_id") != run_id]
    record = {"run_id": run_id, "experiment": settings.gcp.experiment, "params": params, "metrics": metrics,
              "logged_at": datetime.now(UTC).isoformat(timespec="seconds")}
    text = "\n".join([*kept, json.dumps(record, sort_keys=True)]) + "\n"
    _replace_atomically(path, lambda p: p.write_text(text))


def _log_vertex(settings: Settings, run_id: str, params: dict[str, Any], metrics: dict[str, float],
                vertex_init: dict[str, Any]) -> None:
    from google.api_core import exceptions
    from google.cloud import aiplatform

    # No backing TensorBoard: only summary params/metrics are logged; creating one is a slow, billable call.
    aiplatform.init(project=settings.gcp.project, location=settings.gcp.region,
                    experiment=settings.gcp.experiment, experiment_tensorboard=False, **vertex_init)
    name = experiment_run_name(run_id, settings.gcp.experiment)
    try:
        aiplatform.start_run(name)
    except exceptions.Conflict:  # a retried step: the run exists already
        aiplatform.start_run(name, resume=True)
    try:
        aiplatform.log_params(params)
        aiplatform.log_metrics(metrics)
    finally:
        aiplatform.end_run()
