"""The main job: run the training pipeline locally end to end and ask the model it deployed for a prediction."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx

from ctloop.config import Settings
from ctloop.errors import CtloopError
from ctloop.launching import pipeline_parameters
from ctloop.ports import free_port
from pipelines.local_run import RunRecord, new_run_id, run_local
from pipelines.report_html import write_run_report


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
                       arguments=pipeline_parameters(settings, run_id, snapshot_time, trigger_uri), echo=echo,
                       uses_spark=True)
    report = write_run_report(record, settings.local.runs_dir / run_id / "report.html")
    record.report_path = str(report)
    echo_summary(record, echo)
    echo(f"report: {report}")
    if record.status != "SUCCEEDED":
        echo(f"error: {record.error}")
        return 1
    if not production_deployed(settings):
        why = "; ".join(rejection_reasons(record)) or "nothing was deployed"
        echo(f"no model is deployed yet: the first candidate was rejected ({why}); "
             f"the next run that passes the gate deploys one")
        # Asked to serve, there is nothing to serve; a --no-serve run (the trigger's) did all it was asked.
        return EXIT_NOTHING_DEPLOYED if serve else 0
    if serve:
        predict_from_served_endpoint(settings, record, echo)
    return 0


EXIT_NOTHING_DEPLOYED = 3  # the run succeeded, but no candidate has ever passed the gate: nothing to serve


def production_deployed(settings: Settings) -> bool:
    """Whether the local production endpoint serves a model."""
    from ctloop.registry import LocalRegistry

    endpoint = LocalRegistry(settings.local.registry_db).get_endpoint(settings.deploy.production_endpoint)
    return bool(endpoint and endpoint.deployments)


def rejection_reasons(record: RunRecord) -> list[str]:
    """The gate's failed checks, one line each ([] when it passed or did not run)."""
    reasons = json.loads(record.output("evaluate-gate", "reasons", "[]") or "[]")
    return [r.get("message") or r.get("check") for r in reasons if not r.get("passed")]


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
        for reason in rejection_reasons(record):
            echo(f"rejected: {reason}")
        echo("the champion keeps serving")


def _example_instance(record: RunRecord) -> dict[str, Any]:
    import pandas as pd

    from ctloop.features import FeatureSpec

    test_dir = record.artifact("transform", "test").get("uri", "")
    if not test_dir:
        raise CtloopError(f"run {record.run_id}: the transform step recorded no test split")
    spec = FeatureSpec.read(test_dir)
    # As a client sends it: the entity id and the source features; the server derives the history features
    # from the online store, for an event now (no event time given).
    fields = ([spec.id_column] if spec.derived else []) + spec.numeric + spec.categorical
    row = pd.read_parquet(test_dir, columns=fields).head(1).to_dict(orient="records")[0]
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def predict_from_served_endpoint(settings: Settings, record: RunRecord, echo: Callable[[str], None]) -> dict:
    """Start the production endpoint's prediction server, send one test instance, print the answer, stop."""
    port = free_port()
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
