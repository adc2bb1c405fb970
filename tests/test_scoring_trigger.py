"""Scheduled and triggered scoring through the trigger function: a ``ctloopSchedule=scoring`` tick (Cloud
Scheduler, terraform/scoring.tf) and a batch landing under the score prefix each launch one scoring run, through
the same handler and launchers as training; in process, then end to end on the emulators (fake-gcs-server ->
Pub/Sub emulator -> functions-framework), locally and against the recording server with the real aiplatform
client."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.emulators import LocalCloud
from tests.test_monitoring_trigger import tick_event
from tests.test_trigger_chain import PREFIX, cloud, deployed_triggers, wait_for  # noqa: F401  (cloud: fixture)
from tests.trigger_helpers import (
    bundle_on_sys_path,
    cloud_event,
    recorded_launches,
)

bundle_on_sys_path()

from ctloop_trigger.handler import handle_event  # noqa: E402
from ctloop_trigger.jobs import LaunchRequest, job_id_for, launch_request  # noqa: E402
from ctloop_trigger.local_launcher import launch_argv  # noqa: E402
from ctloop_trigger.names import decide  # noqa: E402
from ctloop_trigger.notification import parse_event  # noqa: E402
from ctloop_trigger.schedule import SCHEDULE_ATTRIBUTE  # noqa: E402
from ctloop_trigger.settings import SettingsError, load_settings  # noqa: E402
from ctloop_trigger.vertex_launcher import VertexLauncher  # noqa: E402

from ctloop.launching import batch_job_id  # noqa: E402

BUCKET, GEN = "ctloop-dev-landing", "1741123200123456"
SCORE = "scoring/"
PROJECT, REGION = "proj-one", "europe-west4"
JOBS_PATH = rf"/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs"


def settings(**env: str) -> Any:
    base = {"CTLOOP_TRIGGER_BUCKET": BUCKET, "CTLOOP_TRIGGER_PREFIX": PREFIX, "CTLOOP_TRIGGER_SCORE_PREFIX": SCORE,
            "CTLOOP_TRIGGER_TEMPLATE": "training.yaml", "CTLOOP_TRIGGER_SCORE_TEMPLATE": "scoring.yaml"}
    base.update({f"CTLOOP_TRIGGER_{k.upper()}": v for k, v in env.items()})
    return load_settings(base)


class _Recorder:
    def __init__(self) -> None:
        self.requests: list[LaunchRequest] = []

    def launch(self, request: LaunchRequest) -> bool:
        self.requests.append(request)
        return True


# --- in process -------------------------------------------------------------------------------------------------


def test_score_prefix_settings_and_their_errors(tmp_path: Path) -> None:
    assert settings().score_prefix == SCORE and settings().score_job_prefix == "ctloop-score"
    assert load_settings({"CTLOOP_TRIGGER_BUCKET": BUCKET, "CTLOOP_TRIGGER_TEMPLATE": "t.yaml"}).score_prefix == ""
    for env, needle in (
        ({"score_prefix": f"{PREFIX}score/"}, "lies inside the training prefix"),
        ({"prefix": "", "score_prefix": SCORE}, "lies inside the training prefix"),
        ({"score_prefix": "ctloop/"}, "contains the training prefix"),
        ({"score_prefix": "../x/"}, "CTLOOP_TRIGGER_SCORE_PREFIX: expected an object name prefix"),
        ({"score_template": ""}, "CTLOOP_TRIGGER_SCORE_TEMPLATE: required"),
        ({"score_job_prefix": "ctloop-train"}, "CTLOOP_TRIGGER_SCORE_JOB_PREFIX: must differ"),
        ({"backend": "local", "state_dir": str(tmp_path)}, "CTLOOP_TRIGGER_MIRROR_DIR: required"),
    ):
        with pytest.raises(SettingsError, match=needle):
            settings(**env)


def test_a_scoring_tick_launches_one_scoring_run_keyed_by_its_message_id(
        capsys: pytest.CaptureFixture[str]) -> None:
    recorder = _Recorder()
    s = settings()
    first = handle_event(tick_event("311", "scoring"), s, recorder)
    again = handle_event(tick_event("311", "scoring"), s, recorder)  # a redelivery
    other = handle_event(tick_event("312", "scoring"), s, recorder)  # the next tick
    monitor = handle_event(tick_event("311", "monitoring"), settings(monitor_template="m.yaml"), recorder)
    assert first.job_id == again.job_id == job_id_for("schedule", "scoring", "311", "ctloop-score")
    assert other.job_id != first.job_id and other.job_id.startswith("ctloop-score-")
    assert monitor.job_id.startswith("ctloop-monitor-")  # the same message id under another schedule
    assert [r.pipeline for r in recorder.requests] == ["scoring", "scoring", "scoring", "monitoring"]
    assert first.trigger_uri == "schedule://scoring#311"
    assert recorder.requests[0].snapshot_time == "2026-03-01T06:00:00.412Z"
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (line["message"], line["schedule"], line["pipeline"]) == ("launched scoring run", "scoring", "scoring")


def test_objects_under_the_score_prefix_launch_scoring_of_their_batch() -> None:
    s = settings(markers="_SUCCESS")

    def decision(name: str) -> Any:
        return decide(parse_event(cloud_event(BUCKET, name, GEN)), s)

    scored = decision(f"{SCORE}2026-03-01/_SUCCESS")
    assert (scored.action, scored.score, scored.batch) == ("launch", True, f"gs://{BUCKET}/{SCORE}2026-03-01/")
    assert scored.reason == "batch to score marker landed"
    trained = decision(f"{PREFIX}batch-7/_SUCCESS")
    assert (trained.action, trained.score) == ("launch", False)
    assert decision(f"{SCORE}2026-03-01/part-0.parquet").action == "ignore"  # waits for its marker
    assert decision(f"{SCORE}_tmp/_SUCCESS").action == "ignore"  # a hidden folder
    outside = decision("elsewhere/_SUCCESS")
    assert outside.action == "reject" and repr(SCORE) in outside.reason

    recorder = _Recorder()
    name = f"{SCORE}2026-03-01/_SUCCESS"
    outcome = handle_event(cloud_event(BUCKET, name, GEN), s, recorder)
    again = handle_event(cloud_event(BUCKET, name, "1741123200999999"), s, recorder)  # a marker rewritten
    (request, _) = recorder.requests
    assert outcome.job_id == again.job_id == batch_job_id(f"gs://{BUCKET}/{SCORE}2026-03-01/", "ctloop-score")
    assert (request.pipeline, request.batch) == ("scoring", f"gs://{BUCKET}/{SCORE}2026-03-01/")
    # Per-object mode: one file = one scoring run over that file.
    per_object = settings(markers="")
    single = decide(parse_event(cloud_event(BUCKET, f"{SCORE}one.parquet", GEN)), per_object)
    assert (single.action, single.score, single.batch) == ("launch", True, f"gs://{BUCKET}/{SCORE}one.parquet")


def test_local_score_command_reads_the_mirrored_batch(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipelines.cli import cli

    s = settings(backend="local", state_dir=str(tmp_path / "state"), mirror_dir=str(tmp_path / "landing"),
                 config="/etc/ctloop.yaml")
    batch = launch_request(BUCKET, f"{SCORE}b1/_SUCCESS", GEN, f"gs://{BUCKET}/{SCORE}b1/", "ctloop-score",
                           "scoring", batch_mode=True)
    head = [sys.executable, "-m", "pipelines.cli", "--config", "/etc/ctloop.yaml", "score", "--run-id"]
    assert launch_argv(s, batch) == [*head, batch.job_id, "--trigger-uri", batch.trigger_uri, "--snapshot-time",
                                     batch.snapshot_time, "--input", str(tmp_path / "landing" / SCORE / "b1")]
    tick = handle_event(tick_event("5", "scoring"), s, _Recorder())
    from ctloop_trigger.schedule import parse_tick, tick_request

    request = tick_request(parse_tick(tick_event("5", "scoring")), "ctloop-score")
    assert request.job_id == tick.job_id
    assert launch_argv(s, request)[-2:] == ["--input", ""]  # a tick scores the settings' window
    help_text = CliRunner().invoke(cli, ["score", "--help"]).output
    assert "--input" in help_text and "--trigger-uri" in help_text and "--run-id" in help_text
    bad = CliRunner().invoke(cli, ["score", "--target", "vertex", "--input", "/data/batch"])
    assert bad.exit_code == 1 and "--input '/data/batch': a run on vertex reads a batch in Cloud Storage" in bad.output
    assert "Traceback" not in bad.output


@pytest.fixture(scope="module")
def scoring_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.compile import compile_pipeline
    from pipelines.scoring import scoring_pipeline

    return compile_pipeline(scoring_pipeline, tmp_path_factory.mktemp("tpl") / "scoring.yaml",
                            "europe-west4-docker.pkg.dev/proj-one/ctloop/component:abc")


def _vertex_config(tmp_path: Path) -> Path:
    config = tmp_path / "ctloop.yaml"
    config.write_text(f"labels: {{app: ctloop, env: prod}}\ngcp: {{project: {PROJECT}, region: {REGION}, "
                      "pipeline_root: gs://proj-one-pipelines/runs,\n"
                      "      service_account: ctloop-pipeline@proj-one.iam.gserviceaccount.com}\n")
    return config


@pytest.fixture
def vertex_globals(monkeypatch: pytest.MonkeyPatch) -> None:
    from google.cloud.aiplatform import initializer
    from google.cloud.aiplatform.utils import gcs_utils

    for name, value in list(vars(initializer.global_config).items()):
        monkeypatch.setattr(initializer.global_config, name, value)
    monkeypatch.setattr(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist",
                        lambda output_artifacts_gcs_dir=None, **_: output_artifacts_gcs_dir)


def test_vertex_launches_the_scoring_template_for_a_tick_and_a_batch(
        vertex_globals: None, recording_server: Any, scoring_template: Path, tmp_path: Path) -> None:
    s = settings(template="missing-training.yaml", score_template=str(scoring_template), markers="_SUCCESS",
                 config=str(_vertex_config(tmp_path)), api_endpoint=recording_server.url)
    recording_server.route("POST", JOBS_PATH, lambda r: (200, {"name": f"projects/{PROJECT}/locations/{REGION}/"
                                                                      f"pipelineJobs/{r.query['pipelineJobId'][0]}"}))
    tick = handle_event(tick_event("4243", "scoring"), s, VertexLauncher(s))
    batch = handle_event(cloud_event(BUCKET, f"{SCORE}b9/_SUCCESS", GEN), s, VertexLauncher(s))
    tick_req, batch_req = recording_server.find("POST", JOBS_PATH)
    assert tick_req.query["pipelineJobId"] == [tick.job_id]
    assert batch_req.query["pipelineJobId"] == [batch.job_id] == [batch_job_id(f"gs://{BUCKET}/{SCORE}b9/",
                                                                              "ctloop-score")]
    for req, trigger, input_uri in ((tick_req, "schedule", ""), (batch_req, "gcs", f"gs://{BUCKET}/{SCORE}b9/")):
        body = req.json
        assert body["displayName"] == "ctloop-scoring"
        assert body["pipelineSpec"]["pipelineInfo"]["name"] == "ctloop-scoring"
        assert body["labels"] == {"app": "ctloop", "env": "prod", "trigger": trigger}
        params = body["runtimeConfig"]["parameterValues"]
        assert params["input_uri"] == input_uri and params["config"]["backend"] == "cloud"
        assert body["serviceAccount"] == "ctloop-pipeline@proj-one.iam.gserviceaccount.com"
    assert tick_req.json["runtimeConfig"]["parameterValues"]["trigger_uri"] == "schedule://scoring#4243"
    assert batch_req.json["runtimeConfig"]["parameterValues"]["trigger_uri"] == \
        f"gs://{BUCKET}/{SCORE}b9/_SUCCESS#{GEN}"


def test_vertex_launch_without_a_scoring_template_is_retried(tmp_path: Path) -> None:
    from ctloop_trigger.ctloop_config import ConfigError

    # No score prefix: the settings load, but a scoring tick's launch names the missing setting (and is retried).
    s = settings(score_prefix="", score_template="", config=str(_vertex_config(tmp_path)))
    with pytest.raises(ConfigError, match="CTLOOP_TRIGGER_SCORE_TEMPLATE"):
        VertexLauncher(s).launch(tick_request_for("9"))


def tick_request_for(message_id: str) -> LaunchRequest:
    from ctloop_trigger.schedule import parse_tick, tick_request

    return tick_request(parse_tick(tick_event(message_id, "scoring")), "ctloop-score")


# --- end to end on the emulators ----------------------------------------------------------------------------------


@pytest.fixture
def deployed(cloud: LocalCloud, tmp_path: Path) -> Iterator[Any]:  # noqa: F811
    def base(name: str, script: Path, records: Path, state_dir: Path) -> dict[str, str]:
        def command(kind: str, *extra: str) -> str:
            return json.dumps([sys.executable, str(script), str(records), kind, "{run_id}", "{trigger_uri}", *extra])

        return {"BACKEND": "local", "BUCKET": name, "PREFIX": PREFIX, "SCORE_PREFIX": SCORE,
                "STATE_DIR": str(state_dir), "MIRROR_DIR": str(tmp_path / "landing"),
                "LAUNCH_COMMAND": command("train"), "SCORE_COMMAND": command("score", "{input}"),
                "CONFIG": str(tmp_path / "ctloop.yaml")}

    yield from deployed_triggers(cloud, tmp_path, base)


def test_scoring_tick_and_score_batch_end_to_end(deployed: Any, tmp_path: Path) -> None:
    trigger = deployed()
    # The tick exactly as terraform/scoring.tf's job publishes it.
    trigger.publish(json.dumps({"schedule": "scoring"}).encode(), {SCHEDULE_ATTRIBUTE: "scoring"})
    [tick] = wait_for(lambda: recorded_launches(trigger.records), what="the scoring tick's launch")
    kind, job_id, uri, input_dir = tick["argv"]
    assert (kind, input_dir) == ("score", "") and job_id.startswith("ctloop-score-")
    message_id = uri.removeprefix("schedule://scoring#")
    assert job_id == job_id_for("schedule", "scoring", message_id, "ctloop-score")

    folder = f"{SCORE}2026-03-02/"
    trigger.upload(folder + "part-0.parquet", b"PAR1 zero")
    trigger.upload(folder + "_tmp/part-9.parquet", b"PAR1 temporary")
    trigger.upload(folder + "part-1.parquet", b"PAR1 one")
    trigger.upload(f"{PREFIX}b1/part-0.parquet", b"PAR1 training")
    trigger.upload(f"{PREFIX}b1/_SUCCESS", b"")
    marker = trigger.upload(folder + "_SUCCESS", b"")
    launches = wait_for(lambda: len(recorded_launches(trigger.records)) >= 3 and recorded_launches(trigger.records),
                        what="the batch launches")
    trigger.wait_outcomes(7)
    time.sleep(1.0)
    by_kind = Counter(launch["argv"][0] for launch in launches)
    assert by_kind == Counter({"score": 2, "train": 1})
    [scored] = [x for x in launches if x["argv"][0] == "score" and x["argv"][3]]
    mirrored = tmp_path / "landing" / folder
    assert scored["argv"] == ["score", batch_job_id(f"gs://{trigger.bucket.name}/{folder}", "ctloop-score"),
                              f"gs://{trigger.bucket.name}/{folder}_SUCCESS#{marker.generation}", str(mirrored)]
    assert sorted(p.name for p in mirrored.iterdir()) == ["part-0.parquet", "part-1.parquet"]
    assert (mirrored / "part-1.parquet").read_bytes() == b"PAR1 one"
    assert trigger.counts() == Counter({"launched": 3, "ignored": 4})


def test_cloud_backend_launches_scoring_of_a_landed_batch(deployed: Any, recording_server: Any,
                                                         scoring_template: Path, tmp_path: Path) -> None:
    server = recording_server
    config = _vertex_config(tmp_path)
    # aiplatform gets-or-creates the pipeline-root bucket before each create (as in tests/test_trigger_chain.py).
    server.route("GET", r"/storage/v1/b/proj-one-pipelines", (404, {"error": {"code": 404, "message": "Not Found"}}))
    server.route("POST", r"/storage/v1/b", lambda r: (200, {"name": r.json["name"]}))
    server.route("GET", r"/storage/v1/b/proj-one-pipelines/iam", (200, {"bindings": [], "etag": "CAE="}))
    server.route("PUT", r"/storage/v1/b/proj-one-pipelines/iam", lambda r: (200, r.json))
    server.route("POST", JOBS_PATH, lambda r: (200, {"name": f"projects/{PROJECT}/locations/{REGION}/"
                                                             f"pipelineJobs/{r.query['pipelineJobId'][0]}"}))
    trigger = deployed(backend="cloud", template="missing-training.yaml", score_template=str(scoring_template),
                       markers="_SUCCESS", config=str(config), api_endpoint=server.url, mirror_dir="",
                       raw_env={"STORAGE_EMULATOR_HOST": server.url})
    folder = f"{SCORE}2026-03-03/"
    trigger.upload(folder + "part-0.parquet")
    marker = trigger.upload(folder + "_SUCCESS", b"")
    [request] = wait_for(lambda: server.find("POST", JOBS_PATH), what="the CreatePipelineJob request")
    trigger.wait_outcomes(2)
    batch = f"gs://{trigger.bucket.name}/{folder}"
    assert request.query["pipelineJobId"] == [batch_job_id(batch, "ctloop-score")]
    params = request.json["runtimeConfig"]["parameterValues"]
    assert params["input_uri"] == batch
    assert params["trigger_uri"] == f"{batch}_SUCCESS#{marker.generation}"
    assert request.json["pipelineSpec"]["pipelineInfo"]["name"] == "ctloop-scoring"
    assert trigger.counts() == Counter({"ignored": 1, "launched": 1})
