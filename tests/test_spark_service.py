"""The local Spark service: jobs from separate callers share one JVM, see their file as it is now, fail with their
own error, are cancelled when their caller goes away, and the service stops when idle or asked to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ctloop.config import Settings
from ctloop.local_daemon import process_alive
from ctloop.spark_service import run_spark_job, service_address, start_soon, stop_services

pytestmark = pytest.mark.spark

JOB = """
import json
import os

def main(argv, spark):
    if argv and argv[0] == "bad":
        raise ValueError("input x: column y: expected numbers, found text")
    if argv and argv[0] == "endless":
        spark.range(10**12, numPartitions=2).selectExpr("max(id % 7)").collect()
    rows = spark.range(int(argv[0]) if argv else 10).count()
    return {"rows": rows, "pid": os.getpid(), "version": VERSION, "tz": spark.conf.get("spark.sql.session.timeZone")}

VERSION = 1
"""


def _settings(idle: float) -> Settings:
    # Its own idle time gives each test a service of its own (the idle time is part of the service's identity).
    return Settings().with_overrides({"local.spark_service_idle_seconds": idle})


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job.py"
    path.write_text(JOB)
    return path


@pytest.fixture
def service_settings() -> Iterator[Settings]:
    s = _settings(300.0 + (time.time_ns() % 10_000) / 1000)
    yield s
    address = service_address(s)
    if address.info.exists():
        pid = int(json.loads(address.info.read_text())["pid"])
        stop_services(sys.prefix)
        assert _wait_gone(pid, 60)
    _remove_files(s)


def _remove_files(s: Settings) -> None:
    address = service_address(s)
    for path in (address.log, address.lock):
        path.unlink(missing_ok=True)


def test_jobs_from_separate_callers_share_one_service_and_see_their_file_as_it_is_now(
        service_settings: Settings, job: Path) -> None:
    first = run_spark_job(service_settings, job, ["1000"], name="first")
    assert first["rows"] == 1000 and first["pid"] != os.getpid() and first["tz"] == "UTC"
    # Another process, the same service.
    code = ("import sys, json; from ctloop.config import Settings; from ctloop.spark_service import run_spark_job; "
            "s = Settings.from_param(json.loads(sys.argv[1])); "
            "print(json.dumps(run_spark_job(s, sys.argv[2], ['7'], name='second')))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(service_settings.to_param()),
                          str(job)], capture_output=True, text=True, check=True, timeout=300)
    second = json.loads(out.stdout)
    assert (second["rows"], second["pid"]) == (7, first["pid"])
    job.write_text(JOB.replace("VERSION = 1", "VERSION = 2"))
    assert run_spark_job(service_settings, job, [], name="third")["version"] == 2


def test_a_service_started_ahead_serves_the_first_job_and_is_started_once(service_settings: Settings,
                                                                          job: Path) -> None:
    start_soon(service_settings)
    start_soon(service_settings)  # it is starting: not a second one
    address = service_address(service_settings)
    pid = int(address.starting.read_text()) if address.starting.exists() else json.loads(
        address.info.read_text())["pid"]
    assert run_spark_job(service_settings, job, ["4"], name="first")["pid"] == pid
    assert not address.starting.exists()
    start_soon(service_settings)  # it is listening
    assert run_spark_job(service_settings, job, ["4"], name="second")["pid"] == pid


def test_a_jobs_value_error_reaches_its_caller_as_the_same_error(service_settings: Settings, job: Path) -> None:
    with pytest.raises(ValueError, match=r"^input x: column y: expected numbers, found text$"):
        run_spark_job(service_settings, job, ["bad"], name="bad")
    assert run_spark_job(service_settings, job, ["3"], name="after")["rows"] == 3


def test_callers_starting_at_once_start_one_service(service_settings: Settings, job: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: run_spark_job(service_settings, job, [str(n)], name=f"j{n}"), range(4)))
    assert [a["rows"] for a in answers] == [0, 1, 2, 3]
    assert len({a["pid"] for a in answers}) == 1


def test_a_job_whose_caller_went_away_is_cancelled_and_the_service_serves_on(
        service_settings: Settings, job: Path) -> None:
    pid = run_spark_job(service_settings, job, ["1"], name="warm")["pid"]
    code = ("import sys, json; from ctloop.config import Settings; from ctloop.spark_service import run_spark_job; "
            "run_spark_job(Settings.from_param(json.loads(sys.argv[1])), sys.argv[2], ['endless'], name='endless')")
    caller = subprocess.Popen([sys.executable, "-c", code, json.dumps(service_settings.to_param()),
                               str(job)])
    log = service_address(service_settings).log
    deadline = time.monotonic() + 120
    while "endless (ctloop-job-2): started" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # its Spark tasks are running
    caller.kill()
    caller.wait()
    started = time.monotonic()
    assert run_spark_job(service_settings, job, ["5"], name="next") == {
        "rows": 5, "pid": pid, "version": 1, "tz": "UTC"}
    # An uncancelled pass over 10^12 rows would hold both cores for many minutes.
    assert time.monotonic() - started < 60
    text = log.read_text()
    assert "ctloop-job-2: the client went away; cancelling its Spark jobs" in text
    assert "endless (ctloop-job-2): failed" in text and "SPARK_JOB_CANCELLED" in text


def test_an_idle_service_stops_and_the_next_job_starts_another(job: Path) -> None:
    s = _settings(1.0 + (time.time_ns() % 1000) / 1e6)
    pid = run_spark_job(s, job, ["2"], name="one")["pid"]
    assert _wait_gone(pid, 60)
    address = service_address(s)
    assert not address.socket.exists() and not address.info.exists()
    again = run_spark_job(s, job, ["2"], name="two")
    assert again["pid"] != pid
    assert _wait_gone(again["pid"], 60)
    _remove_files(s)
