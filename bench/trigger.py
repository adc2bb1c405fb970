"""Suite ``trigger``: upload -> notification -> function -> launch, on the local emulator chain.

The chain is the one tests/test_trigger_chain.py wires: fake-gcs-server publishes OBJECT_FINALIZE to the Pub/Sub
emulator, a push subscription delivers it to cloud_functions/trigger/main.py served by functions-framework, and
the function's local launcher claims the job in its ledger and spawns the launch command. The launch command is
a cheap real one (``sh -c 'date +%s.%N >> <marks>/<run id>'``), so the trigger is measured, not training: each
launch appends its own start time, which also counts the launches.

Moments per upload: upload call start and end (this process), function invoked (the ledger claim time), pipeline
launched (the time the launched process wrote). Baseline: the same push body posted straight to the function,
skipping Cloud Storage and Pub/Sub.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import Figure, Section, Table, fmt_number
from bench.stats import percentile, summarize
from bench.svg import line_chart
from bench.workspace import REPO, Context

TRIGGER_DIR = REPO / "cloud_functions" / "trigger"
ENTRY_POINT = "on_object_finalized"
PREFIX = "bench/"
LAUNCH_SCRIPT = 'date +%s.%N >> "$1/$2"'  # $1 = marks folder, $2 = run id


def _job_id_for() -> Callable[[str, str, str], str]:
    """The function bundle's own job-id rule (the bundle is imported as functions-framework does)."""
    if str(TRIGGER_DIR) not in sys.path:
        sys.path.insert(0, str(TRIGGER_DIR))
    from ctloop_trigger.jobs import job_id_for

    return job_id_for


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not seen within {timeout:.0f} s")


class ChainProbe:
    """Reads what the function and the launched processes left behind."""

    def __init__(self, marks: Path, ledger: Path, function_log: Path) -> None:
        self.marks = marks
        self.ledger = ledger
        self.function_log = function_log

    def launches(self, job_id: str) -> list[float]:
        """Start times written by each launched process for ``job_id`` (one line per launch)."""
        try:
            text = (self.marks / job_id).read_text()
        except FileNotFoundError:
            return []
        return [float(x) for x in text.split()]

    def wait_launch(self, job_id: str, timeout: float = 30.0) -> float:
        return wait_for(lambda: self.launches(job_id), timeout, f"launch of {job_id}")[0]

    def claimed_at(self, job_id: str) -> float | None:
        with sqlite3.connect(self.ledger, timeout=5) as db:
            row = db.execute("SELECT claimed_at FROM launches WHERE job_id = ?", (job_id,)).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def outcomes(self) -> list[dict[str, Any]]:
        lines = self.function_log.read_text(errors="replace").splitlines()
        found = []
        for line in lines:
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if "outcome" in entry:
                    found.append(entry)
        return found


def push_body(bucket: str, name: str, generation: str, subscription: str) -> dict[str, Any]:
    """A Pub/Sub push request carrying an OBJECT_FINALIZE notification (attributes only, payload NONE)."""
    return {"message": {"data": "", "messageId": uuid.uuid4().hex, "publishTime": "2025-03-01T10:00:00Z",
                        "attributes": {"eventType": "OBJECT_FINALIZE", "bucketId": bucket, "objectId": name,
                                       "objectGeneration": generation, "payloadFormat": "NONE"}},
            "subscription": subscription}


