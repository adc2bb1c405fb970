"""Launching pipeline runs, written once: job ids, pipeline parameters, labels, and the one call that creates a
Vertex AI ``PipelineJob``.

Every launch goes through here: the CLI (``ctloop run/submit/monitor --target vertex``), the monitoring
pipeline's ``launch_training`` step, and the trigger function (whose bundle carries this module, see
cloudbuild/bundle_trigger.py). The same inputs therefore make the same request, whoever sends it.

Idempotency: a run is named by its job id, derived from what caused it (an object generation, a batch folder, a
monitoring run, a schedule tick). Creating an existing job answers 409 Conflict, which means "already
launched" and is success. ``snapshot_time`` is fixed here, once per launch, so every retry of every step of the
run reads the same data window.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from ctloop.errors import CtloopError

if TYPE_CHECKING:
    from ctloop.config import Settings

Pipeline = Literal["training", "monitoring", "scoring"]
# The compiled pipelines' names (pipelineInfo.name), also the PipelineJob display names.
PIPELINE_NAMES: dict[str, str] = {"training": "ctloop-training", "monitoring": "ctloop-monitoring",
                                  "scoring": "ctloop-scoring"}
JOB_PREFIXES: dict[str, str] = {"training": "ctloop-train", "monitoring": "ctloop-monitor", "scoring": "ctloop-score"}

_JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")
_LABEL_BAD = re.compile(r"[^a-z0-9_-]+")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


class LaunchError(CtloopError):
    """A run cannot be launched as configured (the message names the setting)."""


@dataclass(frozen=True)
class Launched:
    job_id: str
    job_name: str  # cloud: the PipelineJob resource name; local: the run's log file
    created: bool  # False: the job id existed already (a duplicate launch), which is success too


# ------------------------------------------------------------------------------------------------- labels
def label_value(text: str) -> str:
    """A GCP label value (Vertex, BigQuery, Dataproc): lowercase letters, digits, ``_`` and ``-``, at most 63."""
    return _LABEL_BAD.sub("-", str(text).lower())[:63]


def labels(base: Mapping[str, str], **extra: str) -> dict[str, str]:
    """``base`` plus ``extra`` (underscores in keys become dashes), keys and values made label-safe."""
    out = {label_value(k): label_value(v) for k, v in base.items()}
    out.update({label_value(k.replace("_", "-")): label_value(v) for k, v in extra.items() if v})
    return out


def check_labels(given: Mapping[str, str]) -> None:
    """Raise LaunchError naming the first label Vertex would reject (settings labels are taken as written)."""
    for key, value in given.items():
        if not _LABEL_KEY.match(str(key)) or not _LABEL_VALUE.match(str(value)):
            raise LaunchError(f"labels: label {key}={value!r} is not a valid Vertex label (lowercase letters, "
                              "digits, '_' and '-', at most 63 chars, key starts with a letter)")


def trigger_kind(trigger_uri: str) -> str:
    """What caused a run, for its ``trigger`` label: a Cloud Storage object, a schedule tick, or a person."""
    if trigger_uri.startswith("gs://"):
        return "gcs"
    if trigger_uri.startswith("schedule://"):
        return "schedule"
    return "manual"


def run_labels(settings: Settings, trigger_uri: str, *, cause: str = "", **extra: str) -> dict[str, str]:
    """The settings' labels (validated) plus ``trigger`` = ``cause`` or the kind of ``trigger_uri``."""
    check_labels(settings.labels)
    return {**settings.labels, "trigger": cause or trigger_kind(trigger_uri),
            **labels({}, **extra)}


# ------------------------------------------------------------------------------------------------ job ids
def hashed_job_id(prefix: str, key: str) -> str:
    """``<prefix>-<sha256(key)[:16]>``, a valid PipelineJob id for a prefix of ``[a-z][a-z0-9-]*``."""
    digest = hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()
    job_id = f"{prefix}-{digest[:16]}"
    if not _JOB_ID.match(job_id):
        raise LaunchError(f"job id prefix {prefix!r} does not make a valid PipelineJob id ({job_id!r})")
    return job_id


def job_id_for(key: str, prefix: str = JOB_PREFIXES["training"]) -> str:
    """A valid PipelineJob id: ``key`` itself when it already is one, else ``prefix`` + a hash of it."""
    return key if _JOB_ID.match(key) else hashed_job_id(prefix, key)


