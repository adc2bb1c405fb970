"""The trigger's retrain policy and schedule ticks: which pipeline a batch or a tick launches, with which job id,
through the local launcher (real processes) and the Vertex launcher (real aiplatform client, recording server)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.trigger_helpers import b64json, bundle_on_sys_path, cloud_event, recorded_launches, write_recorder

bundle_on_sys_path()

from ctloop_trigger.ctloop_config import ConfigError  # noqa: E402
from ctloop_trigger.handler import handle_event  # noqa: E402
from ctloop_trigger.jobs import LaunchRequest, job_id_for, launch_request  # noqa: E402
from ctloop_trigger.local_launcher import LocalLauncher, launch_argv  # noqa: E402
from ctloop_trigger.schedule import SCHEDULE_ATTRIBUTE, parse_tick  # noqa: E402
from ctloop_trigger.settings import SettingsError, TriggerSettings, load_settings  # noqa: E402
from ctloop_trigger.vertex_launcher import VertexLauncher  # noqa: E402

BUCKET, PREFIX, GEN = "ctloop-dev-landing", "ctloop/events/", "1741123200123456"
NAME = f"{PREFIX}batch-7/part-0.parquet"
PROJECT, REGION = "proj-one", "europe-west4"
JOBS_PATH = rf"/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs"


def settings(**env: str) -> TriggerSettings:
    # Per-object mode unless a test sets markers (the deployed default is batch mode, see the batch tests).
    base = {"CTLOOP_TRIGGER_BUCKET": BUCKET, "CTLOOP_TRIGGER_PREFIX": PREFIX, "CTLOOP_TRIGGER_MARKERS": "",
            "CTLOOP_TRIGGER_TEMPLATE": "training.yaml", "CTLOOP_TRIGGER_MONITOR_TEMPLATE": "monitoring.yaml"}
    base.update({f"CTLOOP_TRIGGER_{k.upper()}": v for k, v in env.items()})
    return load_settings(base)


def tick_event(message_id: str = "8123456789", schedule: str = "monitoring") -> Any:
    """What Cloud Scheduler's Pub/Sub target publishes (terraform/monitoring.tf), as Eventarc delivers it."""
    from cloudevents.http import CloudEvent

    message = {"attributes": {SCHEDULE_ATTRIBUTE: schedule}, "data": b64json({"schedule": schedule}),
               "messageId": message_id, "message_id": message_id, "publishTime": "2026-03-01T06:00:00.412Z"}
    return CloudEvent({"type": "google.cloud.pubsub.topic.v1.messagePublished", "id": message_id,
                       "source": "//pubsub.googleapis.com/projects/proj-one/topics/ctloop-landing-events",
                       "specversion": "1.0"}, {"message": message})


class _Recorder:
    def __init__(self) -> None:
        self.requests: list[LaunchRequest] = []

    def launch(self, request: LaunchRequest) -> bool:
        self.requests.append(request)
        return True


# --- settings -------------------------------------------------------------------------------------------------


def test_policy_settings_and_their_errors() -> None:
    s = settings()
    assert (s.policy, s.monitor_job_prefix, s.monitor_display_name) == ("always", "ctloop-monitor", "ctloop-monitoring")
    with pytest.raises(SettingsError, match=r"CTLOOP_TRIGGER_POLICY: expected one of \['always', 'on_drift', "
                                            r"'on_decay', 'on_drift_or_decay', 'config'\], found 'sometimes'"):
        settings(policy="sometimes")
    with pytest.raises(SettingsError, match="CTLOOP_TRIGGER_MONITOR_TEMPLATE: required when .*POLICY=on_drift"):
        settings(policy="on_drift", monitor_template="")
    with pytest.raises(SettingsError, match="MONITOR_JOB_PREFIX: must differ from CTLOOP_TRIGGER_JOB_PREFIX"):
        settings(monitor_job_prefix="ctloop-train")
    with pytest.raises(SettingsError, match=r"MONITOR_COMMAND: unknown placeholder\(s\) \['batch'\]"):
        settings(monitor_command=json.dumps(["x", "{run_id}", "{batch}"]))
    with pytest.raises(SettingsError, match=r"MONITOR_COMMAND: the command must pass \{run_id\}"):
        settings(monitor_command=json.dumps(["x"]))


