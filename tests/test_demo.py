"""``ctloop demo`` on the real emulators, the real trigger function and the real training pipeline.

- end to end on 3000 rows: two uploads -> two runs launched by the function, first model deployed, drifted batch
  retrained and gated, a prediction from the served endpoint that the deployed model confirms;
- Ctrl-C (SIGINT to the demo's process group, as a terminal sends it) while Spark runs: every process the demo
  started is gone, the pipeline's JVM included;
- a failing run, the demo's directory and lock, and the process-group stop, on small stand-ins.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from ctloop.config import Settings, load_settings
from ctloop.errors import CtloopError
from ctloop.history import features, to_micros
from ctloop.local_launch import group_members, stop_groups
from ctloop.online_store import STORE_FILE, SQLiteStore
from ctloop.spark_service import service_address, stop_services
from devtools.demo import demo_lock, prepare_demo_dir, run_demo
from devtools.emulators import http_status

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(REPO / "ctloop.yaml", [f"local.workdir={tmp_path / 'work'}",
                                                 "gcp.landing_bucket=demo-landing"])


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process now."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = text[text.rfind(")") + 2:].split()[:2]
        out[int(stat.parent.name)] = (int(ppid), state, cmdline)
    return out


def _descendants(root: int) -> dict[int, str]:
    procs = _processes()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, cmdline) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = cmdline
                frontier.append(pid)
    return found


def _alive(pids: list[int]) -> list[int]:
    procs = _processes()
    return [pid for pid in pids if pid in procs and procs[pid][1] != "Z"]


def _services_down(lines: list[str]) -> None:
    [up] = [line for line in lines if line.startswith("local cloud up")]
    pubsub = re.search(r"Pub/Sub emulator (127\.0\.0\.1:\d+)", up)
    urls = re.findall(r"http://127\.0\.0\.1:\d+", up)
    assert pubsub is not None and len(urls) == 2  # fake-gcs-server and the function
    for url in [*urls, f"http://{pubsub.group(1)}/"]:
        assert http_status(url) is None, f"{url} still answers after the demo"


def _ledger_rows(root: Path) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(root / "trigger" / "ledger.sqlite") as db:
        return db.execute("SELECT job_id, trigger_uri, status, pid, exit_code FROM launches "
                          "ORDER BY created_at").fetchall()


def test_demo_end_to_end_on_the_real_pipeline(settings: Settings) -> None:
    from ctloop.model_runtime import load_model as load_model_dir
    from ctloop.registry import LocalRegistry
    from pipelines.local_run import RunRecord

    lines: list[str] = []
    code = run_demo(settings, rows=3000, echo=lines.append)
    text = "\n".join(lines)
    assert code == 0, text
    root = Path(settings.local.workdir).resolve() / "demo"

    # Two markers -> two runs, launched by the function, in order, each streamed while it ran.
    rows = _ledger_rows(root)
    assert [(r[2], r[4]) for r in rows] == [("launched", 0), ("launched", 0)]
    job_ids = [r[0] for r in rows]
    assert [ln.split()[4] for ln in lines if ln.startswith("  trigger function launched run ")] == job_ids
    records = [RunRecord.load(root / "runs" / job_id / "run.json") for job_id in job_ids]
    for (job_id, trigger_uri, *_), record, batch in zip(rows, records, ("batch-0001", "batch-0002"), strict=True):
        assert trigger_uri.startswith(f"gs://demo-landing/ctloop/events/{batch}/_SUCCESS#")
        assert record.parameters["trigger_uri"] == trigger_uri and record.status == "SUCCEEDED"
        assert f"  | ctloop run {job_id} (local: DuckDB, Spark local[2], scikit-learn, SQLite registry)" in lines
        assert f"  | status: SUCCEEDED in {record.seconds:.1f}s; gate decision: " \
               f"{record.output('evaluate-gate', 'decision')}" in lines
    landing = root / "landing" / "ctloop" / "events"
    assert sorted(p.relative_to(landing).as_posix() for p in landing.rglob("*.parquet")) == [
        "batch-0001/part-00000.parquet", "batch-0002/part-00000.parquet"]

    # The first run had no champion: it passed on the floors and calibration and deployed version 1.
    first, second = records
    assert first.output("evaluate-gate", "decision") == "pass"
    assert "  => gate: pass (no champion: first model, judged on the floors and calibration only)" in lines
    assert lines.index("  => ctloop-production serves: ctloop-churn v1 100%") < lines.index(
        next(ln for ln in lines if ln.startswith("\n[2/3]")))

    # The retraining run scored the champion on the drifted data; the gate's decision is what serves now.
    m1 = first.artifact("evaluate-gate", "metrics")["metadata"]
    m2 = second.artifact("evaluate-gate", "metrics")["metadata"]
    assert (f"  => drift: the champion's roc_auc was {m1['roc_auc']:.4f} on the test split it was chosen on, "
            f"{m2['champion_roc_auc']:.4f} on the new data's test split") in lines
    decision = second.output("evaluate-gate", "decision")
    [gate] = [ln for ln in lines if ln.startswith("  => gate: ") and "no champion" not in ln]
    assert gate.startswith(f"  => gate: {decision} (") and "champion" in gate
    registry = LocalRegistry(root / "registry.sqlite")
    expected = 2 if decision == "pass" else 1
    [deployed] = [d for d in registry.get_endpoint("ctloop-production").deployments if d.traffic_percent]
    assert (deployed.version, deployed.traffic_percent) == (expected, 100)
    assert lines.count(f"  => ctloop-production serves: ctloop-churn v{expected} 100%") == (2 if expected == 1
                                                                                             else 1)

    # The served endpoint's answer is the deployed model's own prediction for the printed instance.
    instance = json.loads(next(ln for ln in lines if ln.startswith("  instance:")).split(":", 1)[1])
    answer = json.loads(next(ln for ln in lines if ln.startswith("  prediction:")).split(":", 1)[1])
    model = load_model_dir(registry.get_version("ctloop-churn", expected).artifact_uri)
    # The instance is what a client sends (entity id, source features); the history features are the ones
    # the entity's state in the online store gives for the event's time.
    spec = model.card.spec
    looked_up = answer["onlineFeatures"]
    [stored] = SQLiteStore(root / STORE_FILE).read([instance[spec.id_column]]).values()
    event_us = to_micros(datetime.fromisoformat(looked_up["eventTime"]))
    assert looked_up["known"] and looked_up["values"] == features(stored.state, event_us, spec)
    cols = {name: [{**instance, **looked_up["values"]}[name]] for name in model.card.features}
    probability = float(model.probabilities(cols)[0])
    assert answer["probability"] == pytest.approx(probability, abs=1e-9)
    assert answer["label"] == int(probability >= model.card.threshold)

    assert lines[-1].startswith("\ndemo finished in ")
    _services_down(lines)
    assert not [pid for *_, pid, _ in rows if group_members(pid)]


def test_ctrl_c_stops_the_pipeline_spark_and_every_service(tmp_path: Path) -> None:
    """Ctrl-C stops the run and every service the demo started; the local Spark service (ctloop/spark_service.py)
    lives on, as it does between runs, but cancels the job of the step that went away."""
    out = tmp_path / "demo.out"
    # A Spark service of its own (the idle time is part of its identity), so this demo's run starts it.
    idle = f"local.spark_service_idle_seconds={600 + time.time_ns() % 100_000 / 1000:.3f}"
    service_log = service_address(load_settings(REPO / "ctloop.yaml", [idle])).log
    with open(out, "wb") as log:
        demo = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--workdir", str(tmp_path / "work"),
                                 "--set", idle, "demo", "--rows", "1000"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        started: dict[int, str] = {}
        while time.monotonic() < deadline and demo.poll() is None:
            started = _descendants(demo.pid)
            job_started = service_log.is_file() and "transform (ctloop-job-1): started" in service_log.read_text()
            if job_started and any("pyspark-shell" in cmd for cmd in started.values()):
                break
            time.sleep(0.2)
        assert demo.poll() is None, out.read_text()
        kinds = {"Pub/Sub emulator": "cloud-pubsub-emulator", "fake-gcs-server": "fake-gcs-server",
                 "functions-framework": "functions_framework", "pipeline run": "pipelines.cli --config",
                 "step executor": "kfp.dsl.executor_main", "Spark JVM": "pyspark-shell"}
        for kind, needle in kinds.items():
            assert any(needle in cmd for cmd in started.values()), f"no {kind} among {started}"

        interrupted = time.monotonic()
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        assert demo.wait(timeout=60) == 130
        assert time.monotonic() - interrupted < 30
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    text = out.read_text()
    deadline = time.monotonic() + 30
    while "the client went away; cancelling" not in service_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    service_text = service_log.read_text()
    stop_services(sys.prefix)
    service_log.unlink()
    assert re.search(r"ctloop-job-1: the client went away; cancelling its Spark jobs", service_text), service_text
    assert "ctloop-transform (ctloop-job-1): failed" in service_text, service_text
    service = {pid for pid, cmd in started.items() if "ctloop.spark_service" in cmd or "pyspark-shell" in cmd}
    assert service, started
    started = {pid: cmd for pid, cmd in started.items() if pid not in service}
    assert "\ninterrupted: stopping everything the demo started\n" in text
    assert re.search(r"^stopping run ctloop-train-[0-9a-f]{16} \(process group \d+\)$", text, re.M), text
    assert re.search(r"^stopped the trigger function, fake-gcs-server and the Pub/Sub emulator in [\d.]+s$",
                     text, re.M), text
    deadline = time.monotonic() + 10
    while _alive(list(started)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not {pid: started[pid] for pid in _alive(list(started))}, "processes survived Ctrl-C"


def test_a_failing_run_ends_the_demo_with_its_log(settings: Settings, tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text("import sys\nprint('run', sys.argv[1], 'for', sys.argv[2])\nprint('no data here')\n"
                      "sys.exit(3)\n")
    lines: list[str] = []
    code = run_demo(settings, rows=300, launch_command=[sys.executable, str(script), "{run_id}", "{trigger_uri}"],
                    echo=lines.append)
    assert code == 1
    [launched] = [ln for ln in lines if ln.startswith("  trigger function launched run ")]
    job_id = launched.split()[4]
    assert f"  | run {job_id} for gs://demo-landing/ctloop/events/batch-0001/_SUCCESS#" in "\n".join(lines)
    assert "  | no data here" in lines
    log = Path(settings.local.workdir).resolve() / "demo" / "trigger" / "logs" / f"{job_id}.log"
    assert f"run {job_id} failed (exit 3); log {log}" in lines
    assert not any("[2/3]" in ln for ln in lines)
    _services_down(lines)


def test_demo_dir_is_emptied_but_a_foreign_one_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    (root / "runs").mkdir(parents=True)
    (root / "ctloop.demo.yaml").write_text("{}")
    (root / "runs" / "old.json").write_text("{}")
    prepare_demo_dir(root)
    assert root.is_dir() and not any(root.iterdir())

    foreign = tmp_path / "other" / "demo"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CtloopError, match=r"other/demo is not empty and was not created by `ctloop demo`"):
        prepare_demo_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_one_demo_per_workdir(tmp_path: Path) -> None:
    with demo_lock(tmp_path):
        child = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                "from devtools.demo import demo_lock\n"
                                f"with demo_lock(Path({str(tmp_path)!r})): pass"],
                               cwd=REPO, capture_output=True, text=True)
        assert child.returncode == 1 and "another `ctloop demo` is running with workdir" in child.stderr
    with demo_lock(tmp_path):  # released on exit
        pass


def test_stop_groups_escalates_to_sigkill_for_the_whole_group(tmp_path: Path) -> None:
    code = ("import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # inherited by the child
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('ready', flush=True); time.sleep(60)\n")
    stubborn = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
        assert len(group_members(stubborn.pid)) == 2
        started = time.monotonic()
        assert stop_groups([stubborn.pid, polite.pid], timeout=1.0) == [stubborn.pid]
        assert time.monotonic() - started < 5
        assert polite.wait(timeout=5) == -signal.SIGTERM
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while group_members(stubborn.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_members(stubborn.pid) == []
    finally:
        for proc in (stubborn, polite):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
