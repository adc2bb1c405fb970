"""``python -m serving``: the Vertex AI custom-container entry point.

Vertex sets ``AIP_HTTP_PORT``, ``AIP_HEALTH_ROUTE``, ``AIP_PREDICT_ROUTE``, ``AIP_STORAGE_URI`` (a ``gs://``
copy of the model's artifact directory) and ``AIP_DEPLOYED_MODEL_ID``. ``AIP_STORAGE_URI`` may also be a local
directory, which is how the container is run by hand. ``CTLOOP_MAX_INSTANCES`` caps instances per request;
``CTLOOP_SERVING_RUNTIME=sklearn`` serves with scikit-learn even when the gate approved the ONNX model.

Online features: ``CTLOOP_FEATURE_VIEW`` (set at registration in the cloud) names the Vertex AI Feature Store
view the server looks entities' history states up in (ctloop/online_store_vertex.py).

Prediction logging: ``CTLOOP_PREDICTION_LOG_RATE`` (share of requests, default 0 = off) and
``CTLOOP_PREDICTION_LOG_URI`` (the endpoint's log root, ``gs://bucket/prefix`` or a directory; required when the
rate is above 0); optional ``CTLOOP_PREDICTION_LOG_FLUSH_ROWS`` and ``CTLOOP_PREDICTION_LOG_FLUSH_SECONDS``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from ctloop.errors import ModelLoadError
from ctloop.model_runtime import RUNTIMES
from ctloop.online_store import FEATURE_VIEW_ENV
from ctloop.online_store_vertex import VertexFeatureStore
from serving.app import (
    DEFAULT_HEALTH_ROUTE,
    DEFAULT_MAX_INSTANCES,
    DEFAULT_PREDICT_ROUTE,
    ServedModel,
    create_app,
)
from serving.model import fetch_model_dir
from serving.prediction_log import PredictionLogConfig


@dataclass(frozen=True)
class ContainerEnv:
    storage_uri: str
    port: int
    predict_route: str
    health_route: str
    deployed_model_id: str
    max_instances: int
    prediction_log: PredictionLogConfig | None = None
    runtime: str = "auto"
    feature_view: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ContainerEnv:
        uri = env.get("AIP_STORAGE_URI", "")
        if not uri:
            raise ValueError("AIP_STORAGE_URI is not set: expected the model directory (gs://... or a path)")
        return cls(
            storage_uri=uri,
            port=_int(env, "AIP_HTTP_PORT", 8080),
            predict_route=env.get("AIP_PREDICT_ROUTE") or DEFAULT_PREDICT_ROUTE,
            health_route=env.get("AIP_HEALTH_ROUTE") or DEFAULT_HEALTH_ROUTE,
            deployed_model_id=env.get("AIP_DEPLOYED_MODEL_ID") or "0",
            max_instances=_int(env, "CTLOOP_MAX_INSTANCES", DEFAULT_MAX_INSTANCES),
            prediction_log=_prediction_log(env),
            runtime=_runtime(env),
            feature_view=env.get(FEATURE_VIEW_ENV, ""),
        )


def _runtime(env: Mapping[str, str]) -> str:
    runtime = env.get("CTLOOP_SERVING_RUNTIME") or "auto"
    if runtime not in RUNTIMES:
        raise ValueError(f"CTLOOP_SERVING_RUNTIME={runtime!r}: expected one of {list(RUNTIMES)}")
    return runtime


def _prediction_log(env: Mapping[str, str]) -> PredictionLogConfig | None:
    raw = env.get("CTLOOP_PREDICTION_LOG_RATE") or "0"
    try:
        rate = float(raw)
    except ValueError:
        raise ValueError(f"CTLOOP_PREDICTION_LOG_RATE={raw!r}: expected a number in [0, 1]") from None
    if rate <= 0:
        return None
    uri = env.get("CTLOOP_PREDICTION_LOG_URI", "")
    if not uri:
        raise ValueError("CTLOOP_PREDICTION_LOG_URI is not set: expected gs://bucket/prefix (or a directory) "
                         f"since CTLOOP_PREDICTION_LOG_RATE={raw}")
    seconds = env.get("CTLOOP_PREDICTION_LOG_FLUSH_SECONDS")
    try:
        flush_seconds = float(seconds) if seconds else 30.0
    except ValueError:
        raise ValueError(f"CTLOOP_PREDICTION_LOG_FLUSH_SECONDS={seconds!r}: expected a number") from None
    return PredictionLogConfig(uri=uri, sample_rate=rate,
                               flush_rows=_int(env, "CTLOOP_PREDICTION_LOG_FLUSH_ROWS", 2000),
                               flush_seconds=flush_seconds)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


def main(env: Mapping[str, str] | None = None) -> None:
    import uvicorn

    try:
        cfg = ContainerEnv.from_env(os.environ if env is None else env)
        model_dir = fetch_model_dir(cfg.storage_uri)
        app = create_app(
            [ServedModel(deployed_id=cfg.deployed_model_id, model_dir=model_dir, traffic_percent=100,
                         runtime=cfg.runtime)],
            predict_route=cfg.predict_route,
            health_route=cfg.health_route,
            max_instances=cfg.max_instances,
            prediction_log=cfg.prediction_log,
            online_store=VertexFeatureStore.for_view(cfg.feature_view) if cfg.feature_view else None,
        )
    except (ValueError, ModelLoadError) as exc:
        print(f"serving: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # Vertex routes traffic to the container's port on every interface.
    uvicorn.run(app, host="0.0.0.0", port=cfg.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
