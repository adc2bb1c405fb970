"""The Vertex submit path, with the real aiplatform client against a local recording server (REST transport)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials

from ctloop.config import load_settings
from ctloop.launching import job_id_for
from pipelines.submit import submit_training
from tests.recording_server import RecordingServer

REPO = Path(__file__).resolve().parents[1]
JOB_NAMES = "projects/ctloop-dev/locations/europe-west4/pipelineJobs"
JOBS = f"/v1/{JOB_NAMES}"


def _answer_pipeline_root_bucket(server: RecordingServer) -> None:
    # The SDK gets-or-creates the pipeline-root bucket before submitting; answer it like GCS would.
    server.route("GET", r"/storage/v1/b/[^/]+", (404, {"error": {"code": 404, "message": "Not Found"}}))
    server.route("POST", r"/storage/v1/b", lambda r: (200, {"name": r.json["name"], "location": "EUROPE-WEST4"}))
    server.route("GET", r"/storage/v1/b/[^/]+/iam", (200, {"bindings": [], "etag": "CAE="}))
    server.route("PUT", r"/storage/v1/b/[^/]+/iam", lambda r: (200, r.json))


@pytest.fixture
def vertex(recording_server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> RecordingServer:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", recording_server.url)
    _answer_pipeline_root_bucket(recording_server)
    return recording_server


def _submit(server: RecordingServer, run_id: str, overrides: dict[str, object] | None = None, **kw: object):
    settings = load_settings(REPO / "ctloop.yaml").with_overrides(overrides or {})
    return submit_training(
        settings, run_id=run_id, snapshot_time="2026-11-01T00:00:00Z", trigger_uri="gs://b/o.parquet#17",
        client_options={"api_endpoint": server.url, "credentials": AnonymousCredentials(), "api_transport": "rest"},
        **kw,
    )


def test_submit_sends_one_create_pipeline_job_with_deterministic_id(vertex: RecordingServer) -> None:
    vertex.route("POST", JOBS, lambda r: (200, {"name": f"{JOB_NAMES}/{r.query['pipelineJobId'][0]}",
                                               "state": "PIPELINE_STATE_PENDING"}))
    t0 = time.perf_counter()
    result = _submit(vertex, "ctloop-train-abc123", enable_caching=False)
    assert time.perf_counter() - t0 < 60
    assert result.created and result.job_id == "ctloop-train-abc123"
    (req,) = vertex.find("POST", JOBS)
    assert req.query["pipelineJobId"] == ["ctloop-train-abc123"]
    body = req.json
    params = body["runtimeConfig"]["parameterValues"]
    assert params["run_id"] == "ctloop-train-abc123"
    assert params["trigger_uri"] == "gs://b/o.parquet#17"
    assert params["snapshot_time"] == "2026-11-01T00:00:00Z"
    assert params["config"]["backend"] == "cloud"
    assert params["config"]["columns"]["label_column"] == "churned"
    assert body["runtimeConfig"]["gcsOutputDirectory"] == "gs://ctloop-dev-pipeline-root/runs"
    assert body["serviceAccount"] == "ctloop-pipeline@ctloop-dev.iam.gserviceaccount.com"
    assert body["labels"] == {"app": "ctloop", "env": "dev", "trigger": "gcs"}
    assert body["displayName"] == "ctloop-training"
    # The template is the compiled pipeline with the configured component image on every executor.
    executors = body["pipelineSpec"]["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {
        "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/component:latest"}
    # enable_caching=False is applied to every task.
    tasks = body["pipelineSpec"]["root"]["dag"]["tasks"]
    assert all(t.get("cachingOptions", {}).get("enableCache") in (None, False) for t in tasks.values())


def test_submit_compiles_with_the_settings_step_resources(vertex: RecordingServer) -> None:
    vertex.route("POST", JOBS, lambda r: (200, {"name": f"{JOB_NAMES}/{r.query['pipelineJobId'][0]}",
                                               "state": "PIPELINE_STATE_PENDING"}))
    _submit(vertex, "ctloop-train-res", overrides={"resources.train.cpu": "8", "resources.train.memory": "32Gi"})
    (req,) = vertex.find("POST", JOBS)
    executors = req.json["pipelineSpec"]["deploymentSpec"]["executors"]
    (train,) = [e for name, e in executors.items() if name == "exec-train"]
    assert train["container"]["resources"]["resourceCpuLimit"] == "8"
    assert train["container"]["resources"]["resourceMemoryLimit"] == "32Gi"


def test_already_existing_job_is_success_not_failure(vertex: RecordingServer) -> None:
    name = f"{JOB_NAMES}/ctloop-train-dup"
    vertex.route("POST", JOBS, (409, {"error": {"code": 409, "message": "already exists", "status": "ALREADY_EXISTS"}}))
    vertex.route("GET", f"/v1/{name}", (200, {"name": name, "state": "PIPELINE_STATE_RUNNING"}))
    result = _submit(vertex, "ctloop-train-dup")
    assert not result.created
    assert result.job_name == name
    assert len(vertex.find("POST", JOBS)) == 1
    assert len(vertex.find("GET", f"/v1/{name}")) == 1


def test_job_id_is_derived_deterministically_from_any_key() -> None:
    assert job_id_for("ctloop-train-1") == "ctloop-train-1"
    key = "gs://landing/ctloop/events/batch=7/part-0.parquet#1700000000"
    assert job_id_for(key) == job_id_for(key)
    assert job_id_for(key) != job_id_for(key + "1")
    assert job_id_for(key).startswith("ctloop-train-") and len(job_id_for(key)) <= 128


def test_monitoring_pipeline_submits_through_the_same_path(vertex: RecordingServer) -> None:
    from pipelines.submit import submit_monitoring

    vertex.route("POST", JOBS, lambda r: (200, {"name": f"{JOB_NAMES}/{r.query['pipelineJobId'][0]}"}))
    result = submit_monitoring(
        load_settings(REPO / "ctloop.yaml"), run_id="tick 2026-11-26T06:00", snapshot_time="2026-11-26T06:00:00Z",
        client_options={"api_endpoint": vertex.url, "credentials": AnonymousCredentials(), "api_transport": "rest"},
    )
    (req,) = vertex.find("POST", JOBS)
    assert result.created and result.job_id.startswith("ctloop-monitor-")
    assert req.query["pipelineJobId"] == [result.job_id]
    assert req.json["displayName"] == "ctloop-monitoring"
    assert req.json["pipelineSpec"]["pipelineInfo"]["name"] == "ctloop-monitoring"
    assert req.json["runtimeConfig"]["parameterValues"]["config"]["backend"] == "cloud"
    assert req.json["runtimeConfig"]["parameterValues"]["run_id"] == result.job_id
