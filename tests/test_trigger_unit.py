"""The retraining trigger, in process: parsing, name safety, filters, job ids, the ledger, both launchers.

The local launcher spawns real processes; the Vertex launcher drives the real aiplatform client (REST) against
the recording server. The end-to-end chain on the emulators is in test_trigger_chain.py.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.trigger_helpers import (
    REPO,
    TRIGGER_DIR,
    b64json,
    bundle_on_sys_path,
    cloud_event,
    compile_tiny_template,
    notification_attributes,
    object_resource,
    recorded_launches,
    write_recorder,
)

bundle_on_sys_path()

from ctloop_trigger.handler import handle_event  # noqa: E402
from ctloop_trigger.jobs import job_id_for, launch_request  # noqa: E402
from ctloop_trigger.local_launcher import LocalLauncher, launch_argv  # noqa: E402
from ctloop_trigger.mirror import safe_target  # noqa: E402
from ctloop_trigger.names import UnsafeName, check_name, decide  # noqa: E402
from ctloop_trigger.notification import MalformedMessage, Notification, parse_event  # noqa: E402
from ctloop_trigger.settings import SettingsError, TriggerSettings, load_settings  # noqa: E402
from ctloop_trigger.vertex_launcher import VertexLauncher  # noqa: E402

from ctloop.config import load_settings as load_ctloop_settings  # noqa: E402
from ctloop.launch_ledger import Ledger  # noqa: E402

BUCKET = "ctloop-dev-landing"
PREFIX = "ctloop/events/"
GEN = "1741123200123456"


def settings(**env: str) -> TriggerSettings:
    # Per-object mode unless a test sets markers (the deployed default is batch mode, see the batch tests).
    base = {"CTLOOP_TRIGGER_BUCKET": BUCKET, "CTLOOP_TRIGGER_PREFIX": PREFIX, "CTLOOP_TRIGGER_MARKERS": "",
            "CTLOOP_TRIGGER_TEMPLATE": "training.yaml"}
    base.update({f"CTLOOP_TRIGGER_{k.upper()}": v for k, v in env.items()})
    return load_settings(base)


def note(name: str, *, bucket: str = BUCKET, generation: str = GEN,
         event_type: str = "OBJECT_FINALIZE") -> Notification:
    return Notification("e1", event_type, bucket, name, generation, "JSON_API_V1", {})


def log_lines(captured: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in captured.splitlines() if line.startswith("{")]


# --------------------------------------------------------------------------------------------- settings
def test_settings_defaults_and_lists() -> None:
    s = settings(suffixes=".parquet, .csv", markers="_SUCCESS,manifest.json", max_name_bytes="200")
    assert (s.backend, s.bucket, s.prefix) == ("cloud", BUCKET, PREFIX)
    assert s.suffixes == (".parquet", ".csv")
    assert s.markers == ("_SUCCESS", "manifest.json") and s.batch_mode
    assert s.max_name_bytes == 200
    assert s.resolve_bundle_path("training.yaml") == str(TRIGGER_DIR / "training.yaml")
    assert s.resolve_bundle_path("gs://b/t.yaml") == "gs://b/t.yaml"


@pytest.mark.parametrize(("env", "message"), [
    ({"bucket": ""}, r"CTLOOP_TRIGGER_BUCKET: expected a Cloud Storage bucket name, found ''"),
    ({"bucket": "Bad_Bucket"}, r"CTLOOP_TRIGGER_BUCKET: .*found 'Bad_Bucket'"),
    ({"backend": "k8s"}, r"CTLOOP_TRIGGER_BACKEND: expected 'cloud' or 'local', found 'k8s'"),
    ({"template": ""}, r"CTLOOP_TRIGGER_TEMPLATE: required when CTLOOP_TRIGGER_BACKEND=cloud"),
    ({"backend": "local"}, r"CTLOOP_TRIGGER_STATE_DIR: required when CTLOOP_TRIGGER_BACKEND=local"),
    ({"prefix": "../up/"}, r"CTLOOP_TRIGGER_PREFIX: expected an object name prefix"),
    ({"name_pattern": "(["}, r"CTLOOP_TRIGGER_NAME_PATTERN: not a valid regular expression"),
    ({"markers": "batch/_SUCCESS"}, r"CTLOOP_TRIGGER_MARKERS: expected base names"),
    ({"job_prefix": "Train_"}, r"CTLOOP_TRIGGER_JOB_PREFIX: expected \[a-z\]"),
    ({"ledger_timeout": "soon"}, r"CTLOOP_TRIGGER_LEDGER_TIMEOUT: expected a number, found 'soon'"),
    ({"launch_command": "python -m x"}, r"CTLOOP_TRIGGER_LAUNCH_COMMAND: expected a JSON list"),
    ({"launch_command": '["x", "{run_id}", "{job}"]'}, r"unknown placeholder\(s\) \['job'\]"),
    ({"launch_command": '["x", "{trigger_uri}"]'}, r"must pass \{run_id\}"),
])
def test_settings_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings(**env)


# --------------------------------------------------------------------------------------------- parsing
def test_parses_the_full_real_notification() -> None:
    name = f"{PREFIX}2025/03/01/part-0000.parquet"
    parsed = parse_event(cloud_event(BUCKET, name, GEN, event_id="987654321"))
    assert (parsed.event_id, parsed.event_type, parsed.bucket, parsed.name, parsed.generation) == (
        "987654321", "OBJECT_FINALIZE", BUCKET, name, GEN)
    assert parsed.payload_format == "JSON_API_V1"
    assert parsed.resource["md5Hash"] == "XUFAKrxLKna5cZ2REBfFkg=="


def test_parses_the_emulator_shape_and_payload_none() -> None:
    name = f"{PREFIX}a.parquet"
    # fake-gcs-server: no notificationConfig, fewer object fields.
    thin = {"eventType": "OBJECT_FINALIZE", "bucketId": BUCKET, "objectId": name, "objectGeneration": GEN,
            "payloadFormat": "JSON_API_V1", "eventTime": "2025-03-01T10:00:00Z"}
    data = b64json({"kind": "storage#object", "name": name, "bucket": BUCKET, "generation": GEN})
    assert parse_event(cloud_event(BUCKET, name, GEN, attributes=thin, data=data)).name == name
    none_format = {**notification_attributes(BUCKET, name, GEN), "payloadFormat": "NONE"}
    parsed = parse_event(cloud_event(BUCKET, name, GEN, attributes=none_format, data=""))
    assert (parsed.bucket, parsed.name, parsed.generation, parsed.resource) == (BUCKET, name, GEN, {})
    # Attributes missing but a payload present: the payload fills the gaps.
    attrs = {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"}
    assert parse_event(cloud_event(BUCKET, name, GEN, attributes=attrs)).generation == GEN
    # A plain dict event (as some runtimes hand it over) works too.
    event = cloud_event(BUCKET, name, GEN)
    assert parse_event({"type": event["type"], "id": "7", "data": event.data}).event_id == "7"


@pytest.mark.parametrize(("event_kwargs", "message"), [
    ({"ce_type": "google.cloud.storage.object.v1.finalized"}, "event type: expected .*messagePublished"),
    ({"data": "not base64!"}, "expected base64 of an object resource JSON"),
    ({"data": b64json([1, 2])}, "expected a JSON object, found list"),
    ({"data": b64json(object_resource(BUCKET, "other.parquet", GEN))},
     "name: attribute objectId=.*disagrees"),
    ({"data": b64json(object_resource(BUCKET, f"{PREFIX}a.parquet", "5"))},
     "generation: attribute .*disagrees"),
    ({"attributes": {"bucketId": BUCKET, "objectId": f"{PREFIX}a.parquet", "objectGeneration": GEN}},
     "attribute eventType: missing"),
    ({"attributes": {"eventType": "OBJECT_FINALIZE"}, "data": ""}, "bucket: expected a non-empty string"),
])
def test_malformed_messages_say_why(event_kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedMessage, match=message):
        parse_event(cloud_event(BUCKET, f"{PREFIX}a.parquet", GEN, **event_kwargs))


def test_event_without_a_pubsub_message_is_malformed() -> None:
    from cloudevents.http import CloudEvent

    event = CloudEvent({"type": "google.cloud.pubsub.topic.v1.messagePublished", "source": "//x"},
                       {"other": 1})
    with pytest.raises(MalformedMessage, match="no Pub/Sub 'message' object"):
        parse_event(event)


# --------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(("name", "message"), [
    ("ctloop/events/../../etc/passwd", r"'\.' or '\.\.' path segment"),
    ("../x.parquet", r"'\.\.' path segment"),
    ("ctloop/./events/a.parquet", r"'\.' or '\.\.' path segment"),
    ("/etc/passwd", "absolute"),
    ("ctloop\\events\\a.parquet", "backslash"),
    ("ctloop/events/a\x00.parquet", "U\\+0000"),
    ("ctloop/events/a\n.parquet", "U\\+000A"),
    ("ctloop/events/a\x7f.parquet", "U\\+007F"),
    ("ctloop/events/\u202eteuqrap.exe", "U\\+202E"),  # right-to-left override
    ("ctloop//events/a.parquet", "empty path segment"),
    ("C:/windows/a.parquet", "drive letter"),
    ("ctloop/events/" + "a" * 1100 + ".parquet", "longer than the 1024-byte limit"),
    ("ctloop/events/" + "é" * 600, "longer than the 1024-byte limit"),  # 2 bytes each in UTF-8
])
def test_unsafe_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(UnsafeName, match=message):
        check_name(name, 1024)
    assert decide(note(name), settings()).action == "reject"


@pytest.mark.parametrize("name", [
    "ctloop/events/part-0000.snappy.parquet",
    "ctloop/events/2025/03/01/données été.parquet",
    "ctloop/events/a..b.parquet",
    "ctloop/events/x#1?y=2.parquet",
])
def test_safe_names_pass(name: str) -> None:
    check_name(name, 1024)
    assert decide(note(name), settings()).action == "launch"


def test_bad_bucket_or_generation_attributes_are_rejected() -> None:
    assert decide(note(f"{PREFIX}a.parquet", bucket="../x"), settings()).action == "reject"
    for generation in ("0", "-1", "12a", "1" * 20, "１２"):
        decision = decide(note(f"{PREFIX}a.parquet", generation=generation), settings())
        assert decision.action == "reject" and "is not a positive integer" in decision.reason, generation


@pytest.mark.parametrize(("name", "action", "reason"), [
    (f"{PREFIX}part-0.parquet", "launch", "new object"),
    (f"{PREFIX}_temporary/0/part-0.parquet", "ignore", "temporary/hidden name segment '_temporary'"),
    (f"{PREFIX}.staging/part-0.parquet", "ignore", "temporary/hidden name segment '.staging'"),
    (f"{PREFIX}_SUCCESS", "ignore", "temporary/hidden name segment '_SUCCESS'"),
    (f"{PREFIX}part-0.parquet.tmp", "ignore", "partial/temporary file suffix '.tmp'"),
    (f"{PREFIX}part-0.parquet_COPYING_", "ignore", "partial/temporary file suffix '_COPYING_'"),
    (f"{PREFIX}notes.csv", "ignore", "suffix not one of ['.parquet']"),
    (f"{PREFIX}2025/", "ignore", "folder placeholder object"),
    ("other/part-0.parquet", "reject", "object is outside the watched prefix 'ctloop/events/'"),
])
def test_filters(name: str, action: str, reason: str) -> None:
    decision = decide(note(name), settings())
    assert (decision.action, decision.reason) == (action, reason)
    if action == "launch":
        assert decision.batch == f"gs://{BUCKET}/{name}"


def test_other_buckets_and_event_types_are_ignored() -> None:
    other = decide(note(f"{PREFIX}a.parquet", bucket="someone-else"), settings())
    assert (other.action, other.reason) == (
        "ignore", f"bucket 'someone-else' is not the watched bucket '{BUCKET}'")
    deleted = decide(note(f"{PREFIX}a.parquet", event_type="OBJECT_DELETE"), settings())
    assert (deleted.action, deleted.reason) == ("ignore", "event type 'OBJECT_DELETE' is not OBJECT_FINALIZE")


def test_name_pattern() -> None:
    s = settings(name_pattern=r"ctloop/events/\d{4}/[^/]+\.parquet")
    assert decide(note(f"{PREFIX}2025/a.parquet"), s).action == "launch"
    rejected = decide(note(f"{PREFIX}misc/a.parquet"), s)
    assert (rejected.action, rejected.reason) == (
        "reject", "object name does not match the configured name pattern")


def test_batch_marker_mode() -> None:
    s = settings(markers="_SUCCESS,manifest.json")
    marker = decide(note(f"{PREFIX}batch-7/_SUCCESS"), s)
    assert (marker.action, marker.batch) == ("launch", f"gs://{BUCKET}/{PREFIX}batch-7/")
    assert decide(note(f"{PREFIX}batch-7/manifest.json"), s).action == "launch"
    data = decide(note(f"{PREFIX}batch-7/part-0.parquet"), s)
    assert (data.action, data.reason) == (
        "ignore", "not a batch marker ['_SUCCESS', 'manifest.json']; waiting for one")
    spark_tmp = decide(note(f"{PREFIX}batch-7/_temporary/0/_SUCCESS"), s)
    assert (spark_tmp.action, spark_tmp.reason) == (
        "ignore", "marker inside temporary/hidden folder '_temporary'")
    assert decide(note(f"{PREFIX}../_SUCCESS"), s).action == "reject"


# --------------------------------------------------------------------------------------------- job ids
def test_job_ids_are_deterministic_valid_and_distinct() -> None:
    base = job_id_for(BUCKET, f"{PREFIX}a.parquet", GEN)
    assert base == job_id_for(BUCKET, f"{PREFIX}a.parquet", GEN)
    assert re.fullmatch(r"ctloop-train-[0-9a-f]{16}", base)
    others = {job_id_for(BUCKET, f"{PREFIX}a.parquet", "2"), job_id_for(BUCKET, f"{PREFIX}b.parquet", GEN),
              job_id_for("other-bucket", f"{PREFIX}a.parquet", GEN)}
    assert base not in others and len(others) == 3
    long_prefix = "p" * 92
    job_id = job_id_for(BUCKET, "x" * 1024, GEN, long_prefix)
    assert len(job_id) <= 128 and re.fullmatch(r"[a-z0-9][a-z0-9-]{0,127}", job_id)
    request = launch_request(BUCKET, f"{PREFIX}a.parquet", GEN, "", "ctloop-train")
    assert (request.job_id, request.trigger_uri) == (base, f"gs://{BUCKET}/{PREFIX}a.parquet#{GEN}")


# --------------------------------------------------------------------------------------------- ledger
def test_ledger_states(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite", timeout=1, claim_seconds=0.3)
    assert ledger.claim("j1", "gs://b/o#1") == "claimed"
    assert ledger.claim("j1", "gs://b/o#1") == "busy"  # another delivery is launching it
    ledger.mark_failed("j1", "OSError: boom")
    assert ledger.get("j1").status == "failed"
    assert ledger.claim("j1", "gs://b/o#1") == "claimed"  # a failed launch is retried
    ledger.mark_launched("j1", 123, ["run", "j1"], "/logs/j1.log")
    assert ledger.claim("j1", "gs://b/o#1") == "launched"
    record = ledger.get("j1")
    assert (record.status, record.attempts, record.pid, record.command, record.error) == (
        "launched", 2, 123, ["run", "j1"], None)
    # A claim whose delivery died is taken over once it is older than claim_seconds.
    assert ledger.claim("j2", "gs://b/o#2") == "claimed"
    time.sleep(0.35)
    assert ledger.claim("j2", "gs://b/o#2") == "claimed"
    assert ledger.get("j2").attempts == 2
    assert [r.job_id for r in ledger.records()] == ["j1", "j2"]


def test_locked_ledger_fails_the_delivery(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite", timeout=0.2)
    holder = sqlite3.connect(tmp_path / "ledger.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            ledger.claim("j1", "gs://b/o#1")
        assert time.monotonic() - started < 2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert ledger.claim("j1", "gs://b/o#1") == "claimed"


# --------------------------------------------------------------------------------------------- local launcher
def local_settings(tmp_path: Path, command: list[str], **env: str) -> TriggerSettings:
    return settings(backend="local", state_dir=str(tmp_path / "state"), launch_command=json.dumps(command),
                    config=str(tmp_path / "ctloop.yaml"), **env)


def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def test_default_launch_command_is_the_ctloop_cli(tmp_path: Path) -> None:
    s = settings(backend="local", state_dir=str(tmp_path), config="/etc/ctloop/ctloop.yaml")
    request = launch_request(BUCKET, f"{PREFIX}a.parquet", GEN, "", "ctloop-train")
    assert launch_argv(s, request) == [
        sys.executable, "-m", "pipelines.cli", "--config", "/etc/ctloop/ctloop.yaml", "run",
        "--run-id", request.job_id, "--trigger-uri", request.trigger_uri, "--no-serve",
        "--snapshot-time", request.snapshot_time]
    # The CLI accepts exactly these options.
    from click.testing import CliRunner

    from pipelines.cli import cli

    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    for option in ("--run-id", "--trigger-uri", "--no-serve", "--snapshot-time"):
        assert option in help_text


def test_local_launch_spawns_once_and_records_the_process(tmp_path: Path) -> None:
    script, records = write_recorder(tmp_path)
    s = local_settings(tmp_path, [sys.executable, str(script), str(records), "{run_id}", "{trigger_uri}",
                                  "{config}"], launch_cwd=str(tmp_path))
    launcher = LocalLauncher(s)
    name = f"{PREFIX}weird name; rm -rf ~ $(x).parquet"  # arguments are argv elements, never a shell line
    request = launch_request(BUCKET, name, GEN, f"gs://{BUCKET}/{name}", s.job_prefix)
    assert launcher.launch(request) is True
    assert launcher.launch(request) is False
    launched = wait_for(lambda: recorded_launches(records))
    assert len(launched) == 1
    assert launched[0]["argv"] == [request.job_id, request.trigger_uri, str(tmp_path / "ctloop.yaml")]
    assert Path(launched[0]["cwd"]) == tmp_path
    record = wait_for(lambda: (r := launcher.ledger.get(request.job_id)) and r.exit_code is not None and r)
    assert (record.status, record.attempts, record.exit_code, record.pid) == (
        "launched", 1, 0, launched[0]["pid"])
    assert record.log_path == str(tmp_path / "state" / "logs" / f"{request.job_id}.log")
    assert Path(record.log_path).exists()


def test_failed_launch_is_recorded_and_retried(tmp_path: Path) -> None:
    script, records = write_recorder(tmp_path)
    missing = tmp_path / "not-yet.py"
    s = local_settings(tmp_path, [str(missing), str(records), "{run_id}"])
    launcher = LocalLauncher(s)
    request = launch_request(BUCKET, f"{PREFIX}a.parquet", GEN, "", s.job_prefix)
    with pytest.raises(FileNotFoundError):
        launcher.launch(request)
    failed = launcher.ledger.get(request.job_id)
    assert (failed.status, failed.attempts) == ("failed", 1) and "FileNotFoundError" in failed.error
    missing.write_text("#!" + sys.executable + "\n" + script.read_text())
    missing.chmod(0o755)
    assert launcher.launch(request) is True
    assert wait_for(lambda: recorded_launches(records))[0]["argv"] == [request.job_id]
    assert launcher.ledger.get(request.job_id).attempts == 2


def test_concurrent_duplicates_launch_once(tmp_path: Path) -> None:
    script, records = write_recorder(tmp_path)
    s = local_settings(tmp_path, [sys.executable, str(script), str(records), "{run_id}"])
    launcher = LocalLauncher(s)
    request = launch_request(BUCKET, f"{PREFIX}a.parquet", GEN, "", s.job_prefix)
    results: list[bool] = []
    barrier = threading.Barrier(20)

    def deliver() -> None:
        barrier.wait()
        results.append(launcher.launch(request))

    threads = [threading.Thread(target=deliver) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 19 + [True]
    time.sleep(0.3)
    assert len(wait_for(lambda: recorded_launches(records))) == 1


def test_mirror_target_stays_under_the_root(tmp_path: Path) -> None:
    target = safe_target(tmp_path, "ctloop/events/a.parquet", 1024)
    assert target == tmp_path.resolve() / "ctloop/events/a.parquet"
    (tmp_path / "ctloop").mkdir()
    (tmp_path / "ctloop" / "link").symlink_to("/etc")
    with pytest.raises(UnsafeName, match="resolves outside the mirror directory"):
        safe_target(tmp_path, "ctloop/link/passwd", 1024)
    with pytest.raises(UnsafeName):
        safe_target(tmp_path, "../escape.parquet", 1024)


# --------------------------------------------------------------------------------------------- handler
class _Launcher:
    def __init__(self, result: bool | Exception) -> None:
        self.result = result
        self.requests: list[Any] = []

    def launch(self, request: Any) -> bool:
        self.requests.append(request)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_handler_outcomes_and_structured_logs(capsys: pytest.CaptureFixture[str]) -> None:
    s = settings()
    name = f"{PREFIX}a.parquet"
    launcher = _Launcher(True)
    outcome = handle_event(cloud_event(BUCKET, name, GEN, event_id="42"), s, launcher)
    assert (outcome.action, outcome.job_id) == ("launched", job_id_for(BUCKET, name, GEN))
    [line] = log_lines(capsys.readouterr().out)
    keys = ("severity", "message", "event_id", "bucket", "object", "generation", "job_id", "trigger_uri",
            "outcome")
    assert {k: line[k] for k in keys} == {
        "severity": "NOTICE", "message": "launched training run", "event_id": "42", "bucket": BUCKET,
        "object": name, "generation": GEN, "job_id": outcome.job_id, "trigger_uri": f"gs://{BUCKET}/{name}#{GEN}",
        "outcome": "launched"}

    assert handle_event(cloud_event(BUCKET, name, GEN), s, _Launcher(False)).action == "already_launched"
    ignored = handle_event(cloud_event(BUCKET, f"{PREFIX}a.csv", GEN), s, launcher)
    rejected = handle_event(cloud_event(BUCKET, f"{PREFIX}..\n/x.parquet", GEN), s, launcher)
    malformed = handle_event(cloud_event(BUCKET, name, GEN, data="%%%"), s, launcher)
    assert [o.action for o in (ignored, rejected, malformed)] == ["ignored", "rejected", "rejected"]
    assert len(launcher.requests) == 1  # only the first event launched
    lines = log_lines(capsys.readouterr().out)
    assert [(x["severity"], x["outcome"]) for x in lines] == [
        ("NOTICE", "already_launched"), ("INFO", "ignored"), ("WARNING", "rejected"), ("WARNING", "rejected")]
    assert lines[2]["object"] == f"{PREFIX}..\n/x.parquet"  # logged as data (JSON-escaped), never used
    assert "\n" not in capsys.readouterr().out.strip()


def test_transient_launch_failure_raises_for_redelivery(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConnectionError, match="vertex unavailable"):
        handle_event(cloud_event(BUCKET, f"{PREFIX}a.parquet", GEN), settings(),
                     _Launcher(ConnectionError("vertex unavailable")))
    [line] = log_lines(capsys.readouterr().out)
    assert (line["severity"], line["outcome"], line["error"]) == (
        "ERROR", "retry", "ConnectionError: vertex unavailable")


def test_log_fields_are_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    name = PREFIX + "x" * 2000 + ".parquet"
    handle_event(cloud_event(BUCKET, name, GEN), settings(), _Launcher(True))
    [line] = log_lines(capsys.readouterr().out)
    assert line["outcome"] == "rejected" and len(line["object"]) < 400


# ------------------------------------------------------------------------------------------ vertex launcher
PROJECT, REGION = "proj-one", "europe-west4"
JOBS_PATH = rf"/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_tiny_template(tmp_path_factory.mktemp("template"))


@pytest.fixture
def vertex(monkeypatch: pytest.MonkeyPatch, recording_server: Any, template: Path, tmp_path: Path) -> Any:
    """Settings + config for a Vertex launch against the recording server."""
    from google.cloud.aiplatform import initializer
    from google.cloud.aiplatform.utils import gcs_utils

    # aiplatform.init() is process-global: leave it as found for the tests that run after these.
    for name, value in list(vars(initializer.global_config).items()):
        monkeypatch.setattr(initializer.global_config, name, value)

    # The pipeline-root bucket check cannot be redirected offline (project-number lookup over gRPC).
    monkeypatch.setattr(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist",
                        lambda output_artifacts_gcs_dir=None, **_: output_artifacts_gcs_dir)
    config = tmp_path / "ctloop.yaml"
    config.write_text(
        "backend: local\nlabels: {app: ctloop, env: prod}\n"
        f"gcp: {{project: {PROJECT}, region: {REGION}, pipeline_root: gs://proj-one-pipelines/runs,\n"
        "      service_account: ctloop-pipeline@proj-one.iam.gserviceaccount.com}\n"
        "model: {type: logistic_regression, seed: 7}\n")
    s = settings(template=str(template), config=str(config), api_endpoint=recording_server.url)
    return s


def _created(request: Any) -> tuple[int, dict[str, Any]]:
    job_id = request.query["pipelineJobId"][0]
    return 200, {"name": f"projects/{PROJECT}/locations/{REGION}/pipelineJobs/{job_id}"}


def test_vertex_launch_creates_the_pipeline_job(vertex: TriggerSettings, recording_server: Any) -> None:
    recording_server.route("POST", JOBS_PATH, _created)
    name = f"{PREFIX}2025/03/01/part-0.parquet"
    outcome = handle_event(cloud_event(BUCKET, name, GEN), vertex, VertexLauncher(vertex))
    assert outcome.action == "launched"
    [req] = recording_server.find("POST", JOBS_PATH)
    assert req.query["pipelineJobId"] == [job_id_for(BUCKET, name, GEN)]
    body = req.json
    assert body["displayName"] == "ctloop-training"
    assert body["serviceAccount"] == "ctloop-pipeline@proj-one.iam.gserviceaccount.com"
    assert body["labels"] == {"app": "ctloop", "env": "prod", "trigger": "gcs"}
    assert body["runtimeConfig"]["gcsOutputDirectory"] == "gs://proj-one-pipelines/runs"
    params = body["runtimeConfig"]["parameterValues"]
    assert params["run_id"] == outcome.job_id
    assert params["trigger_uri"] == f"gs://{BUCKET}/{name}#{GEN}"
    assert params["config"]["backend"] == "cloud"  # the Vertex run uses the cloud backends
    # The validated settings travel whole, exactly as the CLI sends them (ints arrive as floats).
    expected = load_ctloop_settings(vertex.config).with_overrides({"backend": "cloud"}).to_param()
    assert params["config"] == expected
    assert params["config"]["model"]["type"] == "logistic_regression" and params["config"]["model"]["seed"] == 7.0
    assert params["snapshot_time"] == "2025-03-01T10:00:00.000Z"  # the object's timeCreated: same on redelivery
    assert params["config"]["gcp"]["project"] == PROJECT
    task_caching = [t["cachingOptions"] for t in body["pipelineSpec"]["root"]["dag"]["tasks"].values()]
    assert task_caching == [{"enableCache": False}]


def test_vertex_conflict_means_already_launched(vertex: TriggerSettings, recording_server: Any,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    recording_server.route("POST", JOBS_PATH, (409, {"error": {"code": 409, "status": "ALREADY_EXISTS",
                                                              "message": "PipelineJob already exists"}}))
    recording_server.route("GET", rf"{JOBS_PATH}/[a-z0-9-]+", lambda r: (200, {"name": r.path[len("/v1/"):]}))
    outcome = handle_event(cloud_event(BUCKET, f"{PREFIX}a.parquet", GEN), vertex, VertexLauncher(vertex))
    assert outcome.action == "already_launched"
    assert len(recording_server.find("POST", JOBS_PATH)) == 1
    assert log_lines(capsys.readouterr().out)[-1]["outcome"] == "already_launched"


def test_vertex_unavailable_is_retried(vertex: TriggerSettings, recording_server: Any) -> None:
    from google.api_core import exceptions

    recording_server.route("POST", JOBS_PATH, (503, {"error": {"code": 503, "status": "UNAVAILABLE",
                                                              "message": "try again"}}))
    with pytest.raises(exceptions.ServiceUnavailable):
        handle_event(cloud_event(BUCKET, f"{PREFIX}a.parquet", GEN), vertex, VertexLauncher(vertex))


def test_vertex_config_errors_name_the_key(vertex: TriggerSettings, recording_server: Any,
                                           tmp_path: Path) -> None:
    from ctloop_trigger.ctloop_config import ConfigError

    from ctloop.launching import LaunchError

    config = Path(vertex.config)
    config.write_text("gcp: {project: proj-one, region: europe-west4}\n")
    request = launch_request(BUCKET, f"{PREFIX}a.parquet", GEN, "", "ctloop-train")
    with pytest.raises(ConfigError, match=r"gcp.pipeline_root must be set for a Vertex launch, found None"):
        VertexLauncher(vertex).launch(request)
    config.write_text("labels: {App: x}\n"
                      "gcp: {project: proj-one, region: europe-west4, pipeline_root: gs://b,\n"
                      "      service_account: s}\n")
    with pytest.raises(LaunchError, match=r"label App='x' is not a valid Vertex label"):
        VertexLauncher(vertex).launch(request)
    config.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, found list"):
        VertexLauncher(vertex).launch(request)
    assert recording_server.find("POST", JOBS_PATH) == []


def test_the_real_training_pipeline_accepts_the_trigger_parameters(tmp_path: Path, vertex: TriggerSettings,
                                                                   recording_server: Any) -> None:
    """The compiled ctloop training pipeline declares every parameter the trigger sends."""
    from kfp import compiler

    from pipelines.training import training_pipeline

    path = tmp_path / "training.yaml"
    compiler.Compiler().compile(training_pipeline, str(path))
    recording_server.route("POST", JOBS_PATH, _created)
    real = TriggerSettings(**{**vertex.__dict__, "template": str(path)})
    request = launch_request(BUCKET, f"{PREFIX}a.parquet", GEN, "", "ctloop-train")
    assert VertexLauncher(real).launch(request) is True
    [req] = recording_server.find("POST", JOBS_PATH)
    declared = req.json["pipelineSpec"]["root"]["inputDefinitions"]["parameters"]
    assert set(req.json["runtimeConfig"]["parameterValues"]) <= set(declared)


# --------------------------------------------------------------------------------------------- bundle
def test_requirements_are_pinned_to_the_lock() -> None:
    # The development lock: the runtime lock plus functions-framework and the other tools the tests run.
    lock = dict(re.findall(r"^([a-z0-9-]+)==(\S+)", (REPO / "requirements-dev.lock").read_text(), re.M))
    pins = dict(re.findall(r"^([a-z0-9-]+)==(\S+)", (TRIGGER_DIR / "requirements.txt").read_text(), re.M))
    assert {"functions-framework", "google-cloud-aiplatform", "pyyaml"} <= set(pins)
    assert {name: lock.get(name) for name in pins} == pins