def run(ctx: Context) -> Section:
    import httpx
    from google.pubsub_v1 import PubsubMessage

    from devtools.emulators import LocalCloud

    n_uploads, n_direct, n_dups = (12, 10, 10) if ctx.quick else (60, 30, 50)
    section = Section("trigger", f"Trigger latency on the emulator chain ({n_uploads} uploads)")
    job_id_for = _job_id_for()
    root = ctx.workdir / "trigger"
    shutil.rmtree(root, ignore_errors=True)
    marks, state = root / "launches", root / "state"
    marks.mkdir(parents=True)
    ctx.echo("  trigger: starting the Pub/Sub emulator and fake-gcs-server ...")
    t = time.perf_counter()
    with LocalCloud(log_dir=root / "emulators") as cloud:
        emulators_start = time.perf_counter() - t
        bucket_name = f"bench-{uuid.uuid4().hex[:12]}"
        bucket = cloud.gcs.client().create_bucket(bucket_name)
        env = {"CTLOOP_TRIGGER_BACKEND": "local", "CTLOOP_TRIGGER_BUCKET": bucket_name,
               "CTLOOP_TRIGGER_PREFIX": PREFIX, "CTLOOP_TRIGGER_STATE_DIR": str(state), "CTLOOP_TRIGGER_MARKERS": "",
               "CTLOOP_TRIGGER_LAUNCH_COMMAND": json.dumps(["sh", "-c", LAUNCH_SCRIPT, "sh", str(marks),
                                                            "{run_id}"])}
        t = time.perf_counter()
        server = cloud.start_function(TRIGGER_DIR / "main.py", ENTRY_POINT, env, name="trigger-bench")
        function_start = time.perf_counter() - t
        subscription = cloud.pubsub.create_subscription(cloud.project, f"push-{bucket_name}", cloud.topic,
                                                        push_endpoint=server.push_endpoint(cloud.topic))
        probe = ChainProbe(marks, state / "ledger.sqlite", server.process.log_path)

        def upload(name: str) -> dict[str, float]:
            blob = bucket.blob(name)
            t0 = time.time()
            blob.upload_from_string(b"PAR1 bench")
            t1 = time.time()
            job_id = job_id_for(bucket_name, name, str(blob.generation))
            launched = probe.wait_launch(job_id)
            invoked = probe.claimed_at(job_id)
            return {"start": t0, "uploaded": t1, "invoked": invoked or float("nan"), "launched": launched,
                    "job_id": job_id, "generation": str(blob.generation)}

        ctx.echo("  trigger: first upload to the fresh function (cold) ...")
        cold = upload(f"{PREFIX}cold/part-00000.parquet")
        ctx.echo(f"  trigger: {n_uploads} uploads, one at a time ...")
        chain = [upload(f"{PREFIX}chain/part-{i:05d}.parquet") for i in range(n_uploads)]

        ctx.echo(f"  trigger: {n_direct} push requests straight to the function (baseline) ...")
        direct = []
        with httpx.Client(timeout=30) as client:
            for i in range(n_direct):
                name, generation = f"{PREFIX}direct/part-{i:05d}.parquet", str(10**15 + i)
                body = push_body(bucket_name, name, generation, subscription)
                job_id = job_id_for(bucket_name, name, generation)
                t0 = time.time()
                client.post(server.push_endpoint(cloud.topic), json=body).raise_for_status()
                t1 = time.time()
                direct.append({"start": t0, "answered": t1, "invoked": probe.claimed_at(job_id) or float("nan"),
                               "launched": probe.wait_launch(job_id), "job_id": job_id})

        ctx.echo(f"  trigger: {n_direct} notifications published straight to Pub/Sub (skipping storage) ...")
        publisher = cloud.pubsub.publisher()
        published = []
        for i in range(n_direct):
            name, generation = f"{PREFIX}published/part-{i:05d}.parquet", str(10**15 + i)
            job_id = job_id_for(bucket_name, name, generation)
            message = PubsubMessage(data=b"", attributes=push_body(bucket_name, name, generation,
                                                                   subscription)["message"]["attributes"])
            t0 = time.time()
            publisher.publish(topic=cloud.topic, messages=[message])
            t1 = time.time()
            published.append({"start": t0, "answered": t1, "launched": probe.wait_launch(job_id),
                              "invoked": probe.claimed_at(job_id) or float("nan"), "job_id": job_id})

        ctx.echo(f"  trigger: the first upload's notification published {n_dups} more times ...")
        target = chain[0]
        before = len(probe.outcomes())
        attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": bucket_name,
                      "objectId": f"{PREFIX}chain/part-00000.parquet", "objectGeneration": target["generation"],
                      "payloadFormat": "NONE"}
        t0 = time.perf_counter()
        for _ in range(n_dups):
            publisher.publish(topic=cloud.topic, messages=[PubsubMessage(data=b"", attributes=attributes)])
        wait_for(lambda: len(probe.outcomes()) >= before + n_dups, 60, f"{n_dups} duplicate deliveries")
        drained = time.perf_counter() - t0
        time.sleep(1.5)  # unacknowledged pushes come back after ~1 s: give them the chance to launch again
        outcomes = probe.outcomes()
        dup_outcomes = outcomes[before:]
        launches_after = len(probe.launches(target["job_id"]))

    return _section(section, cold, chain, direct, published, dup_outcomes, outcomes, launches_after, drained, n_dups,
                    emulators_start, function_start)


