"""The aiplatform SDK's Custom Prediction Routine (CPR) server, started without Docker, for the serving suite.

What a Vertex user would deploy instead of ctloop's server: ``google.cloud.aiplatform.prediction``'s model
server with its ``PredictionHandler`` and a ``SklearnPredictor`` loading the same ``model.joblib``. The stock
``SklearnPredictor`` passes ``np.asarray(instances)`` to ``predict``; the model's pipeline selects its columns
by name and answers probabilities, so ``FramePredictor`` (the CPR way: subclass the predictor) builds the
DataFrame and calls ``predict_proba``. The server runs in its own venv (``.venv-cpr``, made here on first
use from bench/cpr-requirements.txt), since the SDK's ``prediction`` extra pins fastapi <= 0.124.4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.workspace import REPO

VENV = REPO / ".venv-cpr"
REQUIREMENTS = REPO / "bench" / "cpr-requirements.txt"
_UV = REPO / ".venv" / "bin" / "uv"


def ensure_venv(echo: Any = print) -> Path:
    """The CPR venv's python, creating the venv when it is missing or older than its requirements."""
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    if marker.is_file() and marker.stat().st_mtime >= REQUIREMENTS.stat().st_mtime:
        return python
    echo(f"  serving: creating {VENV.name} for the CPR server ({REQUIREMENTS.name}) ...")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(VENV)], check=True)
    subprocess.run([str(_UV), "pip", "install", "--quiet", "--python", str(python), "-r", str(REQUIREMENTS)],
                   check=True)
    marker.touch()
    return python


def server_command(python: Path) -> list[str]:
    return [str(python), "-m", "google.cloud.aiplatform.prediction.model_server"]


def server_env(model_dir: Path, port: int, workers: int) -> dict[str, str]:
    """The environment Vertex gives a CPR container, pointing at a local model directory."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONHOME"))},
        "AIP_STORAGE_URI": str(model_dir),
        "AIP_HTTP_PORT": str(port),
        "AIP_HEALTH_ROUTE": "/health",
        "AIP_PREDICT_ROUTE": "/predict",
        "HANDLER_MODULE": "google.cloud.aiplatform.prediction.handler",
        "HANDLER_CLASS": "PredictionHandler",
        "PREDICTOR_MODULE": "bench.cpr",
        "PREDICTOR_CLASS": "FramePredictor",
        "VERTEX_CPR_WEB_CONCURRENCY": str(workers),
        "PYTHONPATH": str(REPO),  # the pickle refers to ctloop.model_runtime; this module is the predictor
    }


def _predictor_base() -> type:
    try:
        from google.cloud.aiplatform.prediction.sklearn.predictor import SklearnPredictor
    except ImportError:  # imported by the project's venv, which does not run the CPR server
        return object
    return SklearnPredictor


class FramePredictor(_predictor_base()):  # type: ignore[misc]
    """``SklearnPredictor`` for a pipeline that takes a DataFrame of named feature columns."""

    def load(self, artifacts_uri: str, **kwargs: Any) -> None:
        super().load(artifacts_uri, allowed_extensions=[".joblib"], **kwargs)
        card = json.loads(Path("model_card.json").read_text())  # copied into the working directory by load
        self._numeric = [f["name"] for f in card["features"] if f["type"] == "numeric"]
        self._categorical = [f["name"] for f in card["features"] if f["type"] == "categorical"]

    def preprocess(self, prediction_input: dict) -> Any:
        import pandas as pd

        frame = pd.DataFrame(prediction_input["instances"], columns=self._numeric + self._categorical)
        return frame.astype({**{c: "float64" for c in self._numeric}, **{c: "str" for c in self._categorical}})

    def predict(self, instances: Any) -> Any:
        return self._model.predict_proba(instances)[:, 1]

    def postprocess(self, prediction_results: Any) -> dict:
        return {"predictions": prediction_results.tolist()}
