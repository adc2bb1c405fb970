"""``ctloop submit`` / ``--target vertex``: submit the training, monitoring or scoring pipeline to Vertex AI.

The request itself is ``ctloop.launching.create_pipeline_job`` (the same call the trigger function and the
monitoring pipeline make); this module only picks the template: the one given (a compiled file or an Artifact
Registry URI), else the pipeline compiled now with ``gcp.component_image``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctloop.config import Settings
from ctloop.launching import JOB_PREFIXES, PIPELINE_NAMES, Launched, Pipeline, create_pipeline_job, job_id_for
from pipelines.compile import compile_pipeline
from pipelines.local_run import new_run_id
from pipelines.monitoring import monitoring_pipeline
from pipelines.scoring import scoring_pipeline
from pipelines.training import training_pipeline

PIPELINE_FUNCS: dict[str, Callable[..., Any]] = {"training": training_pipeline, "monitoring": monitoring_pipeline,
                                                 "scoring": scoring_pipeline}


def submit(
    settings: Settings,
    pipeline: Pipeline,
    *,
    run_id: str | None,
    snapshot_time: str = "",
    trigger_uri: str = "",
    template: str | None = None,
    enable_caching: bool | None = False,
    client_options: dict[str, Any] | None = None,
    extra_parameters: dict[str, Any] | None = None,
) -> Launched:
    """Submit ``pipeline`` once under the job id derived from ``run_id`` (a new id when none is given)."""
    prefix = JOB_PREFIXES[pipeline]
    job_id = job_id_for(run_id or new_run_id(prefix), prefix=prefix)
    with tempfile.TemporaryDirectory() as tmp:
        if template is None:
            template = str(compile_pipeline(PIPELINE_FUNCS[pipeline], Path(tmp) / f"{PIPELINE_NAMES[pipeline]}.yaml",
                                            settings.gcp.component_image, settings.resources))
        return create_pipeline_job(settings, pipeline=pipeline, template_path=template, job_id=job_id,
                                   snapshot=snapshot_time, trigger_uri=trigger_uri, enable_caching=enable_caching,
                                   client_options=client_options, extra_parameters=extra_parameters)


def submit_training(settings: Settings, *, run_id: str | None, **kw: Any) -> Launched:
    """Submit the training pipeline (see ``submit``)."""
    return submit(settings, "training", run_id=run_id, **kw)


def submit_monitoring(settings: Settings, *, run_id: str | None, **kw: Any) -> Launched:
    """Submit the monitoring pipeline (see ``submit``)."""
    return submit(settings, "monitoring", run_id=run_id, **kw)


def submit_scoring(settings: Settings, *, run_id: str | None, model_version: str = "", input_uri: str = "",
                   **kw: Any) -> Launched:
    """Submit the scoring pipeline (see ``submit``); ``model_version`` empty: ``scoring.model_version``;
    ``input_uri``: a landed batch (gs://) to score instead of the scoring window."""
    return submit(settings, "scoring", run_id=run_id,
                  extra_parameters={"model_version": model_version, "input_uri": input_uri}, **kw)