# --- which pipeline a batch launches ---------------------------------------------------------------------------


def test_always_launches_training_and_on_drift_launches_monitoring() -> None:
    always, on_drift = _Recorder(), _Recorder()
    assert handle_event(cloud_event(BUCKET, NAME, GEN), settings(), always).action == "launched"
    assert handle_event(cloud_event(BUCKET, NAME, GEN), settings(policy="on_drift"), on_drift).action == "launched"
    (train,), (monitor,) = always.requests, on_drift.requests
    assert (train.pipeline, train.job_id) == ("training", job_id_for(BUCKET, NAME, GEN, "ctloop-train"))
    assert (monitor.pipeline, monitor.job_id) == ("monitoring", job_id_for(BUCKET, NAME, GEN, "ctloop-monitor"))
    assert monitor.trigger_uri == train.trigger_uri == f"gs://{BUCKET}/{NAME}#{GEN}"


def test_policy_config_follows_the_ctloop_settings_file_at_each_launch(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ctloop.yaml"
    s = settings(policy="config", config=str(config))
    recorder = _Recorder()
    config.write_text("monitoring: {retrain_policy: on_drift}\n")
    handle_event(cloud_event(BUCKET, NAME, GEN), s, recorder)
    config.write_text("monitoring: {recent_days: 3}\n")  # unset: always
    handle_event(cloud_event(BUCKET, NAME, "2"), s, recorder)
    config.write_text("monitoring: {retrain_policy: on_decay}\n")  # the monitoring pipeline checks for decay
    handle_event(cloud_event(BUCKET, NAME, "4"), s, recorder)
    assert [r.pipeline for r in recorder.requests] == ["monitoring", "training", "monitoring"]
    config.write_text("monitoring: {retrain_policy: weekly}\n")
    with pytest.raises(ConfigError, match=r"monitoring.retrain_policy: Input should be 'always', 'on_drift', "
                                          r"'on_decay' or 'on_drift_or_decay', found 'weekly'"):
        handle_event(cloud_event(BUCKET, NAME, "3"), s, recorder)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["severity"], line["outcome"]) == ("ERROR", "retry")  # the delivery is retried, not lost


# --- schedule ticks --------------------------------------------------------------------------------------------


def test_a_tick_launches_one_monitoring_run_keyed_by_its_message_id(capsys: pytest.CaptureFixture[str]) -> None:
    recorder = _Recorder()
    first = handle_event(tick_event("111"), settings(), recorder)
    again = handle_event(tick_event("111"), settings(), recorder)  # a redelivery
    other = handle_event(tick_event("112"), settings(), recorder)  # the next tick
    assert first.job_id == again.job_id == job_id_for("schedule", "monitoring", "111", "ctloop-monitor")
    assert other.job_id != first.job_id and other.job_id.startswith("ctloop-monitor-")
    assert {r.pipeline for r in recorder.requests} == {"monitoring"}
    assert first.trigger_uri == "schedule://monitoring#111"
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (line["message"], line["schedule"], line["publish_time"]) == (
        "launched monitoring run", "monitoring", "2026-03-01T06:00:00.412Z")


def test_ticks_for_unknown_schedules_are_rejected_and_notifications_are_not_ticks() -> None:
    recorder = _Recorder()
    outcome = handle_event(tick_event(schedule="hourly-retrain"), settings(), recorder)
    assert outcome.action == "rejected" and "ctloopSchedule" in outcome.reason
    assert parse_tick(cloud_event(BUCKET, NAME, GEN)) is None
    assert recorder.requests == []


