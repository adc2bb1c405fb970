"""register: add the gated model as a new version of the configured model in the registry.

Cloud: Vertex AI Model Registry (``Model.upload`` as a version of the existing model, serving container = the
ctloop serving image). Local: the SQLite registry, with the model files copied into the registry's own store.
Idempotent per pipeline run: the version carries the alias ``run-<run id>`` (and, locally, the run id as its
run key), and a retried step returns that version instead of registering a second one. Idempotent per model
too: the version also carries ``fp-<fingerprint>`` (training data, features, estimator, parameters), so a rerun
on the same data with the same settings returns the version that already holds that model.
"""


import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kfp.dsl import Input, Metrics, Model

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.model_runtime import MODEL_FILES, OPTIONAL_FILES

PREDICT_ROUTE = "/predict"
HEALTH_ROUTE = "/health"
SERVING_PORT = 8080


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def register(
    config: dict,
    run_id: str,
    model: Input[Model],
    metrics: Input[Metrics],
) -> NamedTuple("Outputs", model_resource=str, version=str):
    """Register the model as a new version; returns the model resource (local: its name) and the version."""
    from components.register import run_register_step

    return run_register_step(config, run_id, model, metrics)


@dataclass(frozen=True)
class RegisterResult:
    model_name: str  # cloud: projects/.../models/ID; local: the model's display name
    version: str
    created: bool  # False when this run's version already existed
    artifact_uri: str


def run_register_step(config: dict, run_id: str, model: Any, metrics: Any) -> tuple[str, str]:
    """The component body: settings and artifacts in, (model resource, version) out."""
    settings = Settings.from_param(config)
    lineage = {k: v for k, v in dict(model.metadata or {}).items() if isinstance(v, str | int | float | bool)}
    lineage.update({"model_uri": model.uri, "metrics_uri": metrics.uri, "run_id": run_id})
    result = run_register(settings, run_id, model.path, model.uri, numeric_metrics(metrics.metadata), lineage)
    return result.model_name, result.version


