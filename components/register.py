"""register: add the gated model as a new version of the configured model in the registry.

The model files are first copied out of the pipeline root into the registry's models location
(``gcp.model_bucket`` on Vertex AI, ``<local.workdir>/models`` locally), under ``<model>/run-<run id>``: cleaning
old pipeline runs never breaks the champion. Then the copy is registered (Vertex AI Model Registry, with the ctloop
serving image as its container, or the SQLite registry). Idempotent per pipeline run: the version carries the
alias ``run-<run id>`` (and, locally, the run id as its run key), and a retried step returns that version instead
of registering a second one. Idempotent per model too: the version also carries ``fp-<fingerprint>`` (training
data, features, estimator, parameters), so a rerun on the same data with the same settings returns the version
that already holds that model. The step outputs a ``google.VertexModel`` artifact naming the version.
"""


import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kfp.dsl import Input, Metrics, Model, Output

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from components.vertex_artifacts import VertexModel, name_resource
from ctloop.config import Settings
from ctloop.online_stores import online_store_environment
from ctloop.registry import open_registry
from ctloop.registry.base import MODEL_FILES


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def register(
    config: dict,
    run_id: str,
    model: Input[Model],
    metrics: Input[Metrics],
    vertex_model: Output[VertexModel],
) -> NamedTuple("Outputs", model_resource=str, version=str):
    """Register the model as a new version; returns the model resource (local: its name) and the version."""
    from components.register import run_register_step
    from ctloop.steps import run_step

    return run_step(run_register_step, config, run_id, model, metrics, vertex_model)


@dataclass(frozen=True)
class RegisterResult:
    model_name: str  # cloud: projects/.../models/ID; local: the model's display name
    version: str
    created: bool  # False when this run's version already existed
    artifact_uri: str


def run_register_step(config: dict, run_id: str, model: Any, metrics: Any,
                      vertex_model: Any = None) -> tuple[str, str]:
    """The component body: settings and artifacts in, (model resource, version) out."""
    settings = Settings.from_param(config)
    lineage = {k: v for k, v in dict(model.metadata or {}).items() if isinstance(v, str | int | float | bool)}
    lineage.update({"model_uri": model.uri, "metrics_uri": metrics.uri, "run_id": run_id})
    result = run_register(settings, run_id, model.path, model.uri, numeric_metrics(metrics.metadata), lineage)
    if vertex_model is not None:
        resource = f"{result.model_name}@{result.version}"
        name_resource(vertex_model, resource, open_registry(settings).resource_url(resource))
    return result.model_name, result.version


def numeric_metrics(metadata: dict[str, Any] | None) -> dict[str, float]:
    """The number-valued entries of a Metrics artifact's metadata (its logged metrics)."""
    return {k: float(v) for k, v in dict(metadata or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def run_register(settings: Settings, run_id: str, model_dir: str | Path, model_uri: str,
                 metrics: dict[str, float], lineage: dict[str, Any]) -> RegisterResult:
    """Copy ``model_dir`` to the models location and register the copy as this run's version of the model.

    ``model_uri`` (the pipeline artifact's URI) is kept in the version's lineage, not served from.
    """
    if not run_id:
        raise ValueError("run_id is empty: it identifies the model version this run registers")
    missing = [name for name in MODEL_FILES if not (Path(model_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model directory {model_dir}: missing {missing}; the train step writes "
                                f"{list(MODEL_FILES)}")
    aliases = version_aliases(run_id, Path(model_dir))
    registry = open_registry(settings)
    for alias in aliases:  # this run's version, else the version holding the same model
        done = registry.find_version(alias)
        if done is not None:
            return RegisterResult(done.model_name, done.version, False, done.artifact_uri)
    stored = registry.store_model(Path(model_dir), aliases[0])
    version = registry.create_version(stored, run_id, aliases, _version_labels(settings, run_id, lineage),
                                      metrics, {**lineage, "model_uri": model_uri},
                                      serving_environment(settings) | online_store_environment(settings))
    return RegisterResult(version.model_name, version.version, True, version.artifact_uri)


def version_aliases(run_id: str, model_dir: Path) -> list[str]:
    """``run-<run id>`` and ``fp-<model fingerprint>``: each names at most one version of the model."""
    from ctloop.model_runtime import CARD_FILE, model_fingerprint
    from ctloop.vertex import run_alias

    card = json.loads((model_dir / CARD_FILE).read_text())
    return [run_alias(run_id), f"fp-{model_fingerprint(card)}"]


def _version_labels(settings: Settings, run_id: str, lineage: dict[str, Any]) -> dict[str, str]:
    from ctloop.vertex import labels

    return labels(settings.labels, ctloop_run=run_id, ctloop_pipeline="ctloop-training",
                  ctloop_data_checksum=str(lineage.get("training_data_checksum") or ""),
                  ctloop_git_sha=str(lineage.get("git_sha") or ""),
                  ctloop_model_type=str(lineage.get("model_type") or settings.model.type))


def serving_environment(settings: Settings) -> dict[str, str]:
    """The serving container's prediction-log settings (empty when logging is off).

    The variables belong to the model version, so its smoke traffic on the staging endpoint lands in the same log
    as production traffic; the smoke test sends only ``deploy.smoke_instances`` rows.
    """
    from ctloop.prediction_log import log_root

    rate = settings.monitoring.sample_rate
    if rate <= 0:
        return {}
    return {"CTLOOP_PREDICTION_LOG_RATE": str(rate),
            "CTLOOP_PREDICTION_LOG_URI": log_root(settings, settings.deploy.production_endpoint)}
