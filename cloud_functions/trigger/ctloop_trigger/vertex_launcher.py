"""Cloud launch: create the Vertex AI PipelineJob named by the job id; a 409 = it exists already = success.

The training and the monitoring pipeline take the same parameters (config, run_id, trigger_uri)."""

from __future__ import annotations

import re
from typing import Any

from ctloop_trigger.ctloop_config import ConfigError, read_ctloop_config, require
from ctloop_trigger.jobs import LaunchRequest
from ctloop_trigger.settings import TriggerSettings

_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
TRIGGER_LABELS = {"trigger": "gcs"}


def pipeline_labels(config: dict[str, Any], location: str, trigger: str = "gcs") -> dict[str, str]:
    """The ctloop config's labels plus ``trigger=gcs`` (``schedule`` for a tick), checked against Vertex's rules."""
    labels = config.get("labels") or {}
    if not isinstance(labels, dict):
        raise ConfigError(f"ctloop config {location}: labels must be a mapping, "
                          f"found {type(labels).__name__}")
    merged = {str(k): str(v) for k, v in labels.items()} | TRIGGER_LABELS | {"trigger": trigger}
    for key, value in merged.items():
        if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise ConfigError(f"ctloop config {location}: label {key}={value!r} is not a valid Vertex label "
                              "(lowercase letters, digits, '_' and '-', at most 63 chars, key starts with "
                              "a letter)")
    return merged


def pipeline_parameters(config: dict[str, Any], request: LaunchRequest) -> dict[str, Any]:
    """The pipeline's inputs: the settings dict (backend forced to cloud), run id, trigger URI."""
    return {"config": {**config, "backend": "cloud"}, "run_id": request.job_id,
            "trigger_uri": request.trigger_uri}


class VertexLauncher:
    """Submits one PipelineJob per job id with the real aiplatform client."""

    def __init__(self, settings: TriggerSettings, credentials: Any = None) -> None:
        import google.cloud.aiplatform  # noqa: F401  - slow (seconds): pay for it at cold start, not per event

        self.settings = settings
        self.credentials = credentials
        if credentials is None and settings.api_endpoint.startswith("http://"):
            # A plain-http endpoint is a local test server: never send real credentials there.
            from google.auth.credentials import AnonymousCredentials

            self.credentials = AnonymousCredentials()

    def launch(self, request: LaunchRequest) -> bool:
        """True when this call created the job, False when it existed (HTTP 409); other errors raise."""
        from google.api_core import exceptions
        from google.cloud import aiplatform

        location = self.settings.resolve_bundle_path(self.settings.config)
        config = read_ctloop_config(location)
        # Validate everything the job needs before touching a client: a bad config fails with its key named.
        project = require(config, "gcp.project", location)
        region = require(config, "gcp.region", location)
        pipeline_root = require(config, "gcp.pipeline_root", location)
        service_account = require(config, "gcp.service_account", location)
        labels = pipeline_labels(config, location, "gcs" if request.bucket else "schedule")
        init: dict[str, Any] = {"project": project, "location": region}
        if self.settings.api_endpoint:
            init |= {"api_endpoint": self.settings.api_endpoint, "api_transport": "rest"}
        if self.credentials is not None:
            init["credentials"] = self.credentials
        aiplatform.init(**init)
        monitoring = request.pipeline == "monitoring"
        template = self.settings.monitor_template if monitoring else self.settings.template
        if not template:
            raise ConfigError(f"no template for the {request.pipeline} pipeline: set CTLOOP_TRIGGER_"
                              f"{'MONITOR_TEMPLATE' if monitoring else 'TEMPLATE'}")
        job = aiplatform.PipelineJob(
            display_name=self.settings.monitor_display_name if monitoring else self.settings.display_name,
            template_path=self.settings.resolve_bundle_path(template),
            job_id=request.job_id,
            pipeline_root=pipeline_root,
            parameter_values=pipeline_parameters(config, request),
            labels=labels,
            enable_caching=False,
            project=project,
            location=region,
            credentials=self.credentials,
        )
        try:
            job.submit(service_account=service_account)
        except exceptions.Conflict:
            return False
        return True