def test_local_launcher_starts_the_monitor_command_without_mirroring_a_tick(tmp_path: Path) -> None:
    script, records = write_recorder(tmp_path / "bin")
    command = json.dumps([sys.executable, str(script), str(records), "{run_id}", "{trigger_uri}", "{config}"])
    s = settings(backend="local", state_dir=str(tmp_path / "state"), monitor_command=command,
                 mirror_dir=str(tmp_path / "landing"), config="/etc/ctloop.yaml")
    default = settings(backend="local", state_dir=str(tmp_path / "state"), config="/etc/ctloop.yaml")
    request = launch_request(BUCKET, NAME, GEN, "", "ctloop-monitor", "monitoring")
    assert launch_argv(default, request) == [
        sys.executable, "-m", "pipelines.cli", "--config", "/etc/ctloop.yaml", "monitor", "--run-id",
        request.job_id, "--trigger-uri", request.trigger_uri, "--snapshot-time", request.snapshot_time]
    from click.testing import CliRunner

    from pipelines.cli import cli

    help_text = CliRunner().invoke(cli, ["monitor", "--help"]).output
    assert "--run-id" in help_text and "--trigger-uri" in help_text

    outcome = handle_event(tick_event("777"), s, LocalLauncher(s))
    assert outcome.action == "launched"
    deadline = time.monotonic() + 20
    while not recorded_launches(records) and time.monotonic() < deadline:
        time.sleep(0.05)
    (launch,) = recorded_launches(records)
    assert launch["argv"] == [outcome.job_id, "schedule://monitoring#777", "/etc/ctloop.yaml"]
    assert not (tmp_path / "landing").exists()  # a tick has no batch to mirror
    assert handle_event(tick_event("777"), s, LocalLauncher(s)).action == "already_launched"


# --- the Vertex launcher ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monitoring_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.compile import compile_pipeline
    from pipelines.monitoring import monitoring_pipeline

    return compile_pipeline(monitoring_pipeline, tmp_path_factory.mktemp("tpl") / "monitoring.yaml",
                            "europe-west4-docker.pkg.dev/proj-one/ctloop/component:abc")


def test_vertex_launches_the_monitoring_template_for_a_tick(monkeypatch: pytest.MonkeyPatch, recording_server: Any,
                                                            monitoring_template: Path, tmp_path: Path) -> None:
    from google.cloud.aiplatform import initializer
    from google.cloud.aiplatform.utils import gcs_utils

    for name, value in list(vars(initializer.global_config).items()):
        monkeypatch.setattr(initializer.global_config, name, value)
    monkeypatch.setattr(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist",
                        lambda output_artifacts_gcs_dir=None, **_: output_artifacts_gcs_dir)
    config = tmp_path / "ctloop.yaml"
    config.write_text(f"labels: {{app: ctloop, env: prod}}\ngcp: {{project: {PROJECT}, region: {REGION}, "
                      "pipeline_root: gs://proj-one-pipelines/runs,\n"
                      "      service_account: ctloop-pipeline@proj-one.iam.gserviceaccount.com}\n"
                      "monitoring: {retrain_policy: on_drift}\n")
    s = settings(template="missing-training.yaml", monitor_template=str(monitoring_template), config=str(config),
                 api_endpoint=recording_server.url, policy="config")
    recording_server.route("POST", JOBS_PATH, lambda r: (200, {"name": f"projects/{PROJECT}/locations/{REGION}/"
                                                                      f"pipelineJobs/{r.query['pipelineJobId'][0]}"}))
    tick = handle_event(tick_event("4242"), s, VertexLauncher(s))
    batch = handle_event(cloud_event(BUCKET, NAME, GEN), s, VertexLauncher(s))  # on_drift, from the config
    tick_req, batch_req = recording_server.find("POST", JOBS_PATH)
    assert tick_req.query["pipelineJobId"] == [tick.job_id]
    assert batch_req.query["pipelineJobId"] == [job_id_for(BUCKET, NAME, GEN, "ctloop-monitor")] == [batch.job_id]
    for req, trigger in ((tick_req, "schedule"), (batch_req, "gcs")):
        body = req.json
        assert body["displayName"] == "ctloop-monitoring"
        assert body["pipelineSpec"]["pipelineInfo"]["name"] == "ctloop-monitoring"
        assert body["labels"] == {"app": "ctloop", "env": "prod", "trigger": trigger}
        assert body["runtimeConfig"]["parameterValues"]["config"]["backend"] == "cloud"
    assert tick_req.json["runtimeConfig"]["parameterValues"]["trigger_uri"] == "schedule://monitoring#4242"
