"""Submit a compiled pipeline to Vertex AI Pipelines with a deterministic job id when an idempotency key is given."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ctloop.config import Settings

_JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")


@dataclass(frozen=True)
class SubmitResult:
    job_name: str
    job_id: str
    created: bool  # False when the job id already existed (a duplicate trigger): that is success too


def job_id_for(key: str, prefix: str = "ctloop-train") -> str:
    """A valid Vertex PipelineJob id: ``key`` itself when it already is one, else prefix + a hash of it."""
    if _JOB_ID.match(key):
        return key
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def submit_pipeline(
    settings: Settings,
    *,
    template_path: str,
    run_id: str,
    parameter_values: dict[str, Any],
    enable_caching: bool | None = None,
    labels: dict[str, str] | None = None,
    display_name: str = "ctloop-training",
    client_options: dict[str, Any] | None = None,
) -> SubmitResult:
    """Create the PipelineJob ``run_id`` (a Conflict means it exists already: fetch it and report success).

    ``template_path`` is a local compiled YAML or an Artifact Registry template URI
    (``https://REGION-kfp.pkg.dev/PROJECT/REPO/NAME/TAG``). ``client_options`` (api_endpoint, credentials,
    api_transport) exist so tests can point the real client at a local server.
    """
    from google.api_core import exceptions
    from google.cloud import aiplatform

    options = dict(client_options or {})
    aiplatform.init(
        project=settings.gcp.project,
        location=settings.gcp.region,
        credentials=options.pop("credentials", None),
        api_endpoint=options.pop("api_endpoint", None),
        api_transport=options.pop("api_transport", None),
    )
    job_id = job_id_for(run_id)
    job = aiplatform.PipelineJob(
        display_name=display_name,
        template_path=template_path,
        job_id=job_id,
        pipeline_root=settings.gcp.pipeline_root,
        parameter_values=parameter_values,
        enable_caching=enable_caching,
        labels={**settings.labels, **(labels or {})},
    )
    try:
        job.submit(service_account=settings.gcp.service_account)
    except exceptions.Conflict:
        name = (f"projects/{settings.gcp.project}/locations/{settings.gcp.region}/pipelineJobs/{job_id}")
        existing = aiplatform.PipelineJob.get(resource_name=name)
        return SubmitResult(job_name=existing.resource_name, job_id=job_id, created=False)
    return SubmitResult(job_name=job.resource_name, job_id=job_id, created=True)
