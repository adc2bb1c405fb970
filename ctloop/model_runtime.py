"""What a trained model is on disk, and how it is loaded and scored: training writes it, the gate and the
prediction server load it.

A model directory holds:
- ``model.joblib``: a fitted scikit-learn ``Pipeline`` taking a DataFrame of the card's feature columns;
- ``model.onnx`` (optional): the same pipeline exported to ONNX, one input per feature column (numerics as
  float64 ``[N, 1]``, categoricals as strings ``[N, 1]`` with ``MISSING_CATEGORY`` for a missing value);
- ``onnx_check.json`` (written by the gate): whether ONNX Runtime agrees with scikit-learn on the test split;
  the ONNX model is served only when it does;
- ``model_card.json``: what the model is (see ``ModelCard``).

The pickled pipeline refers to this module's ``to_float64`` and ``to_category_strings`` by name: they are part
of the on-disk format and keep their names and behaviour.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctloop.errors import DataValidationError, ModelLoadError
from ctloop.features import FeatureSpec

if TYPE_CHECKING:
    import pandas as pd

# pandas and scikit-learn are imported where they are used: the registry reads this module's file names, and
# the ONNX request path needs neither.

MODEL_FILE = "model.joblib"
ONNX_FILE = "model.onnx"
ONNX_CHECK_FILE = "onnx_check.json"
CARD_FILE = "model_card.json"
# The files every model directory holds; the ONNX pair is optional.
MODEL_FILES = (CARD_FILE, MODEL_FILE)
OPTIONAL_FILES = (ONNX_FILE, ONNX_CHECK_FILE)
MISSING_CATEGORY = "__missing__"
# Largest |p_onnx - p_sklearn| on the test split for the ONNX model to be served.
ONNX_TOLERANCE = 1e-6
RUNTIMES = ("auto", "sklearn")

# Column values as the scoring functions take them: one sequence (list or array) per feature column.
Columns = Mapping[str, Sequence[Any]]


# ------------------------------------------------------------------------------------------------ coercions
def to_float64(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric inputs as float64; every missing marker (None, NaN, pd.NA) becomes NaN."""
    try:
        return frame.astype("float64")
    except (TypeError, ValueError):  # pd.NA in object or nullable columns; the slow path is rarely needed
        return frame.astype(object).where(frame.notna(), np.nan).astype("float64")


def to_category_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """Categorical inputs as Python strings, ``MISSING_CATEGORY`` for a missing value.

    Training (Parquet) and serving (JSON) may type the same category differently (bool vs "True"); strings
    make both agree, and a missing value is a category of its own.
    """
    # Column-wise: the same strings as ``str(value)`` of each present value, about 3x faster than a per-value
    # map (batch scoring calls it on every categorical column of every batch).
    values = frame.astype(object)
    return values.astype(str).where(values.notna(), MISSING_CATEGORY)


# ------------------------------------------------------------------------------------------------------ card
@dataclass(frozen=True)
class ModelCard:
    """The fields of ``model_card.json`` that loading and scoring rely on; ``data`` is the whole card.

    ``features`` is ``[{"name": ..., "type": "numeric"|"categorical"}, ...]``, ``feature_spec`` the
    ``FeatureSpec`` it was trained with, ``versions.sklearn`` the scikit-learn that saved ``model.joblib``.
    """

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    label: str
    threshold: float
    model_type: str
    sklearn_version: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(**self.data["feature_spec"])

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ModelCard:
        """Parse and check a card; ModelLoadError names ``source`` and the field at fault."""
        if not isinstance(data, dict):
            raise ModelLoadError(f"{source}: expected a JSON object, found {type(data).__name__}")
        numeric, categorical = _feature_lists(data.get("features"), source)
        both = set(numeric) & set(categorical)
        if both or not (numeric or categorical):
            raise ModelLoadError(f"{source}: 'features' must list at least one column and no column twice "
                                 f"(found in both lists: {sorted(both)})")
        threshold = data.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold < 1:
            raise ModelLoadError(f"{source}: field 'threshold' must be a number in (0, 1), found {threshold!r}")
        versions = data.get("versions")
        sklearn_version = versions.get("sklearn") if isinstance(versions, dict) else None
        for key, value in (("label", data.get("label")), ("model_type", data.get("model_type")),
                           ("versions.sklearn", sklearn_version)):
            if value in (None, ""):
                raise ModelLoadError(f"{source}: missing field {key!r}")
        spec = data.get("feature_spec")
        try:
            FeatureSpec(**spec)
        except TypeError as exc:
            raise ModelLoadError(f"{source}: field 'feature_spec' must be an object of FeatureSpec fields, "
                                 f"found {spec!r} ({exc})") from None
        return cls(numeric=numeric, categorical=categorical, label=str(data["label"]), threshold=float(threshold),
                   model_type=str(data["model_type"]), sklearn_version=str(sklearn_version), data=data)


