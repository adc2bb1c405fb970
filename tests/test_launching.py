"""One launch path: the CLI, the trigger function and the monitoring pipeline's launch step all create their
PipelineJob through ``ctloop.launching.create_pipeline_job``, so the same inputs make the same request (real
aiplatform client, REST, against the local recording server); and the trigger launches a batch once, with the
snapshot time fixed from the event."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials

from ctloop.config import load_settings
from ctloop.launching import (
    LaunchError,
    batch_job_id,
    check_labels,
    fixed_snapshot_time,
    job_id_for,
    label_value,
    labels,
    object_job_id,
    pipeline_parameters,
    retrain_job_id,
)
from tests.recording_server import RecordingServer
from tests.trigger_helpers import b64json, bundle_on_sys_path, cloud_event, object_resource

bundle_on_sys_path()

from ctloop_trigger.handler import handle_event  # noqa: E402
from ctloop_trigger.settings import TriggerSettings  # noqa: E402
from ctloop_trigger.settings import load_settings as trigger_settings  # noqa: E402
from ctloop_trigger.vertex_launcher import VertexLauncher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROJECT, REGION = "proj-one", "europe-west4"
JOBS = f"/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs"
BUCKET, PREFIX, GEN = "proj-one-landing", "ctloop/events/", "1741123200123456"
CREATED = "2025-03-01T10:00:00.000Z"  # timeCreated of the helpers' object resources


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real training pipeline, compiled once (the released template, as a file)."""
    from pipelines.compile import compile_pipeline
    from pipelines.training import training_pipeline

    out = tmp_path_factory.mktemp("released") / "training.yaml"
    return compile_pipeline(training_pipeline, out, "europe-west4-docker.pkg.dev/proj-one/ctloop/component:abc123")


