"""launch_training: start the training pipeline for a monitoring run that found drift, exactly once.

The training run id derives from the monitoring run id (``ctloop.launching.retrain_job_id``), so a retried step,
or a monitoring run replayed, launches nothing new. The run gets the monitoring run's snapshot time.
- cloud: the Vertex AI PipelineJob of the released training template ``monitoring.training_template`` (the
  Artifact Registry URI the release build writes into the settings), by ``ctloop.launching`` (409 = launched);
- local: a detached ``ctloop run`` (ctloop/local_launch.py), claimed first in the launch ledger
  ``<workdir>/launch-ledger.sqlite``; its log is ``<runs_dir>/<id>/launch.log``.
Nothing is compiled here: the step only launches.
"""

import sys
from pathlib import Path
from typing import NamedTuple

import yaml

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.launch_ledger import Ledger
from ctloop.launching import Launched, LaunchError, create_pipeline_job, fixed_snapshot_time, retrain_job_id
from ctloop.local_launch import cli_argv, launch_once

LAUNCH_LEDGER = "launch-ledger.sqlite"
LAUNCH_LOG = "launch.log"


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def launch_training(
    config: dict, run_id: str, snapshot_time: str = "", trigger_uri: str = "", reasons: str = ""
) -> NamedTuple("Outputs", job_id=str, job_name=str, created=bool):
    """Launch the training pipeline once for this monitoring run; created=False when it had been launched."""
    from components.launch import run_launch_step
    from ctloop.steps import run_step

    return run_step(run_launch_step, config, run_id, snapshot_time, trigger_uri, reasons)


def launch_training_run(settings: Settings, *, run_id: str, snapshot_time: str = "", trigger_uri: str = "",
                        client_options: dict | None = None) -> Launched:
    """Launch (once) the training run for monitoring run ``run_id`` on the settings' backend."""
    job_id = retrain_job_id(run_id)
    if settings.backend == "cloud":
        template = settings.monitoring.training_template
        if not template:
            raise LaunchError("monitoring.training_template: required on the cloud backend, found ''; set it to "
                              "the released training template (https://REGION-kfp.pkg.dev/PROJECT/REPO/"
                              "ctloop-training/TAG, written by the release build)")
        return create_pipeline_job(settings, pipeline="training", template_path=template, job_id=job_id,
                                   snapshot=snapshot_time, trigger_uri=trigger_uri, cause="drift",
                                   extra_labels={"ctloop_monitor_run": run_id}, client_options=client_options)
    return launch_local_training(settings, job_id, snapshot_time, trigger_uri)


def launch_local_training(settings: Settings, job_id: str, snapshot: str, trigger_uri: str) -> Launched:
    """A detached ``ctloop run`` for ``job_id``, claimed in the workdir's launch ledger first."""
    run_dir = settings.local.runs_dir / job_id
    ledger = Ledger(settings.local.path(LAUNCH_LEDGER))
    log_path = run_dir / LAUNCH_LOG
    snapshot = fixed_snapshot_time(snapshot)
    created = launch_once(ledger, job_id, trigger_uri,
                          lambda: local_command(settings, job_id, snapshot, trigger_uri, run_dir), log_path)
    return Launched(job_id=job_id, job_name=str(run_dir), created=created)


def local_command(settings: Settings, job_id: str, snapshot_time: str, trigger_uri: str,
                  run_dir: Path) -> list[str]:
    """``python -m pipelines.cli --config <settings> run ...``; the settings are written next to the run with an
    absolute workdir, so the run finds the same state whatever its working directory."""
    data = settings.with_overrides({"local.workdir": str(settings.local.path())}).to_param()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "launch-settings.yaml"
    tmp = config.with_name(f".{config.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(config)
    return cli_argv(sys.executable, str(config), "training", job_id, trigger_uri, snapshot_time)


def run_launch_step(config: dict, run_id: str, snapshot_time: str, trigger_uri: str,
                    reasons: str) -> tuple[str, str, bool]:
    settings = Settings.from_param(config)
    launched = launch_training_run(settings, run_id=run_id, snapshot_time=snapshot_time, trigger_uri=trigger_uri)
    state = "launched" if launched.created else "already launched"
    print(f"launch_training: {state} {launched.job_id} ({launched.job_name}); drift reasons: {reasons[:2000]}")
    return launched.job_id, launched.job_name, launched.created