def numeric_metrics(metadata: dict[str, Any] | None) -> dict[str, float]:
    """The number-valued entries of a Metrics artifact's metadata (its logged metrics)."""
    return {k: float(v) for k, v in dict(metadata or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def run_register(settings: Settings, run_id: str, model_dir: str | Path, model_uri: str,
                 metrics: dict[str, float], lineage: dict[str, Any]) -> RegisterResult:
    """Register ``model_dir`` (local) or ``model_uri`` (cloud) as this run's version of the model."""
    if not run_id:
        raise ValueError("run_id is empty: it identifies the model version this run registers")
    missing = [name for name in MODEL_FILES if not (Path(model_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model directory {model_dir}: missing {missing}; the train step writes "
                                f"{list(MODEL_FILES)}")
    aliases = version_aliases(run_id, Path(model_dir))
    if settings.backend == "cloud":
        return _register_vertex(settings, run_id, model_uri, metrics, lineage, aliases)
    return _register_local(settings, run_id, Path(model_dir), metrics, lineage, aliases)


def version_aliases(run_id: str, model_dir: Path) -> list[str]:
    """``run-<run id>`` and ``fp-<model fingerprint>``: each names at most one version of the model."""
    from ctloop.modeling import CARD_FILE, model_fingerprint
    from ctloop.vertex import run_alias

    card = json.loads((model_dir / CARD_FILE).read_text())
    return [run_alias(run_id), f"fp-{model_fingerprint(card)}"]


def _version_labels(settings: Settings, run_id: str, lineage: dict[str, Any]) -> dict[str, str]:
    from ctloop.vertex import labels

    return labels(settings.labels, ctloop_run=run_id, ctloop_pipeline="ctloop-training",
                  ctloop_data_checksum=str(lineage.get("training_data_checksum") or ""),
                  ctloop_git_sha=str(lineage.get("git_sha") or ""),
                  ctloop_model_type=str(lineage.get("model_type") or settings.model.type))


# -- local ------------------------------------------------------------------------------------------------


def _register_local(settings: Settings, run_id: str, model_dir: Path, metrics: dict[str, float],
                    lineage: dict[str, Any], aliases: list[str]) -> RegisterResult:
    from ctloop.registry import LocalRegistry

    name = settings.model.display_name
    registry = LocalRegistry(settings.local.registry_db)
    existing = registry.find_by_run_key(name, run_id) or registry.get_alias(name, aliases[1])
    if existing is not None:
        return RegisterResult(name, str(existing.version_id), False, existing.artifact_uri)
    alias = aliases[0]
    # The registry keeps its own copy, as Vertex does: cleaning the pipeline root must not break serving.
    stored = _store_copy(model_dir, settings.local.path("models", name, alias))
    version = registry.register_version(name, str(stored), run_key=run_id,
                                        labels=_version_labels(settings, run_id, lineage), metrics=metrics,
                                        lineage=lineage, aliases=aliases)
    return RegisterResult(name, str(version.version_id), True, version.artifact_uri)


def _store_copy(source: Path, target: Path) -> Path:
    """Copy the model files to ``target`` via a temp dir renamed into place; a complete copy is kept."""
    if all((target / name).is_file() for name in MODEL_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name in MODEL_FILES:
            shutil.copy2(source / name, tmp / name)
        for name in OPTIONAL_FILES:  # the ONNX export and the gate's verdict on it, when there
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- Vertex AI ------------------------------------------------------------------------------------------


def _register_vertex(settings: Settings, run_id: str, model_uri: str, metrics: dict[str, float],
                     lineage: dict[str, Any], aliases: list[str]) -> RegisterResult:
    from google.api_core import exceptions as gexc
    from google.cloud import aiplatform

    from ctloop.vertex import Where, find_parent_model, get_model_version, resource_id

    if not model_uri.startswith("gs://"):
        raise ValueError(f"model uri {model_uri!r}: Vertex AI registers models from gs:// URIs")
    where = Where(settings.gcp.project, settings.gcp.region)
    name = settings.model.display_name

    def existing(parent_name: str) -> Any:
        for alias in aliases:  # this run's version, else the version holding the same model
            done = get_model_version(parent_name, alias, where)
            if done is not None:
                return RegisterResult(parent_name, str(done.version_id), False, done.uri or model_uri)
        return None

    parent = find_parent_model(name, where)
    parent_name = parent.resource_name if parent is not None else None
    if parent_name is not None and (found := existing(parent_name)) is not None:
        return found

    def upload(**kw: Any) -> Any:
        # Fresh keyword arguments per call: the SDK appends "default" to the version_aliases list it is given.
        return aiplatform.Model.upload(version_aliases=list(aliases), **common, **kw)

    common = dict(
        display_name=name,
        artifact_uri=model_uri,
        serving_container_image_uri=settings.gcp.serving_image,
        serving_container_predict_route=PREDICT_ROUTE,
        serving_container_health_route=HEALTH_ROUTE,
        serving_container_ports=[SERVING_PORT],
        serving_container_environment_variables=serving_environment(settings) or None,
        version_description=_describe(run_id, metrics),
        labels=_version_labels(settings, run_id, lineage),
        sync=True,
        **where.kw,
    )
    if parent_name is not None:
        # Never the default version: traffic and the champion alias move only in the deploy step.
        model = upload(parent_model=parent_name, is_default_version=False)
    else:
        model_id = resource_id(name)
        try:
            # A fixed model id: two first runs racing to create the model cannot make two of them.
            model = upload(model_id=model_id)
        except gexc.Conflict:
            parent_name = f"{where.parent}/models/{model_id}"
            if (found := existing(parent_name)) is not None:
                return found
            model = upload(parent_model=parent_name, is_default_version=False)
    return RegisterResult(model.resource_name, str(model.version_id), True, model_uri)


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


def _describe(run_id: str, metrics: dict[str, float]) -> str:
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if not k.startswith("champion_"))
    return f"ctloop run {run_id}" + (f": {shown}" if shown else "")