@pytest.fixture
def vertex(recording_server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> RecordingServer:
    """The recording server as Vertex: a job id is created once, then 409 (as Vertex answers)."""
    from google.cloud.aiplatform import initializer
    from google.cloud.aiplatform.utils import gcs_utils

    for name, value in list(vars(initializer.global_config).items()):  # aiplatform.init() is process-global
        monkeypatch.setattr(initializer.global_config, name, value)
    # The pipeline-root bucket check cannot be redirected offline (project-number lookup over gRPC).
    monkeypatch.setattr(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist",
                        lambda output_artifacts_gcs_dir=None, **_: output_artifacts_gcs_dir)
    created: set[str] = set()
    lock = threading.Lock()

    def create(request: Any) -> tuple[int, dict[str, Any]]:
        job_id = request.query["pipelineJobId"][0]
        with lock:
            if job_id in created:
                return 409, {"error": {"code": 409, "status": "ALREADY_EXISTS", "message": "exists"}}
            created.add(job_id)
        return 200, {"name": f"{JOBS[len('/v1/'):]}/{job_id}"}

    recording_server.route("POST", JOBS, create)
    recording_server.route("GET", rf"{JOBS}/[a-z0-9-]+", lambda r: (200, {"name": r.path[len("/v1/"):]}))
    return recording_server


def _config(tmp_path: Path, template: Path) -> Path:
    config = tmp_path / "ctloop.yaml"
    config.write_text(
        "labels: {app: ctloop, env: prod}\n"
        f"gcp: {{project: {PROJECT}, region: {REGION}, landing_bucket: {BUCKET},\n"
        "      pipeline_root: gs://proj-one-pipelines/runs,\n"
        "      service_account: ctloop-pipeline@proj-one.iam.gserviceaccount.com,\n"
        "      component_image: europe-west4-docker.pkg.dev/proj-one/ctloop/component:abc123}\n"
        "model: {type: logistic_regression, seed: 7}\n"
        f"monitoring: {{training_template: {template}}}\n")
    return config


def _trigger(vertex: RecordingServer, config: Path, template: Path, **env: str) -> TriggerSettings:
    base = {"CTLOOP_TRIGGER_BUCKET": BUCKET, "CTLOOP_TRIGGER_PREFIX": PREFIX, "CTLOOP_TRIGGER_CONFIG": str(config),
            "CTLOOP_TRIGGER_TEMPLATE": str(template), "CTLOOP_TRIGGER_API_ENDPOINT": vertex.url}
    return trigger_settings({**base, **{f"CTLOOP_TRIGGER_{k.upper()}": v for k, v in env.items()}})


def _options(vertex: RecordingServer) -> dict[str, Any]:
    return {"api_endpoint": vertex.url, "credentials": AnonymousCredentials(), "api_transport": "rest"}


def test_the_cli_the_trigger_and_the_monitoring_step_send_the_same_request(
        vertex: RecordingServer, template: Path, tmp_path: Path) -> None:
    from components.launch import launch_training_run
    from pipelines.submit import submit_training

    config = _config(tmp_path, template)
    settings = load_settings(config)
    # The trigger: a new object (per-object mode), snapshot time = the object's creation time.
    name = f"{PREFIX}2025/03/01/part-0.parquet"
    trigger = _trigger(vertex, config, template, markers="")
    outcome = handle_event(cloud_event(BUCKET, name, GEN), trigger, VertexLauncher(trigger))
    assert outcome.action == "launched" and outcome.job_id == object_job_id(BUCKET, name, GEN)
    # The CLI, with the same inputs: job id, snapshot time, trigger URI, template.
    uri = f"gs://{BUCKET}/{name}#{GEN}"
    cli = submit_training(settings, run_id=outcome.job_id, snapshot_time=CREATED, trigger_uri=uri,
                          template=str(template), client_options=_options(vertex))
    assert cli.created is False and cli.job_id == outcome.job_id  # the same job: 409, already launched
    by_trigger, by_cli = vertex.find("POST", JOBS)
    assert by_cli.query == by_trigger.query and by_cli.query["pipelineJobId"] == [outcome.job_id]
    assert by_cli.body == by_trigger.body  # byte for byte
    body = by_cli.json
    params = body["runtimeConfig"]["parameterValues"]
    assert (params["run_id"], params["snapshot_time"], params["trigger_uri"]) == (outcome.job_id, CREATED, uri)
    assert params["config"] == settings.with_overrides({"backend": "cloud"}).to_param()
    assert body["labels"] == {"app": "ctloop", "env": "prod", "trigger": "gcs"}
    assert body["serviceAccount"] == "ctloop-pipeline@proj-one.iam.gserviceaccount.com"
    assert body["runtimeConfig"]["gcsOutputDirectory"] == "gs://proj-one-pipelines/runs"

    # The monitoring step launching training on drift, and the CLI with its job id: the same request but for
    # the labels that say why the run started.
    launched = launch_training_run(settings.with_overrides({"backend": "cloud"}), run_id="mon-1",
                                   snapshot_time=CREATED, trigger_uri=uri, client_options=_options(vertex))
    assert launched.created and launched.job_id == retrain_job_id("mon-1") == "mon-1-retrain"
    again = submit_training(settings, run_id=launched.job_id, snapshot_time=CREATED, trigger_uri=uri,
                            template=str(template), client_options=_options(vertex))
    assert not again.created
    by_step, by_cli = vertex.find("POST", JOBS)[2:]
    step_body, cli_body = by_step.json, by_cli.json
    assert step_body.pop("labels") == {"app": "ctloop", "env": "prod", "trigger": "drift",
                                       "ctloop-monitor-run": "mon-1"}
    assert cli_body.pop("labels") == {"app": "ctloop", "env": "prod", "trigger": "gcs"}
    assert step_body == cli_body
    assert step_body["runtimeConfig"]["parameterValues"]["snapshot_time"] == CREATED


def test_a_multi_file_batch_launches_one_run_however_often_its_marker_arrives(
        vertex: RecordingServer, template: Path, tmp_path: Path) -> None:
    """Default settings = batch mode: data files wait for the _SUCCESS marker; every delivery of the marker,
    concurrent or not, and a rewritten marker of the same folder, name the same job; the snapshot time is the
    marker's creation time, so a redelivery sends the very same request."""
    trigger = _trigger(vertex, _config(tmp_path, template), template)
    assert trigger.markers == ("_SUCCESS",)
    launcher = VertexLauncher(trigger)
    folder = f"{PREFIX}batch-0007/"
    for part in range(3):
        outcome = handle_event(cloud_event(BUCKET, f"{folder}part-{part}.parquet", str(100 + part)), trigger,
                               launcher)
        assert outcome.action == "ignored" and "waiting for one" in outcome.reason
    outcomes: list[Any] = []
    errors: list[BaseException] = []

    def deliver(generation: str, created: str) -> None:
        event = cloud_event(BUCKET, f"{folder}_SUCCESS", generation,
                            data=b64json(object_resource(BUCKET, f"{folder}_SUCCESS", generation,
                                                         timeCreated=created)))
        try:
            outcomes.append(handle_event(event, trigger, launcher))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=("200", CREATED)) for _ in range(6)]
    threads.append(threading.Thread(target=deliver, args=("201", "2025-03-01T10:05:00.000Z")))  # marker rewritten
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    job_id = batch_job_id(f"gs://{BUCKET}/{folder}")
    assert {o.job_id for o in outcomes} == {job_id}
    assert sorted(o.action for o in outcomes) == ["already_launched"] * 6 + ["launched"]
    posts = vertex.find("POST", JOBS)
    assert len(posts) == 7 and {p.query["pipelineJobId"][0] for p in posts} == {job_id}
    first_marker = [p for p in posts if p.json["runtimeConfig"]["parameterValues"]["trigger_uri"].endswith("#200")]
    assert len(first_marker) == 6 and len({p.body for p in first_marker}) == 1  # identical requests
    assert first_marker[0].json["runtimeConfig"]["parameterValues"]["snapshot_time"] == CREATED


