"""launch_training: start the training pipeline for a monitoring run that found drift, exactly once.

The training run id derives from the monitoring run id (``<run_id>-retrain``, or a hash when that is not a valid
PipelineJob id), so a retried step, or a monitoring run replayed, launches nothing new:
- cloud: a Vertex AI PipelineJob with that id (``pipelines.submit.submit_pipeline``; 409 = already launched),
  from ``monitoring.training_template`` or, when unset, the training pipeline compiled here (``ctloop compile``)
  with ``gcp.component_image`` (the image this step runs in was built from the same commit);
- local: a detached ``python -m pipelines.cli run`` (as the trigger's local launcher starts it), claimed first
  with an exclusive-create marker ``<runs_dir>/<id>/launch.json``; its log is ``<runs_dir>/<id>/launch.log``.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import yaml

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.errors import CtloopError

LAUNCH_MARKER = "launch.json"
LAUNCH_LOG = "launch.log"
TRAINING_DISPLAY_NAME = "ctloop-training"
COMPILE_TIMEOUT_S = 300


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def launch_training(
    config: dict, run_id: str, snapshot_time: str = "", trigger_uri: str = "", reasons: str = ""
) -> NamedTuple("Outputs", job_id=str, job_name=str, created=bool):
    """Launch the training pipeline once for this monitoring run; created=False when it had been launched."""
    from components.launch import run_launch_step

    return run_launch_step(config, run_id, snapshot_time, trigger_uri, reasons)


@dataclass(frozen=True)
class Launched:
    job_id: str
    job_name: str  # cloud: the PipelineJob resource name; local: the run's directory
    created: bool


def training_run_id(monitoring_run_id: str) -> str:
    """The training run a monitoring run launches: ``<run_id>-retrain`` when valid, else a hash of it."""
    from pipelines.submit import job_id_for

    return job_id_for(f"{monitoring_run_id}-retrain")


def launch_training_run(settings: Settings, *, run_id: str, snapshot_time: str = "", trigger_uri: str = "",
                        client_options: dict[str, Any] | None = None) -> Launched:
    """Launch (once) the training run for monitoring run ``run_id`` on the settings' backend."""
    job_id = training_run_id(run_id)
    if settings.backend == "cloud":
        return _launch_vertex(settings, job_id, run_id, snapshot_time, trigger_uri, client_options)
    return _launch_local(settings, job_id, snapshot_time, trigger_uri)


def _launch_vertex(settings: Settings, job_id: str, monitoring_run: str, snapshot_time: str, trigger_uri: str,
                   client_options: dict[str, Any] | None) -> Launched:
    from pipelines.main_job import pipeline_arguments
    from pipelines.submit import submit_pipeline

    labels = {"trigger": "drift", "ctloop-monitor-run": _label_value(monitoring_run)}
    params = pipeline_arguments(settings, job_id, snapshot_time, trigger_uri)
    with tempfile.TemporaryDirectory() as tmp:
        template = settings.monitoring.training_template or str(compile_training(settings, Path(tmp)))
        result = submit_pipeline(settings, template_path=template, run_id=job_id, parameter_values=params,
                                 labels=labels, display_name=TRAINING_DISPLAY_NAME, client_options=client_options)
    return Launched(job_id=result.job_id, job_name=result.job_name, created=result.created)


def compile_training(settings: Settings, out_dir: Path) -> Path:
    """The training pipeline compiled with ``gcp.component_image``, by ``ctloop compile`` in a fresh interpreter:
    this step runs with ``_KFP_RUNTIME=true``, under which ``kfp.dsl`` cannot build pipelines."""
    argv = [sys.executable, "-m", "pipelines.cli", "compile", "--out", str(out_dir),
            "--component-image", settings.gcp.component_image]
    done = subprocess.run(argv, env=launch_env(), capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    template = out_dir / "training.yaml"
    if done.returncode != 0 or not template.is_file():
        raise CtloopError(f"launch_training: compiling the training pipeline failed (exit {done.returncode}): "
                          f"{(done.stderr or done.stdout)[-2000:]}")
    return template


def _label_value(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]


def _launch_local(settings: Settings, job_id: str, snapshot_time: str, trigger_uri: str) -> Launched:
    run_dir = settings.local.runs_dir / job_id
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / LAUNCH_MARKER
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return Launched(job_id=job_id, job_name=str(run_dir), created=False)
    with os.fdopen(fd, "w") as out:
        try:
            argv = local_command(settings, job_id, snapshot_time, trigger_uri, run_dir)
            with open(run_dir / LAUNCH_LOG, "ab") as log:
                # A new session: the training run outlives this step (and the monitoring run's process group).
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        env=launch_env(), start_new_session=True, close_fds=True)
        except BaseException:
            marker.unlink(missing_ok=True)  # nothing started: a retry may launch
            raise
        json.dump({"pid": proc.pid, "argv": argv, "launched_at": datetime.now(UTC).isoformat()}, out)
    return Launched(job_id=job_id, job_name=str(run_dir), created=True)


def launch_env() -> dict[str, str]:
    """This process's environment minus the KFP executor's ``_KFP_RUNTIME`` flag: under it ``kfp.dsl`` leaves out
    the pipeline-building half the launched run needs."""
    return {k: v for k, v in os.environ.items() if k != "_KFP_RUNTIME"}


def local_command(settings: Settings, job_id: str, snapshot_time: str, trigger_uri: str,
                  run_dir: Path) -> list[str]:
    """``python -m pipelines.cli --config <settings> run ...``; the settings are written next to the run with an
    absolute workdir, so the run finds the same state whatever its working directory."""
    data = settings.with_overrides({"local.workdir": str(settings.local.path())}).to_param()
    config = run_dir / "launch-settings.yaml"
    tmp = config.with_name(f".{config.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(config)
    argv = [sys.executable, "-m", "pipelines.cli", "--config", str(config), "run", "--run-id", job_id,
            "--trigger-uri", trigger_uri, "--no-serve"]
    if snapshot_time:
        argv += ["--snapshot-time", snapshot_time]
    return argv


def run_launch_step(config: dict, run_id: str, snapshot_time: str, trigger_uri: str,
                    reasons: str) -> tuple[str, str, bool]:
    settings = Settings.from_param(config)
    launched = launch_training_run(settings, run_id=run_id, snapshot_time=snapshot_time, trigger_uri=trigger_uri)
    state = "launched" if launched.created else "already launched"
    print(f"launch_training: {state} {launched.job_id} ({launched.job_name}); drift reasons: {reasons[:2000]}")
    return launched.job_id, launched.job_name, launched.created
