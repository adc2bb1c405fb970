"""The monitoring pipeline end to end under the KFP local runner, on small sample data, with a real champion.

One module-scoped workdir, as a user's would be:
1. a training run trains, registers and deploys the champion on a base batch;
2. the compiled monitoring pipeline on a same-distribution batch decides no_drift and launches nothing;
3. the champion is served with prediction logging on; the monitoring pipeline reads that log (every model
   feature, so the champion's scores are compared too);
4. retrain policy on_drift through the trigger's handler and local launcher (real processes, the real CLI): a
   same-distribution batch runs the monitoring pipeline and no training; a drifted batch runs it, and the
   training run it launches trains to the end.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml
from kfp import components as kfp_components

from ctloop.config import Settings, load_settings
from ctloop.launching import pipeline_parameters as pipeline_arguments
from ctloop.registry import LocalRegistry
from devtools.sample_data import write_sample_data
from pipelines.compile import all_pipelines, compile_pipeline
from pipelines.local_run import RunRecord, run_local
from pipelines.monitoring import PIPELINE_NAME, monitoring_pipeline, run_monitoring_local
from pipelines.training import training_pipeline
from serving.app import create_app, endpoint_deployments
from serving.background import running_server
from serving.prediction_log import config_from_settings
from tests.trigger_helpers import b64json, bundle_on_sys_path, cloud_event, object_resource

bundle_on_sys_path()

from ctloop_trigger.handler import handle_event  # noqa: E402
from ctloop_trigger.local_launcher import LocalLauncher  # noqa: E402
from ctloop_trigger.settings import load_settings as trigger_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE = "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/component:0123abc"
NOW = datetime.now(UTC).replace(microsecond=0)
BUCKET, PREFIX = "ctloop-dev-landing", "ctloop/events/"

pytestmark = [pytest.mark.slow, pytest.mark.spark]


def _land(s: Settings, batch: str, rows: int, seed: int, drift: float, days: tuple[int, int]) -> None:
    write_sample_data(s.local.landing_dir, s, rows=rows, seed=seed, drift=drift, batch=batch,
                      start=NOW - timedelta(days=days[0]), end=NOW - timedelta(days=days[1]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, RunRecord]:
    workdir = tmp_path_factory.mktemp("ctloop")
    s = load_settings(REPO / "ctloop.yaml", [
        f"local.workdir={workdir}", "local.spark_master=local[1]", "local.spark_shuffle_partitions=2",
        "model.params={max_iter: 60}", "deploy.smoke_instances=5",
        "monitoring.recent_days=30", "monitoring.min_rows=200",
    ])
    _land(s, "base", 6000, 11, 0.0, (120, 30))
    record = run_local(training_pipeline, s, run_id="train-base",
                       arguments=pipeline_arguments(s, "train-base", NOW.isoformat(), ""), echo=lambda _t: None)
    assert record.status == "SUCCEEDED", record.error
    assert LocalRegistry(s.local.registry_db).get_alias(s.model.display_name, "champion") is not None
    return s, record


def _decision(record: RunRecord) -> str:
    return record.output("check-drift", "decision")


def _launched(record: RunRecord) -> bool:
    step = record.step("launch-training")
    return step is not None and step.status == "SUCCEEDED"


def test_compile_writes_the_monitoring_pipeline_with_the_image_pinned(tmp_path: Path) -> None:
    assert all_pipelines()["monitoring"] is monitoring_pipeline
    spec = yaml.safe_load(compile_pipeline(monitoring_pipeline, tmp_path / "m.yaml", IMAGE).read_text())
    assert spec["pipelineInfo"]["name"] == PIPELINE_NAME
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-collect-recent", "exec-lookup-champion", "exec-check-drift",
                              "exec-launch-training", "exec-judge-canary"}
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    tasks = spec["root"]["dag"]["tasks"]
    # Transient errors are retried inside the step, bad data fails once (ctloop/steps.py): no KFP retry policy.
    assert all("retryPolicy" not in t for t in tasks.values())
    assert all(t.get("cachingOptions", {}).get("enableCache", False) is False for t in tasks.values())


def test_same_distribution_batch_is_no_drift_and_launches_nothing(trained, tmp_path: Path) -> None:
    s, _ = trained
    _land(s, "b2", 3000, 12, 0.0, (30, 0))
    compiled = compile_pipeline(monitoring_pipeline, tmp_path / "monitoring.yaml", IMAGE)
    lines: list[str] = []
    record = run_local(kfp_components.load_component_from_file(str(compiled)), s, run_id="mon-same",
                       arguments=pipeline_arguments(s, "mon-same", NOW.isoformat(), ""), echo=lines.append)
    assert record.status == "SUCCEEDED", record.error
    assert _decision(record) == "no_drift", record.output("check-drift", "reasons")
    assert record.output("check-drift", "drifted_features") == 0
    assert not _launched(record) and not (s.local.runs_dir / "mon-same-retrain").exists()
    recent = record.artifact("collect-recent", "recent")
    assert recent["metadata"]["source"] == "extract" and recent["metadata"]["row_count"] >= s.monitoring.min_rows
    report = Path(record.artifact("check-drift", "report")["uri"]).read_text()
    assert "no drift" in report and "<svg" in report
    # history features are not in an extract: said so, and the scores are not compared
    assert "hist_prior_events" in report and "not compared" in report


def test_prediction_log_source_compares_every_feature_and_the_scores(trained) -> None:
    """The served rows are the champion's test split: the same customers and source distributions as its train
    split, but later in time, so the history features (prior event counts, gaps, means) have grown. The check
    finds exactly that; excluding those features leaves no drift."""
    s, first = trained
    logged = s.with_overrides({"monitoring.sample_rate": 1.0, "monitoring.source": "prediction_log"})
    registry = LocalRegistry(s.local.registry_db)
    log = config_from_settings(logged, s.deploy.production_endpoint)
    app = create_app(endpoint_deployments(registry, s.deploy.production_endpoint), prediction_log=log)
    test_split = pd.read_parquet(first.artifact("transform", "test")["uri"])
    features = [c for c in test_split.columns if c not in ("customer_id", "event_ts", "churned")]
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in test_split[features].head(400).to_dict(orient="records")]
    with running_server(app) as url:
        for i in range(0, len(rows), 50):
            assert httpx.post(f"{url}/predict", json={"instances": rows[i:i + 50]}).status_code == 200
    snapshot = datetime.now(UTC).isoformat()
    code, record = run_monitoring_local(logged, run_id="mon-log", snapshot_time=snapshot, echo=lambda _t: None)
    assert code == 0, record.error
    assert record.artifact("collect-recent", "recent")["metadata"]["row_count"] == 400
    metrics = record.artifact("check-drift", "metrics")["metadata"]
    assert "psi_hist_prior_events" in metrics and "score_psi" in metrics  # derived features and scores compared
    reasons = json.loads(record.output("check-drift", "reasons"))
    drifted = {r["subject"] for r in reasons if r["drifted"] and r["check"] != "decision"}
    assert _decision(record) == "drift" and drifted and all(f.startswith("hist_") for f in drifted), drifted
    assert not any(r["subject"] == "scores" and r["drifted"] for r in reasons)
    # The drift launched a detached training run: let it end, so it does not race the next test's runs
    # for the champion alias.
    if _launched(record):
        _wait_for_run(s, record.output("launch-training", "job_id"), 300)

    history = [c for c in features if c.startswith("hist_")]
    steady = logged.with_overrides({"monitoring.exclude_features": history})
    code, record = run_monitoring_local(steady, run_id="mon-log-steady", snapshot_time=snapshot,
                                        echo=lambda _t: None)
    assert code == 0, record.error
    assert _decision(record) == "no_drift", record.output("check-drift", "reasons")
    assert "score_psi" in record.artifact("check-drift", "metrics")["metadata"]


def _wait_for_run(s: Settings, run_id: str, timeout: float) -> RunRecord:
    path = s.local.runs_dir / run_id / "run.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return RunRecord.load(path)
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-3000:] for p in s.local.runs_dir.parent.rglob("*.log") if run_id in str(p))
    raise AssertionError(f"run {run_id} did not finish within {timeout:.0f}s\n{logs}")


def _landed(name: str, generation: str) -> Any:
    """The notification of an object that landed now: its timeCreated ends the run's data window."""
    resource = object_resource(BUCKET, name, generation, timeCreated=NOW.isoformat())
    return cloud_event(BUCKET, name, generation, data=b64json(resource))