def test_a_schedule_tick_launches_with_its_publish_time_as_snapshot() -> None:
    from ctloop_trigger.schedule import Tick, tick_request

    request = tick_request(Tick("monitoring", "777", "2026-03-01T06:00:00.412Z"), "ctloop-monitor")
    assert request.snapshot_time == "2026-03-01T06:00:00.412Z" and request.pipeline == "monitoring"
    broken = tick_request(Tick("monitoring", "778", "not a time"), "ctloop-monitor")
    assert fixed_snapshot_time(broken.snapshot_time) == broken.snapshot_time  # now, as a valid timestamp


def test_parameters_always_carry_a_snapshot_time() -> None:
    settings = load_settings(REPO / "ctloop.yaml")
    given = pipeline_parameters(settings, "run-1", "2026-11-01T00:00:00Z", "gs://b/o#1")
    assert given == {"config": settings.to_param(), "run_id": "run-1", "snapshot_time": "2026-11-01T00:00:00Z",
                     "trigger_uri": "gs://b/o#1"}
    fixed = pipeline_parameters(settings, "run-1", "", "")["snapshot_time"]
    assert fixed_snapshot_time(fixed) == fixed and fixed.endswith("+00:00")
    with pytest.raises(LaunchError, match=r"snapshot_time: expected an ISO 8601 timestamp, found 'yesterday'"):
        pipeline_parameters(settings, "run-1", "yesterday")
    assert pipeline_parameters(settings, "r", "2026-11-01T00:00:00Z", backend="cloud")["config"]["backend"] == "cloud"


def test_job_ids_and_labels() -> None:
    assert job_id_for("ctloop-train-1") == "ctloop-train-1"
    assert job_id_for("Monitor Run #1").startswith("ctloop-train-") and len(job_id_for("Monitor Run #1")) == 29
    assert object_job_id("b", "o", "1") != object_job_id("b", "o", "2")
    assert batch_job_id("gs://b/f/") == batch_job_id("gs://b/f/") != batch_job_id("gs://b/g/")
    with pytest.raises(LaunchError, match="does not make a valid PipelineJob id"):
        object_job_id("b", "o", "1", prefix="Bad_Prefix")
    assert label_value("Run 7/ä") == "run-7-" and len(label_value("x" * 100)) == 63
    assert labels({"App": "X"}, ctloop_run="Run 1") == {"app": "x", "ctloop-run": "run-1"}
    check_labels({"app": "ctloop", "env": "dev"})
    with pytest.raises(LaunchError, match=r"label env='Prod' is not a valid Vertex label"):
        check_labels({"env": "Prod"})