def _feature_lists(feats: Any, source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    lists: dict[str, list[str]] = {"numeric": [], "categorical": []}
    if not isinstance(feats, list):
        raise ModelLoadError(f"{source}: field 'features' must be a list of {{\"name\": ..., \"type\": "
                             f"\"numeric\"|\"categorical\"}}, found {feats!r}")
    for i, item in enumerate(feats):
        kind = item.get("type") if isinstance(item, dict) else None
        name = item.get("name") if isinstance(item, dict) else None
        if kind not in lists or not isinstance(name, str) or not name:
            raise ModelLoadError(f"{source}: field 'features[{i}]' must be {{\"name\": ..., \"type\": "
                                 f"\"numeric\"|\"categorical\"}}, found {item!r}")
        lists[kind].append(name)
    return tuple(lists["numeric"]), tuple(lists["categorical"])


def card_features(numeric: Sequence[str], categorical: Sequence[str]) -> list[dict[str, str]]:
    """The card's ``features`` field for these columns."""
    return [{"name": c, "type": "numeric"} for c in numeric] + [{"name": c, "type": "categorical"}
                                                                 for c in categorical]


def read_card(model_dir: str | Path) -> ModelCard:
    """The card of a model directory (no model file is opened)."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise ModelLoadError(f"model directory {Path(model_dir)}: {CARD_FILE} not found")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a valid model card (invalid JSON: {exc})") from exc
    return ModelCard.from_dict(data, str(path))


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


# -------------------------------------------------------------------------------------------- loaded model
@dataclass(frozen=True)
class LoadedModel:
    """A model directory, loaded: its card, the scikit-learn pipeline, and the ONNX session when it is served.

    ``runtime`` is what ``probabilities`` scores with ("onnx" or "sklearn"); ``runtime_reason`` says why.
    """

    card: ModelCard
    model_dir: Path
    runtime: str = "sklearn"
    runtime_reason: str = ""
    session: Any = None

    @functools.cached_property
    def pipeline(self) -> Any:
        """The fitted scikit-learn pipeline. A model served by ONNX Runtime unpickles it on first use only: its
        scoring does not need it, and importing scikit-learn costs a fresh process about a second."""
        return _unpickle_pipeline(self.model_dir / MODEL_FILE)

    @property
    def spec(self) -> FeatureSpec:
        return self.card.spec

    @property
    def features(self) -> list[str]:
        return list(self.card.features)

    @property
    def threshold(self) -> float:
        return self.card.threshold

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """P(label = 1) by scikit-learn for the rows of ``frame`` (it must hold the feature columns)."""
        missing = [c for c in self.card.features if c not in frame.columns]
        if missing:
            raise DataValidationError(f"model {self.model_dir}: input lacks feature column(s) {missing}; "
                                      f"found {list(frame.columns)}")
        with _one_openmp_thread():
            proba = self.pipeline.predict_proba(frame[list(self.card.features)])
        return np.asarray(proba, dtype=np.float64)[:, self._positive_index]

    def probabilities(self, columns: Columns) -> np.ndarray:
        """P(label = 1) per row of ``columns`` (numbers or None; strings or None), with ``self.runtime``."""
        if self.session is not None:
            return onnx_probabilities(self.session, self.card, columns)
        import pandas as pd

        data: dict[str, Any] = {name: np.asarray(columns[name], dtype=np.float64) for name in self.card.numeric}
        for name in self.card.categorical:
            data[name] = pd.array(columns[name], dtype="str")
        frame = pd.DataFrame(data, columns=list(self.card.features))
        with _one_openmp_thread():
            proba = self.pipeline.predict_proba(frame)
        return np.asarray(proba, dtype=np.float64)[:, self._positive_index]

    @functools.cached_property
    def _positive_index(self) -> int:
        classes = list(getattr(self.pipeline, "classes_", [0, 1]))
        if len(classes) != 2 or 1 not in classes:
            raise ModelLoadError(f"model {self.model_dir}: expected classes [0, 1], found {classes}")
        return classes.index(1)


def _one_openmp_thread() -> Any:
    """Scoring runs on one OpenMP thread: gradient-boosted trees meet a barrier per tree, and on a busy 2-core
    machine one descheduled peer turned a 5 ms request into seconds; one thread costs little at request
    sizes."""
    return _openmp().limit(limits=1, user_api="openmp")


@functools.cache
def _openmp() -> Any:
    """Built once, after a model loaded its OpenMP runtime: listing the loaded libraries costs milliseconds."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def load_model(model_dir: str | Path, runtime: str = "auto") -> LoadedModel:
    """Load a model directory.

    ``runtime="auto"`` scores with ONNX Runtime when ``model.onnx`` is there and the gate recorded that it
    agrees with scikit-learn, else with scikit-learn (``runtime_reason`` says why); ``"sklearn"`` always uses
    scikit-learn. Raises ModelLoadError if a file is missing or unreadable, the card is invalid, or the model
    was saved by a scikit-learn whose major.minor differs from the installed one (pickles do not carry across).
    An ONNX-served model's pickle is read when ``pipeline`` is first used, and raises then.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: expected one of {list(RUNTIMES)}, found {runtime!r}")
    path = Path(model_dir)
    for name in MODEL_FILES:
        if not (path / name).is_file():
            raise ModelLoadError(f"model directory {path}: {name} not found; a model directory holds "
                                 f"{list(MODEL_FILES)}")
    card = read_card(path)
    installed = _installed_sklearn()
    if _major_minor(card.sklearn_version) != _major_minor(installed):
        raise ModelLoadError(
            f"{path / MODEL_FILE}: saved with scikit-learn {card.sklearn_version}, installed is {installed}; "
            f"major.minor must match ({_major_minor(card.sklearn_version)} != {_major_minor(installed)})"
        )
    if runtime == "sklearn":
        return _sklearn_model(card, path, "scikit-learn requested")
    reason = onnx_unusable_reason(path)
    if reason:
        return _sklearn_model(card, path, reason)
    try:
        session = onnx_session(path / ONNX_FILE)
    except Exception as exc:  # noqa: BLE001 - any failure to build the session means scikit-learn serves
        return _sklearn_model(card, path, f"{ONNX_FILE} cannot be loaded: {type(exc).__name__}: {exc}")
    return LoadedModel(card=card, model_dir=path, runtime="onnx",
                       runtime_reason=f"{ONNX_FILE} agrees with scikit-learn on the test split", session=session)


def _sklearn_model(card: ModelCard, path: Path, reason: str) -> LoadedModel:
    """A model scored by scikit-learn, its pickle read and its classes checked now, not on the first request."""
    model = LoadedModel(card=card, model_dir=path, runtime="sklearn", runtime_reason=reason)
    model._positive_index  # noqa: B018
    return model


def _unpickle_pipeline(model_path: Path) -> Any:
    import joblib

    try:
        pipeline = joblib.load(model_path)
    except Exception as exc:  # unpickling raises anything: a truncated file, a class or function that is gone
        raise ModelLoadError(f"{model_path}: cannot load ({type(exc).__name__}: {exc})") from exc
    if not hasattr(pipeline, "predict_proba"):
        raise ModelLoadError(f"{model_path}: holds a {type(pipeline).__name__}, which has no predict_proba")
    return pipeline


@functools.cache
def _installed_sklearn() -> str:
    """The installed scikit-learn's version, read from its package metadata: without importing it."""
    from importlib.metadata import version

    return version("scikit-learn")


# ---------------------------------------------------------------------------------------------------- ONNX
def onnx_unusable_reason(model_dir: str | Path) -> str:
    """Why ``model.onnx`` must not be served ('' when it may): absent, not checked, or checked and disagreeing."""
    path = Path(model_dir)
    if not (path / ONNX_FILE).is_file():
        note = _export_note(path)
        return f"no {ONNX_FILE} in the model directory" + (f" ({note})" if note else "")
    check = read_onnx_check(path)
    if check is None:
        return f"{ONNX_FILE} has not been checked against scikit-learn ({ONNX_CHECK_FILE} not found)"
    if not check.get("agrees"):
        return str(check.get("reason") or f"{ONNX_CHECK_FILE} says the ONNX model disagrees with scikit-learn")
    return ""


def _export_note(model_dir: Path) -> str:
    """The card's ``onnx.reason``: why training wrote no ONNX model ('' if it says nothing)."""
    try:
        onnx = json.loads((model_dir / CARD_FILE).read_text()).get("onnx") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    return str(onnx.get("reason") or "") if isinstance(onnx, dict) else ""


def read_onnx_check(model_dir: str | Path) -> dict[str, Any] | None:
    path = Path(model_dir) / ONNX_CHECK_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"agrees": False, "reason": f"{path}: not valid JSON"}
    return data if isinstance(data, dict) else {"agrees": False, "reason": f"{path}: not a JSON object"}


