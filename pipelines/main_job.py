"""The main job: run the training pipeline locally end to end, or submit it to Vertex AI Pipelines."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ctloop.config import Settings
from ctloop.errors import CtloopError
from pipelines.local_run import RunRecord, new_run_id, run_local
from pipelines.report_html import write_run_report
from pipelines.submit import SubmitResult, job_id_for, submit_pipeline


def pipeline_arguments(settings: Settings, run_id: str, snapshot_time: str, trigger_uri: str) -> dict[str, Any]:
    """The training pipeline's parameters: the whole settings object travels as ``config``.

    The snapshot time is fixed here, once per run, so a retried extract reads the same window (and reuses the
    same BigQuery job id) instead of a later one.
    """
    from datetime import UTC, datetime

    snapshot = snapshot_time or datetime.now(UTC).replace(microsecond=0).isoformat()
    return {"config": settings.to_param(), "run_id": run_id, "snapshot_time": snapshot, "trigger_uri": trigger_uri}


def run_training_local(
    settings: Settings,
    *,
    run_id: str | None,
    snapshot_time: str = "",
    trigger_uri: str = "",
    serve: bool = True,
    echo: Callable[[str], None] = print,
) -> int:
    """Run the pipeline locally, print a summary and the report path; 0 on success."""
    from pipelines.training import training_pipeline

    run_id = run_id or new_run_id()
    echo(f"ctloop run {run_id} (local: DuckDB, Spark {settings.local.spark_master}, scikit-learn, SQLite registry)")
    record = run_local(training_pipeline, settings, run_id=run_id,
                       arguments=pipeline_arguments(settings, run_id, snapshot_time, trigger_uri), echo=echo)
    report = write_run_report(record, settings.local.runs_dir / run_id / "report.html")
    record.report_path = str(report)
    echo_summary(record, echo)
    echo(f"report: {report}")
    if record.status != "SUCCEEDED":
        echo(f"error: {record.error}")
        return 1
    if serve:
        predict_from_served_endpoint(settings, record, echo)
    return 0


def echo_summary(record: RunRecord, echo: Callable[[str], None]) -> None:
    decision = record.output("evaluate-gate", "decision", "n/a")
    metrics = record.artifact("evaluate-gate", "metrics").get("metadata", {})
    def line(prefix: str) -> str:
        return ", ".join(f"{k.removeprefix(prefix)}={v:.4f}" for k, v in sorted(metrics.items())
                         if isinstance(v, float) and k.startswith(prefix) and (prefix or "champion_" not in k))

    echo(f"status: {record.status} in {record.seconds:.1f}s; gate decision: {decision}")
    if metrics:
        echo(f"candidate (test split): {line('')}")
    if any(k.startswith("champion_") and isinstance(v, float) for k, v in metrics.items()):  # not only its uri
        echo(f"champion  (same split): {line('champion_')}")
    if decision == "pass":
        echo(f"registered: {record.output('register', 'model_resource', '?')} "
             f"version {record.output('register', 'version', '?')}; "
             f"deployed to {record.output('deploy', 'endpoint', '?')}")
    elif decision == "fail":
        failed = [r for r in json.loads(record.output("evaluate-gate", "reasons", "[]") or "[]")
                  if not r.get("passed")]
        for r in failed:
            echo(f"rejected: {r.get('message') or r.get('check')}")
        echo("the champion keeps serving")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _example_instance(record: RunRecord) -> dict[str, Any]:
    import pandas as pd

    from ctloop.features import FeatureSpec

    test_dir = record.artifact("transform", "test").get("uri", "")
    if not test_dir:
        raise CtloopError(f"run {record.run_id}: the transform step recorded no test split")
    spec = FeatureSpec.read(test_dir)
    row = pd.read_parquet(test_dir, columns=spec.model_features).head(1).to_dict(orient="records")[0]
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def predict_from_served_endpoint(settings: Settings, record: RunRecord, echo: Callable[[str], None]) -> dict:
    """Start the production endpoint's prediction server, send one test instance, print the answer, stop."""
    port = _free_port()
    endpoint = settings.deploy.production_endpoint
    cmd = [sys.executable, "-m", "pipelines.cli", "--set", f"local.workdir={settings.local.workdir}",
           "serve", "--endpoint", endpoint, "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_healthy(base, proc, log)
            instance = _example_instance(record)
            resp = httpx.post(f"{base}/predict", json={"instances": [instance]}, timeout=30)
            resp.raise_for_status()
            answer = resp.json()
            echo(f"served by {endpoint} on {base}")
            echo(f"instance:   {json.dumps(instance, default=str)}")
            echo(f"prediction: {json.dumps(answer['predictions'][0])}")
            return answer
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def _wait_healthy(base: str, proc: subprocess.Popen, log: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise CtloopError(f"prediction server exited with {proc.returncode}: {log.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise CtloopError(f"prediction server at {base} not healthy after {timeout:.0f}s")


def submit_training(
    settings: Settings,
    *,
    run_id: str | None,
    snapshot_time: str = "",
    trigger_uri: str = "",
    template: str | None = None,
    enable_caching: bool | None = None,
    client_options: dict[str, Any] | None = None,
) -> SubmitResult:
    """Submit the training pipeline to Vertex AI Pipelines (compiled now when no template is given)."""
    from pipelines.training import PIPELINE_NAME, training_pipeline

    return submit_compiled(settings, training_pipeline, display_name=PIPELINE_NAME,
                           job_id=job_id_for(run_id or new_run_id()), snapshot_time=snapshot_time,
                           trigger_uri=trigger_uri, template=template, enable_caching=enable_caching,
                           client_options=client_options)


def submit_compiled(
    settings: Settings,
    pipeline_func: Callable[..., Any],
    *,
    display_name: str,
    job_id: str,
    snapshot_time: str,
    trigger_uri: str,
    template: str | None,
    enable_caching: bool | None = None,
    client_options: dict[str, Any] | None = None,
    extra_parameters: dict[str, Any] | None = None,
) -> SubmitResult:
    """Submit one of the project's pipelines with the cloud backend; compiles ``pipeline_func`` when no template
    (a compiled file or an Artifact Registry URI) is given. ``extra_parameters``: the pipeline's own ones."""
    from pipelines.compile import compile_pipeline

    cloud = settings.with_overrides({"backend": "cloud"})
    with tempfile.TemporaryDirectory() as tmp:
        if template is None:
            template = str(compile_pipeline(pipeline_func, Path(tmp) / f"{display_name}.yaml",
                                            settings.gcp.component_image))
        return submit_pipeline(
            cloud, template_path=template, run_id=job_id,
            parameter_values={**pipeline_arguments(cloud, job_id, snapshot_time, trigger_uri),
                              **(extra_parameters or {})},
            enable_caching=enable_caching, labels={"trigger": "manual" if not trigger_uri else "gcs"},
            display_name=display_name, client_options=client_options,
        )