def object_job_id(bucket: str, name: str, generation: str, prefix: str = JOB_PREFIXES["training"]) -> str:
    """One object generation = one run, however often its notification is delivered."""
    return hashed_job_id(prefix, f"{bucket}/{name}#{generation}")


def batch_job_id(batch_uri: str, prefix: str = JOB_PREFIXES["training"]) -> str:
    """One batch folder (``gs://bucket/folder/``) = one run, whichever marker or delivery launches it."""
    return hashed_job_id(prefix, batch_uri)


def retrain_job_id(monitoring_run_id: str) -> str:
    """The training run a monitoring run launches on drift: ``<run_id>-retrain`` when valid, else a hash."""
    return job_id_for(f"{monitoring_run_id}-retrain")


# ----------------------------------------------------------------------------------------------- parameters
def fixed_snapshot_time(value: str | None = None) -> str:
    """The run's snapshot time: ``value`` when given (ISO 8601), else now (UTC, whole seconds)."""
    if value:
        try:
            datetime.fromisoformat(value.strip())
        except ValueError:
            raise LaunchError(f"snapshot_time: expected an ISO 8601 timestamp, found {value!r}") from None
        return value.strip()
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def pipeline_parameters(settings: Settings, run_id: str, snapshot: str | None, trigger_uri: str = "", *,
                        backend: str | None = None) -> dict[str, Any]:
    """The parameters every ctloop pipeline takes: the whole settings object travels as ``config``.

    ``snapshot`` is fixed here when empty, so a retried extract reads the same window (and reuses the same
    BigQuery job id) instead of a later one.
    """
    config = settings.with_overrides({"backend": backend}) if backend else settings
    return {"config": config.to_param(), "run_id": run_id, "snapshot_time": fixed_snapshot_time(snapshot),
            "trigger_uri": trigger_uri}


# ------------------------------------------------------------------------------------------------ Vertex
def create_pipeline_job(
    settings: Settings,
    *,
    pipeline: Pipeline,
    template_path: str,
    job_id: str,
    snapshot: str | None,
    trigger_uri: str = "",
    cause: str = "",
    extra_labels: Mapping[str, str] | None = None,
    enable_caching: bool | None = False,
    display_name: str = "",
    client_options: Mapping[str, Any] | None = None,
    extra_parameters: Mapping[str, Any] | None = None,
) -> Launched:
    """Create the Vertex AI PipelineJob ``job_id`` (the only place that does); 409 = it exists = success.

    ``template_path``: a compiled YAML, a ``gs://`` URI or an Artifact Registry template URI
    (``https://REGION-kfp.pkg.dev/PROJECT/REPO/NAME/TAG``). The run gets the cloud backends. Caching is off
    unless asked for: a launch means new data. ``client_options`` (api_endpoint, api_transport, credentials)
    let tests point the real client at a local server. ``extra_parameters``: the pipeline's own parameters
    beyond the common ones (the scoring pipeline's ``model_version``).
    """
    from google.api_core import exceptions
    from google.cloud import aiplatform

    if not _JOB_ID.match(job_id):
        raise LaunchError(f"job id {job_id!r} is not a valid PipelineJob id ([a-z0-9-], at most 128 chars)")
    if not template_path:
        raise LaunchError(f"no template for the {pipeline} pipeline")
    gcp = settings.gcp
    params = {**pipeline_parameters(settings, job_id, snapshot, trigger_uri, backend="cloud"),
              **dict(extra_parameters or {})}
    job_labels = run_labels(settings, trigger_uri, cause=cause, **dict(extra_labels or {}))
    options = dict(client_options or {})
    credentials = options.pop("credentials", None)
    aiplatform.init(project=gcp.project, location=gcp.region, credentials=credentials, **options)
    job = aiplatform.PipelineJob(
        display_name=display_name or PIPELINE_NAMES[pipeline],
        template_path=template_path,
        job_id=job_id,
        pipeline_root=gcp.pipeline_root,
        parameter_values=params,
        enable_caching=enable_caching,
        labels=job_labels,
        project=gcp.project,
        location=gcp.region,
        credentials=credentials,
    )
    try:
        job.submit(service_account=gcp.service_account)
    except exceptions.Conflict:
        name = f"projects/{gcp.project}/locations/{gcp.region}/pipelineJobs/{job_id}"
        existing = aiplatform.PipelineJob.get(resource_name=name, project=gcp.project, location=gcp.region,
                                              credentials=credentials)
        return Launched(job_id=job_id, job_name=existing.resource_name, created=False)
    return Launched(job_id=job_id, job_name=job.resource_name, created=True)
