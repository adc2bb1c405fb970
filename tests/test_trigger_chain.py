"""The whole event chain on real emulators, with the function directory served as deployed.

upload (google-cloud-storage) -> fake-gcs-server -> OBJECT_FINALIZE -> Pub/Sub emulator -> push subscription
-> functions-framework (cloud_functions/trigger/main.py) -> ledger + detached launch (local) or the real
aiplatform client against the recording server (cloud).

One emulator pair per module; each test gets its own bucket, function server and push subscription. Every
function invocation writes exactly one ``outcome`` log line, which is how the tests count deliveries.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from devtools.emulators import FunctionServer, LocalCloud
from tests.trigger_helpers import (
    ENTRY_POINT,
    TRIGGER_MAIN,
    bundle_on_sys_path,
    compile_tiny_template,
    recorded_launches,
    write_recorder,
)

bundle_on_sys_path()

from ctloop_trigger.jobs import job_id_for  # noqa: E402

from ctloop.launch_ledger import Ledger  # noqa: E402

PREFIX = "ctloop/events/"


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout}s")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    with LocalCloud(log_dir=tmp_path_factory.mktemp("emulators")) as running:
        yield running


@dataclass
class Trigger:
    """One deployed function instance watching one bucket."""

    cloud: LocalCloud
    server: FunctionServer
    bucket: Any  # google.cloud.storage.Bucket
    state_dir: Path
    records: Path
    subscription: str
    uploads: dict[str, float] = field(default_factory=dict)

    def upload(self, name: str, data: bytes = b"PAR1 data") -> Any:
        blob = self.bucket.blob(name)
        self.uploads[name] = time.monotonic()
        blob.upload_from_string(data)
        return blob

    def outcomes(self) -> list[dict[str, Any]]:
        lines = self.server.process.log_path.read_text(errors="replace").splitlines()
        entries = [json.loads(x) for x in lines if x.startswith("{")]
        return [e for e in entries if "outcome" in e]

    def counts(self) -> Counter[str]:
        return Counter(e["outcome"] for e in self.outcomes())

    def wait_outcomes(self, total: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.outcomes()) >= total, timeout, f"{total} function invocations")
        return self.outcomes()

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.state_dir / "ledger.sqlite")

    def launched(self) -> list[Any]:
        return [r for r in self.ledger.records() if r.status == "launched"]

    def publish(self, data: bytes, attributes: dict[str, str]) -> None:
        from google.pubsub_v1 import PubsubMessage

        self.cloud.pubsub.publisher().publish(topic=self.cloud.topic,
                                              messages=[PubsubMessage(data=data, attributes=attributes)])


Start = Callable[..., Trigger]


def deployed_triggers(cloud: LocalCloud, tmp_path: Path,
                      base_settings: Callable[[str, Path, Path, Path], dict[str, str]]) -> Iterator[Start]:
    """Starts functions watching fresh buckets, each pushed to by its own subscription; stops them after.

    ``base_settings(bucket name, recorder script, records file, state dir)`` gives the CTLOOP_TRIGGER_* values
    (without the prefix); a start's keyword arguments override them and ``raw_env`` adds variables as named.
    """
    started: list[Trigger] = []

    def start(raw_env: dict[str, str] | None = None, **env: str) -> Trigger:
        name = f"landing-{uuid.uuid4().hex[:12]}"
        bucket = cloud.gcs.client().create_bucket(name)
        script, records = write_recorder(tmp_path)
        state_dir = tmp_path / "state"
        settings = base_settings(name, script, records, state_dir)
        settings.update({k.upper(): v for k, v in env.items()})
        env_vars = {f"CTLOOP_TRIGGER_{k}": v for k, v in settings.items()} | (raw_env or {})
        server = cloud.start_function(TRIGGER_MAIN, ENTRY_POINT, env_vars, name=f"trigger-{name}")
        subscription = cloud.pubsub.create_subscription(cloud.project, f"push-{name}", cloud.topic,
                                                        push_endpoint=server.push_endpoint(cloud.topic))
        trigger = Trigger(cloud, server, bucket, state_dir, records, subscription)
        started.append(trigger)
        return trigger

    yield start
    for trigger in started:
        cloud.pubsub.delete_subscription(trigger.subscription)
        cloud.stop_function(trigger.server)


@pytest.fixture
def start_trigger(cloud: LocalCloud, tmp_path: Path) -> Iterator[Start]:
    def base(name: str, script: Path, records: Path, state_dir: Path) -> dict[str, str]:
        # Per-object mode unless the test sets markers (batch mode, the deployed default, has its own tests).
        return {"BACKEND": "local", "BUCKET": name, "PREFIX": PREFIX, "STATE_DIR": str(state_dir), "MARKERS": "",
                "LAUNCH_COMMAND": json.dumps([sys.executable, str(script), str(records), "{run_id}",
                                              "{trigger_uri}", "{config}"]),
                "CONFIG": str(tmp_path / "ctloop.yaml")}

    yield from deployed_triggers(cloud, tmp_path, base)


def test_one_upload_launches_one_run_and_mirrors_it(start_trigger: Start, tmp_path: Path) -> None:
    mirror = tmp_path / "landing"
    trigger = start_trigger(mirror_dir=str(mirror))
    name = f"{PREFIX}2025/03/01/part-0000.parquet"
    started = time.monotonic()
    blob = trigger.upload(name, b"PAR1 first batch")
    [record] = wait_for(trigger.launched, what="a launched ledger row")
    latency = time.monotonic() - started
    print(f"upload -> launch (ledger row 'launched'): {latency * 1000:.0f} ms")

    job_id = job_id_for(trigger.bucket.name, name, str(blob.generation))
    uri = f"gs://{trigger.bucket.name}/{name}#{blob.generation}"
    assert (record.job_id, record.trigger_uri, record.attempts) == (job_id, uri, 1)
    [spawned] = wait_for(lambda: recorded_launches(trigger.records), what="the spawned process record")
    assert spawned["argv"] == [job_id, uri, str(tmp_path / "ctloop.yaml")]
    assert spawned["pid"] == record.pid
    assert (mirror / name).read_bytes() == b"PAR1 first batch"
    [outcome] = trigger.outcomes()
    assert {k: outcome[k] for k in ("severity", "outcome", "bucket", "object", "generation", "job_id")} == {
        "severity": "NOTICE", "outcome": "launched", "bucket": trigger.bucket.name, "object": name,
        "generation": str(blob.generation), "job_id": job_id}
    assert outcome["event_id"]


def test_duplicate_deliveries_and_retries_launch_once(cloud: LocalCloud, start_trigger: Start) -> None:
    trigger = start_trigger()
    # A pull subscription sees the very notification the function gets, so the test can redeliver it verbatim.
    tap = cloud.pubsub.create_subscription(cloud.project, f"tap-{trigger.bucket.name}", cloud.topic)
    name = f"{PREFIX}part-0000.parquet"
    trigger.upload(name)
    wait_for(trigger.launched, what="the first launch")
    subscriber = cloud.pubsub.subscriber()
    pulled = wait_for(lambda: subscriber.pull(subscription=tap, max_messages=10).received_messages,
                      what="the notification on the tap subscription")
    message = pulled[0].message
    assert message.attributes["objectId"] == name and message.attributes["eventType"] == "OBJECT_FINALIZE"

    for _ in range(20):  # the same notification published 20 more times
        trigger.publish(message.data, dict(message.attributes))
    # ... and one function retry: the exact push body posted again with the same message id.
    import base64

    body = {"message": {"data": base64.b64encode(message.data).decode(),
                        "attributes": dict(message.attributes), "messageId": message.message_id,
                        "publishTime": "2025-03-01T10:00:00.000Z"},
            "subscription": trigger.subscription}
    req = urllib.request.Request(trigger.server.push_endpoint(cloud.topic), data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200

    trigger.wait_outcomes(22)
    time.sleep(1.5)  # the emulator redelivers unacknowledged pushes after ~1 s: none may come
    assert trigger.counts() == Counter({"launched": 1, "already_launched": 21})
    [record] = trigger.ledger.records()
    assert (record.status, record.attempts) == ("launched", 1)
    assert len(recorded_launches(trigger.records)) == 1
    cloud.pubsub.delete_subscription(tap)


def test_filtered_and_malformed_messages_are_acked_without_launch(start_trigger: Start) -> None:
    trigger = start_trigger()
    bucket = trigger.bucket.name
    for name in (f"{PREFIX}_temporary/0/part-0.parquet", f"{PREFIX}part-0.parquet.tmp",
                 f"{PREFIX}part-0.parquet_COPYING_", f"{PREFIX}notes.csv", f"{PREFIX}.hidden.parquet",
                 "elsewhere/part-0.parquet"):
        trigger.upload(name)

    def attrs(name: str, event_type: str = "OBJECT_FINALIZE") -> dict[str, str]:
        return {"eventType": event_type, "bucketId": bucket, "objectId": name, "objectGeneration": "7",
                "payloadFormat": "JSON_API_V1"}

    def resource(name: str, generation: str = "7") -> bytes:
        obj = {"kind": "storage#object", "bucket": bucket, "name": name, "generation": generation}
        return json.dumps(obj).encode()

    traversal = f"{PREFIX}../../../etc/passwd.parquet"
    control = f"{PREFIX}evil\n{{\"severity\":\"ERROR\"}}.parquet"
    trigger.publish(resource(traversal), attrs(traversal))
    trigger.publish(resource(control), attrs(control))
    trigger.publish(b"not json at all", attrs(f"{PREFIX}a.parquet"))
    trigger.publish(resource(f"{PREFIX}b.parquet"), attrs(f"{PREFIX}other.parquet"))  # payload disagrees
    trigger.publish(resource(f"{PREFIX}c.parquet"), attrs(f"{PREFIX}c.parquet", "OBJECT_DELETE"))
    trigger.publish(b"", {"eventType": "OBJECT_FINALIZE", "payloadFormat": "NONE"})  # no object at all
    bad_generation = {**attrs(f"{PREFIX}d.parquet"), "objectGeneration": "x1"}
    trigger.publish(resource(f"{PREFIX}d.parquet", "x1"), bad_generation)
    total = 6 + 7

    trigger.wait_outcomes(total)
    time.sleep(2.5)  # two redelivery periods: acknowledged messages never come back
    outcomes = trigger.outcomes()
    assert len(outcomes) == total
    by_object = {e.get("object"): (e["outcome"], e["reason"]) for e in outcomes}
    assert by_object[f"{PREFIX}_temporary/0/part-0.parquet"] == (
        "ignored", "temporary/hidden name segment '_temporary'")
    assert by_object[f"{PREFIX}part-0.parquet.tmp"] == ("ignored", "partial/temporary file suffix '.tmp'")
    assert by_object[f"{PREFIX}notes.csv"][0] == "ignored"
    assert by_object["elsewhere/part-0.parquet"] == (
        "rejected", "object is outside the watched prefix 'ctloop/events/'")
    assert by_object[traversal] == ("rejected", "object name has a '.' or '..' path segment")
    assert by_object[control] == ("rejected", "object name contains control/format character U+000A")
    assert by_object[f"{PREFIX}c.parquet"] == ("ignored", "event type 'OBJECT_DELETE' is not OBJECT_FINALIZE")
    assert by_object[f"{PREFIX}d.parquet"] == ("rejected", "generation 'x1' is not a positive integer")
    assert trigger.counts() == Counter({"ignored": 6, "rejected": 7})
    assert trigger.ledger.records() == []
    assert recorded_launches(trigger.records) == []


def test_locked_ledger_is_retried_by_pubsub_then_launches(start_trigger: Start) -> None:
    trigger = start_trigger(ledger_timeout="0.2")
    holder = sqlite3.connect(trigger.state_dir / "ledger.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the ledger is busy: the function must fail the delivery, not ack it
    try:
        trigger.upload(f"{PREFIX}part-0.parquet")
        wait_for(lambda: trigger.counts()["retry"] >= 2, what="two failed deliveries")
        assert holder.execute("SELECT count(*) FROM launches").fetchone() == (0,)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    [record] = wait_for(trigger.launched, what="the launch after the ledger was released")
    assert record.attempts == 1
    counts = trigger.counts()
    assert counts["launched"] == 1 and counts["retry"] >= 2 and set(counts) == {"launched", "retry"}
    retries = [e for e in trigger.outcomes() if e["outcome"] == "retry"]
    assert all(e["severity"] == "ERROR" and "database is locked" in e["error"] for e in retries)
    time.sleep(1.5)
    assert trigger.counts()["launched"] == 1 and len(recorded_launches(trigger.records)) == 1


def test_failed_launch_is_redelivered_and_then_succeeds(start_trigger: Start, tmp_path: Path) -> None:
    launcher = tmp_path / "late" / "launch.py"  # missing at first: the launch fails like a broken runner
    trigger = start_trigger(launch_command=json.dumps([str(launcher), "{run_id}", "{trigger_uri}"]))
    trigger.upload(f"{PREFIX}part-0.parquet")
    wait_for(lambda: trigger.counts()["retry"] >= 1, what="a failed delivery")
    [failed] = trigger.ledger.records()
    assert failed.status == "failed" and "FileNotFoundError" in failed.error
    script, _ = write_recorder(tmp_path)
    launcher.parent.mkdir(exist_ok=True)
    launcher.write_text(f"#!{sys.executable}\nimport sys\nsys.argv.insert(1, {str(trigger.records)!r})\n"
                        + script.read_text())
    launcher.chmod(0o755)
    [record] = wait_for(trigger.launched, what="the launch after the launcher was fixed")
    assert record.attempts >= 2 and record.error is None
    [spawned] = wait_for(lambda: recorded_launches(trigger.records), what="the spawned process record")
    assert spawned["argv"] == [record.job_id, record.trigger_uri]
    assert trigger.counts()["launched"] == 1


def test_distinct_objects_and_generations_launch_separately(start_trigger: Start) -> None:
    trigger = start_trigger()
    first = trigger.upload(f"{PREFIX}a.parquet")
    second = trigger.upload(f"{PREFIX}b.parquet")
    wait_for(lambda: len(trigger.launched()) == 2, what="two launches")
    again = trigger.upload(f"{PREFIX}a.parquet", b"PAR1 replaced")  # a new generation is new data
    wait_for(lambda: len(trigger.launched()) == 3, what="the launch for the new generation")
    bucket = trigger.bucket.name
    expected = {job_id_for(bucket, b.name, str(b.generation)) for b in (first, second, again)}
    assert {r.job_id for r in trigger.launched()} == expected
    assert first.generation != again.generation
    assert trigger.counts() == Counter({"launched": 3})
    wait_for(lambda: len(recorded_launches(trigger.records)) == 3, what="three spawned processes")


def test_batch_marker_launches_once_for_the_folder(start_trigger: Start, tmp_path: Path) -> None:
    mirror = tmp_path / "landing"
    trigger = start_trigger(markers="_SUCCESS", mirror_dir=str(mirror))
    folder = f"{PREFIX}batch-0007/"
    trigger.upload(folder + "part-0.parquet", b"PAR1 zero")
    trigger.upload(folder + "part-1.parquet", b"PAR1 one")
    trigger.wait_outcomes(2)
    assert trigger.launched() == []
    marker = trigger.upload(folder + "_SUCCESS", b"")
    [record] = wait_for(trigger.launched, what="the batch launch")
    assert record.trigger_uri == f"gs://{trigger.bucket.name}/{folder}_SUCCESS#{marker.generation}"
    assert sorted(p.name for p in (mirror / folder).iterdir()) == ["part-0.parquet", "part-1.parquet"]
    assert (mirror / folder / "part-1.parquet").read_bytes() == b"PAR1 one"
    assert trigger.counts() == Counter({"ignored": 2, "launched": 1})


# ------------------------------------------------------------------------------------------ cloud backend
def test_cloud_backend_creates_one_vertex_job(cloud: LocalCloud, start_trigger: Start, recording_server: Any,
                                              tmp_path: Path) -> None:
    """Same chain with ``CTLOOP_TRIGGER_BACKEND=cloud``: the real aiplatform client creates the PipelineJob
    (REST) and the ctloop config is read from gs://, both answered by the recording server; a redelivered
    notification gets a 409 and is acknowledged."""
    template = compile_tiny_template(tmp_path)
    config = ("labels: {app: ctloop, env: test}\n"
              "gcp: {project: proj-one, region: europe-west4, pipeline_root: gs://proj-one-pipelines/runs,\n"
              "      service_account: ctloop-pipeline@proj-one.iam.gserviceaccount.com}\n")
    server = recording_server
    server.route("GET", r"(/download)?/storage/v1/b/ctloop-config/o/ctloop\.yaml", (200, config.encode()))
    # aiplatform gets-or-creates the pipeline-root bucket before each create (a missing bucket is created).
    missing = (404, {"error": {"code": 404, "message": "Not Found"}})
    server.route("GET", r"/storage/v1/b/proj-one-pipelines", missing)
    server.route("POST", r"/storage/v1/b", lambda r: (200, {"name": r.json["name"]}))
    server.route("GET", r"/storage/v1/b/proj-one-pipelines/iam", (200, {"bindings": [], "etag": "CAE="}))
    server.route("PUT", r"/storage/v1/b/proj-one-pipelines/iam", lambda r: (200, r.json))
    created: set[str] = set()

    def create_job(request: Any) -> tuple[int, Any]:
        job_id = request.query["pipelineJobId"][0]
        if job_id in created:
            return 409, {"error": {"code": 409, "status": "ALREADY_EXISTS", "message": f"{job_id} exists"}}
        created.add(job_id)
        return 200, {"name": f"projects/proj-one/locations/europe-west4/pipelineJobs/{job_id}"}

    jobs = r"/v1/projects/proj-one/locations/europe-west4/pipelineJobs"
    server.route("POST", jobs, create_job)
    server.route("GET", rf"{jobs}/[a-z0-9-]+", lambda r: (200, {"name": r.path[len("/v1/"):]}))  # after a 409
    trigger = start_trigger(backend="cloud", template=str(template), config="gs://ctloop-config/ctloop.yaml",
                            api_endpoint=server.url, raw_env={"STORAGE_EMULATOR_HOST": server.url})
    name = f"{PREFIX}part-0.parquet"
    started = time.monotonic()
    blob = trigger.upload(name)
    wait_for(lambda: server.find("POST", jobs), what="the CreatePipelineJob request")
    latency_ms = (time.monotonic() - started) * 1000
    print(f"upload -> CreatePipelineJob request (cloud backend): {latency_ms:.0f} ms")
    trigger.wait_outcomes(1)
    # Redeliver the same notification: same job id, Vertex answers 409, the function acknowledges.
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": trigger.bucket.name, "objectId": name,
                  "objectGeneration": str(blob.generation), "payloadFormat": "NONE"}
    trigger.publish(b"", attributes)
    trigger.wait_outcomes(2)
    time.sleep(1.5)
    assert trigger.counts() == Counter({"launched": 1, "already_launched": 1})
    requests = server.find("POST", jobs)
    job_id = job_id_for(trigger.bucket.name, name, str(blob.generation))
    assert [r.query["pipelineJobId"] for r in requests] == [[job_id], [job_id]]
    body = requests[0].json
    assert body["serviceAccount"] == "ctloop-pipeline@proj-one.iam.gserviceaccount.com"
    assert body["labels"] == {"app": "ctloop", "env": "test", "trigger": "gcs"}
    assert body["runtimeConfig"]["gcsOutputDirectory"] == "gs://proj-one-pipelines/runs"
    params = body["runtimeConfig"]["parameterValues"]
    assert params["run_id"] == job_id
    assert params["trigger_uri"] == f"gs://{trigger.bucket.name}/{name}#{blob.generation}"
    # The data window ends when the object landed (its timeCreated), so every retry reads the same rows.
    assert datetime.fromisoformat(params["snapshot_time"]) == blob.time_created
    assert params["config"]["backend"] == "cloud" and params["config"]["gcp"]["project"] == "proj-one"
    # The config was read at launch time, once per launch.
    assert len(server.find("GET", r"(/download)?/storage/v1/b/ctloop-config/o/ctloop\.yaml")) == 2
