"""Cloud launch: the Vertex AI PipelineJob named by the request's job id, created by ``ctloop.launching`` (the
call the CLI and the monitoring pipeline make too); a 409 = it exists already = success."""

from __future__ import annotations

from typing import Any

from ctloop.launching import create_pipeline_job
from ctloop_trigger.ctloop_config import ConfigError, read_ctloop_config
from ctloop_trigger.jobs import LaunchRequest
from ctloop_trigger.settings import TriggerSettings

# The settings a Vertex launch must not take from the development defaults.
VERTEX_REQUIRED = ("gcp.project", "gcp.region", "gcp.pipeline_root", "gcp.service_account")


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

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.settings.api_endpoint:
            options |= {"api_endpoint": self.settings.api_endpoint, "api_transport": "rest"}
        if self.credentials is not None:
            options["credentials"] = self.credentials
        return options

    def launch(self, request: LaunchRequest) -> bool:
        """True when this call created the job, False when it existed (HTTP 409); other errors raise."""
        settings = read_ctloop_config(self.settings.resolve_bundle_path(self.settings.config), VERTEX_REQUIRED)
        target = self.settings.target(request.pipeline)
        if not target.template:
            raise ConfigError(f"no template for the {request.pipeline} pipeline: set CTLOOP_TRIGGER_"
                              f"{target.template_variable}")
        # A scoring run over a landed batch reads that batch (input_uri); a tick's reads the scoring window.
        extra = {"input_uri": request.batch if request.bucket else ""} if request.pipeline == "scoring" else None
        launched = create_pipeline_job(
            settings, pipeline=request.pipeline, template_path=self.settings.resolve_bundle_path(target.template),
            job_id=request.job_id, snapshot=request.snapshot_time, trigger_uri=request.trigger_uri,
            display_name=target.display_name, extra_parameters=extra, client_options=self.client_options())
        return launched.created
