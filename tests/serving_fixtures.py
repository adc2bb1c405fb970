"""Tiny real models for the registry, serving and deploy tests: fitted scikit-learn pipelines on synthetic
data, written as model directories (``model.joblib`` + ``model_card.json``) as the train step writes them."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline

from ctloop.config import ModelSettings
from ctloop.features import FeatureSpec
from ctloop.model_runtime import ONNX_CHECK_FILE, card_features, check_onnx_agreement, load_model
from ctloop.modeling import build_pipeline, data_checksum, write_model

NUMERIC = ["tenure_months", "monthly_charges"]
CATEGORICAL = ["contract_type"]
FEATURES = NUMERIC + CATEGORICAL
CONTRACTS = ["monthly", "one_year", "two_year"]


def synthetic_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Rows with an id, a timestamp, the features (some nulls) and a label that depends on them."""
    rng = np.random.default_rng(seed)
    tenure = rng.integers(0, 72, n).astype(float)
    charges = rng.normal(70, 20, n).round(2)
    contract = rng.choice(CONTRACTS, n)
    logit = -0.05 * tenure + 0.03 * (charges - 70) + np.where(contract == "monthly", 1.5, -1.0)
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    tenure[rng.random(n) < 0.05] = np.nan
    frame = pd.DataFrame({
        "customer_id": [f"c{i:05d}" for i in range(n)],
        "event_ts": pd.date_range("2025-01-01", periods=n, freq="h", tz="UTC"),
        "tenure_months": tenure,
        "monthly_charges": charges,
        "contract_type": pd.array(contract, dtype="str"),
        "churned": label,
    })
    return frame


SPEC = FeatureSpec(id_column="customer_id", timestamp_column="event_ts", label_column="churned",
                   numeric=NUMERIC, categorical=CATEGORICAL, history_enabled=False)


def fit_pipeline(frame: pd.DataFrame, estimator: object | None = None) -> Pipeline:
    """The project's model pipeline (``ctloop.modeling.build_pipeline``), optionally another classifier."""
    pipe = build_pipeline(SPEC, ModelSettings(type="logistic_regression", seed=0))
    if estimator is not None:
        pipe.set_params(classifier=estimator)
    return pipe.fit(frame[FEATURES], frame["churned"])


def write_model_dir(directory: Path, pipeline: object, threshold: float = 0.5, **card_extra: object) -> Path:
    """A model directory with the train step's card (``ctloop.model_runtime.ModelCard``)."""
    classifier = type(pipeline.steps[-1][1]).__name__ if hasattr(pipeline, "steps") else "model"
    card = {
        "features": card_features(NUMERIC, CATEGORICAL),
        "feature_spec": asdict(SPEC),
        "versions": {"sklearn": sklearn.__version__},
    }
    estimator = pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline
    # What the model is, as the train step records it: the registry keys model identity on these fields.
    card["hyperparameters"] = {k: repr(v) for k, v in sorted(estimator.get_params(deep=False).items())}
    card.update({"label": "churned", "threshold": threshold, "model_type": classifier, **card_extra})
    return write_model(directory, pipeline, card)


def approve_onnx(directory: Path) -> dict:
    """What the gate does: check the ONNX export against scikit-learn on held-out rows and write the verdict."""
    model = load_model(directory, runtime="sklearn")
    check = check_onnx_agreement(model, synthetic_frame(seed=7), "synthetic rows")
    (directory / ONNX_CHECK_FILE).write_text(json.dumps(check))
    return check


def make_model_dir(directory: Path, seed: int = 0, threshold: float = 0.5, **card_extra: object) -> Path:
    frame = synthetic_frame(seed=seed)
    card_extra.setdefault("training_data", {"checksum": data_checksum(frame)})
    return write_model_dir(directory, fit_pipeline(frame), threshold, **card_extra)


class ConstantClassifier(ClassifierMixin, BaseEstimator):
    """Predicts one fixed probability; ``value=nan`` makes a model that returns NaN."""

    def __init__(self, value: float = 0.5) -> None:
        self.value = value

    def fit(self, X, y):  # noqa: N803 - scikit-learn's signature
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X):  # noqa: N803
        p = np.full(len(X), self.value, dtype=float)
        return np.column_stack([1 - p, p])


class FailingClassifier(ClassifierMixin, BaseEstimator):
    """Fits, then raises on every prediction."""

    def fit(self, X, y):  # noqa: N803
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X):  # noqa: N803
        raise RuntimeError("this model cannot predict")


def make_constant_model_dir(directory: Path, value: float) -> Path:
    return write_model_dir(directory, fit_pipeline(synthetic_frame(), ConstantClassifier(value)))


def make_failing_model_dir(directory: Path) -> Path:
    return write_model_dir(directory, fit_pipeline(synthetic_frame(), FailingClassifier()))


def write_split_dir(directory: Path, frame: pd.DataFrame, parts: int = 2) -> Path:
    """A test split as the transform writes it: Parquet part files plus ``_feature_spec.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(frame)), parts)):
        frame.iloc[chunk].to_parquet(directory / f"part-{i:05d}.parquet", index=False)
    spec = {"id_column": "customer_id", "timestamp_column": "event_ts", "label_column": "churned",
            "numeric": NUMERIC, "categorical": CATEGORICAL, "history_means": [], "history_enabled": False}
    (directory / "_feature_spec.json").write_text(json.dumps(spec, sort_keys=True))
    return directory


def instance(row: int = 0, seed: int = 0) -> dict[str, object]:
    """One JSON-ready instance from the synthetic data (NaN as null)."""
    rec = synthetic_frame(seed=seed)[FEATURES].iloc[row].to_dict()
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in rec.items()}