def onnx_session(path: str | Path) -> Any:
    """An ONNX Runtime session sized for request-sized inputs: one thread, no spinning between calls."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


_PROBABILITIES = ["probabilities"]


def onnx_inputs(card: ModelCard, columns: Columns) -> dict[str, np.ndarray]:
    """The ONNX model's inputs: ``[N, 1]`` float64 per numeric column (None -> NaN), ``[N, 1]`` strings per
    categorical column (None -> MISSING_CATEGORY)."""
    feeds: dict[str, np.ndarray] = {}
    for name in card.numeric:
        feeds[name] = np.asarray(columns[name], dtype=np.float64).reshape(-1, 1)
    for name in card.categorical:
        values = columns[name]
        feeds[name] = np.array([MISSING_CATEGORY if v is None else v for v in values],
                               dtype=object).reshape(-1, 1)
    return feeds


def onnx_probabilities(session: Any, card: ModelCard, columns: Columns) -> np.ndarray:
    """P(label = 1) per row from an ONNX session built by ``onnx_session``."""
    proba = session.run(_PROBABILITIES, onnx_inputs(card, columns))[0]
    return np.asarray(proba, dtype=np.float64)[:, 1]


def frame_columns(card: ModelCard, frame: pd.DataFrame) -> dict[str, list[Any]]:
    """A DataFrame's feature columns as ``Columns`` the way a request carries them (None for missing)."""
    out: dict[str, list[Any]] = {}
    numeric = to_float64(frame[list(card.numeric)]) if card.numeric else None
    for name in card.numeric:
        out[name] = [None if math.isnan(v) else v for v in numeric[name].tolist()]
    for name in card.categorical:
        out[name] = [None if v == MISSING_CATEGORY else v
                     for v in to_category_strings(frame[[name]])[name].tolist()]
    return out


