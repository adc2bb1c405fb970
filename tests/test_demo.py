"""``ctloop demo`` orchestration on the real emulators and the real trigger function.

The training runs themselves are stood in for by a small script (the real pipeline is covered by
test_pipeline_local.py): what is tested here is the loop around them. Two batches land -> two launches in
order, each mirrored into the local landing area, their logs streamed; Ctrl-C stops the running pipeline and
every service.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from ctloop.config import Settings, load_settings
from ctloop.emulators import http_status
from pipelines.demo import run_demo

REPO = Path(__file__).resolve().parents[1]

STAND_IN = """\
import json, sys, time
run_id, trigger_uri, pidfile, hold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
open(pidfile + "." + run_id, "w").write(str(__import__("os").getpid()))
print(f"stand-in run {run_id} for {trigger_uri}", flush=True)
time.sleep(hold)
print("gate decision: pass", flush=True)
"""


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(REPO / "ctloop.yaml", [f"local.workdir={tmp_path / 'work'}",
                                                 "gcp.landing_bucket=demo-landing"])


def _command(tmp_path: Path, hold: float) -> tuple[list[str], Path]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    pidfile = tmp_path / "pid"
    return [sys.executable, str(script), "{run_id}", "{trigger_uri}", str(pidfile), str(hold)], pidfile


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: its parent (the stopped function server) is gone, so init reaps it shortly.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_demo_runs_two_batches_through_the_trigger(settings: Settings, tmp_path: Path) -> None:
    command, _ = _command(tmp_path, hold=0.2)
    lines: list[str] = []
    code = run_demo(settings, rows=300, launch_command=command, predict=False, echo=lines.append)
    assert code == 0, "\n".join(lines)
    launched = [ln for ln in lines if ln.startswith("trigger launched run ")]
    assert len(launched) == 2
    job_ids = [ln.split()[3] for ln in launched]
    assert len(set(job_ids)) == 2
    for job_id, batch in zip(job_ids, ("batch-0001", "batch-0002"), strict=True):
        stand_in = [ln for ln in lines if ln.startswith(f"  | stand-in run {job_id} for gs://demo-landing/")]
        assert len(stand_in) == 1 and f"/ctloop/events/{batch}/_SUCCESS#" in stand_in[0]
    assert lines.count("  | gate decision: pass") == 2
    landing = Path(settings.local.workdir) / "landing" / "ctloop" / "events"
    assert sorted(p.relative_to(landing).as_posix() for p in landing.rglob("*")) == [
        "batch-0001", "batch-0001/part-00000.parquet", "batch-0002", "batch-0002/part-00000.parquet"]


def test_ctrl_c_stops_the_run_and_the_services(settings: Settings, tmp_path: Path) -> None:
    command, pidfile = _command(tmp_path, hold=120)
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("  | stand-in run "):
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    started = time.monotonic()
    assert run_demo(settings, rows=300, launch_command=command, predict=False, echo=echo) == 130
    assert time.monotonic() - started < 60
    assert "\ninterrupted: shutting everything down" in lines
    assert any(line.startswith("stopping run ") for line in lines)
    [pid_path] = tmp_path.glob("pid.*")
    run_pid = int(pid_path.read_text())
    deadline = time.monotonic() + 10
    while _alive(run_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(run_pid), "the launched pipeline process survived Ctrl-C"
    [up] = [line for line in lines if line.startswith("local cloud up")]
    urls = re.findall(r"http://127\.0\.0\.1:\d+", up)
    assert len(urls) == 2  # fake-gcs-server and the function; the emulator is named by host:port
    pubsub = re.search(r"Pub/Sub emulator (127\.0\.0\.1:\d+)", up)
    assert pubsub is not None
    for url in [*urls, f"http://{pubsub.group(1)}/"]:
        assert http_status(url) is None, f"{url} still answers after Ctrl-C"