def _ms(rows: list[dict[str, float]], end: str, start: str) -> list[float]:
    return [(r[end] - r[start]) * 1000 for r in rows]


Rows = list[dict[str, Any]]


def _section(section: Section, cold: dict[str, Any], chain: Rows, direct: Rows, published: Rows,
             dup_outcomes: Rows, outcomes: Rows, launches_after: int, drained: float, n_dups: int,
             emulators_start: float, function_start: float) -> Section:
    total = _ms(chain, "launched", "start")
    base = _ms(direct, "launched", "start")
    dup_seconds = [e["seconds"] * 1000 for e in dup_outcomes if e.get("outcome") == "already_launched"
                   and "seconds" in e]
    first_seconds = [e["seconds"] * 1000 for e in outcomes if e.get("outcome") == "launched" and "seconds" in e]
    dup_kinds = sorted({e.get("outcome", "?") for e in dup_outcomes})
    section.figures += [
        Figure("upload → launched, p50", percentile(total, 50), "ms", "push straight to the function",
               percentile(base, 50)),
        Figure("upload → launched, p95", percentile(total, 95), "ms", "push straight to the function",
               percentile(base, 95), target=("<", 1000.0)),
        Figure(f"{n_dups} duplicate deliveries: launches", launches_after, "", "expected", 1, target=("==", 1)),
        Figure("duplicate delivery, time in function p50", percentile(dup_seconds, 50) if dup_seconds else None,
               "ms", "first delivery (launch), in function", percentile(first_seconds, 50)
               if first_seconds else None),
        Figure(f"{n_dups} duplicates published → all handled, per delivery", drained * 1000 / n_dups, "ms",
               "upload → launched p50", percentile(total, 50)),
    ]
    segments = [
        ("upload call (client → fake-gcs-server)", _ms(chain, "uploaded", "start")),
        ("upload returned → function invoked (notification, Pub/Sub push)", _ms(chain, "invoked", "uploaded")),
        ("function invoked → launched process running (ledger, spawn)", _ms(chain, "launched", "invoked")),
        ("total: upload start → launched", total),
        ("publish to Pub/Sub → function invoked (push delivery alone)", _ms(published, "invoked", "start")),
        ("publish to Pub/Sub → launched", _ms(published, "launched", "start")),
        ("baseline: push POST → function invoked", _ms(direct, "invoked", "start")),
        ("baseline: function invoked → launched", _ms(direct, "launched", "invoked")),
        ("baseline total: push POST → launched", base),
    ]
    rows = []
    for label, values in segments:
        values = [v for v in values if v == v]  # a missing ledger time is NaN: leave it out
        if values:
            s = summarize(values)
            rows.append([label, s.n, fmt_number(s.p50), fmt_number(s.p95), fmt_number(s.maximum)])
    section.tables.append(Table("Latency by segment (ms)", ["segment", "n", "p50", "p95", "max"], rows))
    section.notes += [
        f"Cold: the first upload after the function started took {(cold['launched'] - cold['start']) * 1000:.0f} "
        f"ms to launch; emulators started in {emulators_start:.1f} s, the function server in {function_start:.1f} s.",
        f"Duplicates: {n_dups} copies of an already launched notification were published; the function answered "
        f"each ({', '.join(dup_kinds)}) and the job's launch count stayed {launches_after}; all handled "
        f"{drained:.2f} s after the first publish.",
        "Uploads go one at a time (each waits for its launch), so this is latency, not throughput under load.",
    ]
    section.plots["trigger_latency.svg"] = line_chart(
        "Trigger latency distribution", "percentile", "ms",
        {"upload → launched (emulator chain)": _quantile_curve(total),
         "publish to Pub/Sub → launched": _quantile_curve(_ms(published, "launched", "start")),
         "push straight to the function → launched": _quantile_curve(base)},
        x_ticks=[0, 10, 25, 50, 75, 90, 100])
    section.data = {"chain": chain, "direct": direct, "published": published, "cold": cold, "duplicates": dup_outcomes,
                    "launches_after_duplicates": launches_after, "drained_seconds": drained}
    return section


def _quantile_curve(values: list[float]) -> list[tuple[float, float]]:
    return [(q, percentile(values, q)) for q in (0, 10, 25, 50, 75, 90, 95, 99, 100)]