def test_on_drift_policy_retrains_only_when_the_new_batch_drifted(trained, tmp_path: Path) -> None:
    s, _ = trained
    config = tmp_path / "ctloop.yaml"
    config.write_text(yaml.safe_dump(s.to_param()))
    trigger = trigger_settings({
        "CTLOOP_TRIGGER_BUCKET": BUCKET, "CTLOOP_TRIGGER_PREFIX": PREFIX, "CTLOOP_TRIGGER_BACKEND": "local",
        "CTLOOP_TRIGGER_STATE_DIR": str(tmp_path / "trigger"), "CTLOOP_TRIGGER_CONFIG": str(config),
        "CTLOOP_TRIGGER_POLICY": "on_drift", "CTLOOP_TRIGGER_LAUNCH_CWD": str(REPO),
        "CTLOOP_TRIGGER_MARKERS": ""})  # one run per data file: each batch here is one file
    launcher = LocalLauncher(trigger)

    # A batch like the training data (b2, landed by the test before): checked, not retrained.
    same = handle_event(_landed(f"{PREFIX}b2/part-00000.parquet", "1"), trigger, launcher)
    assert same.action == "launched" and same.job_id.startswith("ctloop-monitor-")
    checked = _wait_for_run(s, same.job_id, 120)
    assert checked.status == "SUCCEEDED", checked.error
    assert _decision(checked) == "no_drift" and not _launched(checked)

    # A drifted batch: checked, found drifted, and the training run it launches trains to the end.
    _land(s, "b3", 9000, 13, 0.6, (30, 0))
    drifted = handle_event(_landed(f"{PREFIX}b3/part-00000.parquet", "2"), trigger, launcher)
    checked = _wait_for_run(s, drifted.job_id, 120)
    assert checked.status == "SUCCEEDED", checked.error
    assert _decision(checked) == "drift", checked.output("check-drift", "reasons")
    reasons = json.loads(checked.output("check-drift", "reasons"))
    assert any(r["drifted"] and r["check"] == "feature_psi" for r in reasons)
    assert _launched(checked)
    retrain_id = checked.output("launch-training", "job_id")
    assert retrain_id == f"{drifted.job_id}-retrain"
    retrained = _wait_for_run(s, retrain_id, 240)
    assert retrained.status == "SUCCEEDED", retrained.error
    assert retrained.parameters["trigger_uri"] == drifted.trigger_uri
    assert retrained.output("evaluate-gate", "decision") in ("pass", "fail")
    assert not (s.local.runs_dir / f"{same.job_id}-retrain").exists()
