"""Load a model directory (``model.joblib`` + ``model_card.json``), check instances against its card, predict.

The card may carry more fields than the ones read here. The pickled pipeline may refer to functions of
``ctloop.modeling`` (its input coercions), so the serving image ships the ``ctloop`` package beside this one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn

MODEL_FILE = "model.joblib"
CARD_FILE = "model_card.json"
MODEL_FILES = (MODEL_FILE, CARD_FILE)


class ModelLoadError(Exception):
    """The model directory is missing a file or its card lacks a field."""


class InstanceError(ValueError):
    """A request instance does not match the model card; the message names the instance index and field."""


@dataclass(frozen=True)
class ModelCard:
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    label: str
    threshold: float
    model_type: str
    sklearn_version: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ModelCard:
        """Parse a card. ``features`` is ``{"numeric": [...], "categorical": [...]}`` or the train step's
        ``[{"name": ..., "type": "numeric"|"categorical"}, ...]``; the scikit-learn version is
        ``sklearn_version`` or ``versions.sklearn``."""
        if not isinstance(data, dict):
            raise ModelLoadError(f"{source}: expected a JSON object, found {type(data).__name__}")
        numeric, categorical = _feature_lists(data.get("features"), source)
        both = set(numeric) & set(categorical)
        if both or not (numeric or categorical):
            raise ModelLoadError(f"{source}: 'features' must list at least one column and no column twice "
                                 f"(found in both lists: {sorted(both)})")
        threshold = data.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 1:
            raise ModelLoadError(f"{source}: field 'threshold' must be a number in (0, 1), "
                                 f"found {threshold!r}")
        versions = data.get("versions") if isinstance(data.get("versions"), dict) else {}
        sklearn_version = data.get("sklearn_version") or versions.get("sklearn")
        for key, value in (("label", data.get("label")), ("model_type", data.get("model_type")),
                           ("sklearn_version", sklearn_version)):
            if value in (None, ""):
                raise ModelLoadError(f"{source}: missing field {key!r}")
        known = {"features", "label", "threshold", "model_type", "sklearn_version"}
        return cls(
            numeric=numeric,
            categorical=categorical,
            label=str(data["label"]),
            threshold=float(threshold),
            model_type=str(data["model_type"]),
            sklearn_version=str(sklearn_version),
            extra={k: v for k, v in data.items() if k not in known},
        )


def _feature_lists(feats: Any, source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    lists: dict[str, list[str]] = {"numeric": [], "categorical": []}
    if isinstance(feats, dict):
        for kind in lists:
            names = feats.get(kind, [])
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise ModelLoadError(f"{source}: field 'features.{kind}' must be a list of column names, "
                                     f"found {names!r}")
            lists[kind] = names
    elif isinstance(feats, list):
        for i, item in enumerate(feats):
            kind = item.get("type") if isinstance(item, dict) else None
            name = item.get("name") if isinstance(item, dict) else None
            if kind not in lists or not isinstance(name, str) or not name:
                raise ModelLoadError(f"{source}: field 'features[{i}]' must be {{\"name\": ..., \"type\": "
                                     f"\"numeric\"|\"categorical\"}}, found {item!r}")
            lists[kind].append(name)
    else:
        raise ModelLoadError(f"{source}: field 'features' must be an object with 'numeric' and "
                             f"'categorical' lists (or a list of {{name, type}}), found {feats!r}")
    return tuple(lists["numeric"]), tuple(lists["categorical"])


Columns = dict[str, list[Any]]


@dataclass(frozen=True)
class LoadedModel:
    """A fitted scikit-learn pipeline and its card, ready to score validated instances."""

    pipeline: Any
    card: ModelCard
    source: str

    def __post_init__(self) -> None:
        if not hasattr(self.pipeline, "predict_proba"):
            kind = type(self.pipeline).__name__
            raise ModelLoadError(f"{self.source}/{MODEL_FILE}: {kind} has no predict_proba")

    @property
    def positive_index(self) -> int:
        classes = list(getattr(self.pipeline, "classes_", [0, 1]))
        for positive in (1, True, "1"):
            if positive in classes:
                return classes.index(positive)
        return len(classes) - 1

    def frame(self, columns: Columns) -> pd.DataFrame:
        """Typed columns as training saw them: float64 numerics, string categoricals (null = missing)."""
        data: dict[str, Any] = {}
        for name in self.card.numeric:
            data[name] = np.array(columns[name], dtype=np.float64)  # None -> NaN
        for name in self.card.categorical:
            data[name] = pd.array(columns[name], dtype="str")
        return pd.DataFrame(data, columns=list(self.card.features))

    def probabilities(self, columns: Columns) -> np.ndarray:
        """P(label = 1) per row, on one OpenMP thread.

        Gradient-boosted trees meet an OpenMP barrier per tree: on a busy 2-core machine a descheduled peer thread
        turned a 5 ms one-row request into 0.3-2.4 s (failing the deploy smoke test's latency limit). One thread
        costs little at request sizes: 19 ms instead of 15 ms for 2048 rows.
        """
        with _openmp().limit(limits=1, user_api="openmp"):
            proba = self.pipeline.predict_proba(self.frame(columns))
        return np.asarray(proba, dtype=np.float64)[:, self.positive_index]


@functools.cache
def _openmp() -> Any:
    """The process's thread-pool controller, built once after a model loaded its OpenMP runtime (listing the
    loaded libraries costs milliseconds, too much per request)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class InstanceValidator:
    """Checks JSON instances against a card in plain Python (fast on one-row requests); pivots to columns."""

    def __init__(self, card: ModelCard) -> None:
        self.numeric = card.numeric
        self.categorical = card.categorical
        self.expected = frozenset(card.features)

    def columns(self, instances: list[Any]) -> Columns:
        """Validate every instance; raise InstanceError naming the first bad instance index and field."""
        cols: Columns = {name: [] for name in (*self.numeric, *self.categorical)}
        for i, inst in enumerate(instances):
            if type(inst) is not dict:
                raise InstanceError(f"instances[{i}]: expected an object of feature values, "
                                    f"found {_json_type(inst)}")
            if inst.keys() != self.expected:
                self._key_error(i, inst)
            for name in self.numeric:
                value = inst[name]
                kind = type(value)
                if kind is float:
                    if not math.isfinite(value):
                        raise InstanceError(f"instances[{i}].{name}: expected a finite number or null, "
                                            f"found {value}")
                elif kind is not int and value is not None:
                    raise InstanceError(f"instances[{i}].{name}: expected a number or null, "
                                        f"found {_json_type(value)} {_show(value)}")
                cols[name].append(value)
            for name in self.categorical:
                value = inst[name]
                if type(value) is not str and value is not None:
                    raise InstanceError(f"instances[{i}].{name}: expected a string or null, "
                                        f"found {_json_type(value)} {_show(value)}")
                cols[name].append(value)
        return cols

    def _key_error(self, i: int, inst: dict[str, Any]) -> None:
        missing = sorted(self.expected - inst.keys())
        unknown = sorted(inst.keys() - self.expected)
        parts = []
        if missing:
            parts.append(f"missing field(s) {missing}")
        if unknown:
            parts.append(f"unknown field(s) {unknown}")
        field_name = (missing or unknown)[0]
        raise InstanceError(f"instances[{i}].{field_name}: {'; '.join(parts)}; expected exactly the fields "
                            f"{sorted(self.expected)} (null for a missing value)")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def load_model_dir(model_dir: str | Path) -> LoadedModel:
    """Read ``model.joblib`` and ``model_card.json`` from a local directory."""
    root = Path(model_dir)
    for name in MODEL_FILES:
        if not (root / name).is_file():
            raise ModelLoadError(f"{root}: missing {name}; a model directory holds {list(MODEL_FILES)}")
    card_path = root / CARD_FILE
    try:
        card_data = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{card_path}: not valid JSON ({exc})") from exc
    card = ModelCard.from_dict(card_data, str(card_path))
    saved, installed = _major_minor(card.sklearn_version), _major_minor(sklearn.__version__)
    if saved != installed:
        # Pickles do not carry across scikit-learn minor versions: fail at startup, not on the first request.
        raise ModelLoadError(f"{root / MODEL_FILE}: saved with scikit-learn {card.sklearn_version}, this "
                             f"server has {sklearn.__version__}; major.minor must match")
    try:
        pipeline = joblib.load(root / MODEL_FILE)
    except Exception as exc:  # unpickling raises anything: a truncated file, a class that is not installed
        raise ModelLoadError(f"{root / MODEL_FILE}: cannot load ({type(exc).__name__}: {exc})") from exc
    return LoadedModel(pipeline=pipeline, card=card, source=str(root))


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def fetch_model_dir(uri: str, dest: str | Path | None = None) -> Path:
    """A local directory holding the model files: ``uri`` itself, or a download of a ``gs://`` prefix.

    Downloads go to a temporary directory first and are renamed into place, so a crash never leaves a
    directory with only one of the two files.
    """
    if not uri.startswith("gs://"):
        return Path(uri)
    from google.cloud import storage  # only the gs:// path needs it

    bucket_name, _, prefix = uri[len("gs://"):].partition("/")
    if not bucket_name:
        raise ModelLoadError(f"{uri}: expected gs://BUCKET/PATH")
    prefix = prefix.rstrip("/")
    target = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="ctloop-model-"))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        client = _storage_client(storage)
        bucket = client.bucket(bucket_name)
        for name in MODEL_FILES:
            blob = bucket.blob(f"{prefix}/{name}" if prefix else name)
            if not blob.exists():
                raise ModelLoadError(f"{uri}: missing {name}; a model directory holds {list(MODEL_FILES)}")
            blob.download_to_filename(str(staging / name))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _storage_client(storage: Any) -> Any:
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # The emulator needs no credentials; without this the client would look for default credentials.
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local"),
                              credentials=AnonymousCredentials())
    return storage.Client()