def check_onnx_agreement(model: LoadedModel, frame: pd.DataFrame, where: str) -> dict[str, Any]:
    """Score ``frame`` with scikit-learn and with ``model.onnx``; the verdict the gate writes beside the model.

    ``agrees`` is true when every probability differs by at most ``ONNX_TOLERANCE``; ``reason`` says why not.
    """
    base = {"tolerance": ONNX_TOLERANCE, "rows": len(frame), "checked_on": where}
    onnx_path = model.model_dir / ONNX_FILE
    if not onnx_path.is_file():
        note = _export_note(model.model_dir)
        return {**base, "agrees": False, "max_abs_diff": None,
                "reason": f"no {ONNX_FILE} in the model directory" + (f" ({note})" if note else "")}
    expected = model.predict_proba(frame)
    try:
        got = onnx_probabilities(onnx_session(onnx_path), model.card, frame_columns(model.card, frame))
    except Exception as exc:  # noqa: BLE001 - any ONNX failure means scikit-learn serves
        return {**base, "agrees": False, "max_abs_diff": None,
                "reason": f"ONNX Runtime cannot score {where}: {type(exc).__name__}: {exc}"}
    diff = np.abs(got - expected)
    worst = float(np.nanmax(diff)) if np.isfinite(diff).all() else math.inf
    if worst <= ONNX_TOLERANCE:
        return {**base, "agrees": True, "max_abs_diff": worst, "reason": ""}
    return {**base, "agrees": False, "max_abs_diff": worst if math.isfinite(worst) else None,
            "reason": f"ONNX and scikit-learn probabilities differ by up to {worst:.3g} on {where} "
                      f"({int((diff > ONNX_TOLERANCE).sum())} of {len(frame)} rows above {ONNX_TOLERANCE:g})"}


# The model-card fields that decide what a trained model is; run ids, timestamps and metrics do not.
_FINGERPRINT_FIELDS = ("model_type", "hyperparameters", "seed", "threshold", "category_min_frequency", "label",
                       "features", "feature_spec")


def model_fingerprint(card: dict[str, Any]) -> str:
    """A short hash of what determines the model: training data, features, estimator and its parameters.

    Two runs on the same data with the same settings train the same model; the registry uses this to keep one
    version of it instead of a duplicate per run.
    """
    basis = {k: card.get(k) for k in _FINGERPRINT_FIELDS}
    basis["training_data_checksum"] = (card.get("training_data") or {}).get("checksum")
    basis["sklearn"] = (card.get("versions") or {}).get("sklearn")
    blob = json.dumps(basis, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]
