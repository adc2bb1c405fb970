"""``ctloop demo``: the whole continuous-training loop on this machine, the way a user would watch it.

1. start the Pub/Sub emulator, fake-gcs-server (notifications on) and the trigger function under
   functions-framework (local backend, batch-marker mode, mirroring the landing bucket into the local landing
   area);
2. upload a sample batch plus its ``_SUCCESS`` marker -> the function launches the first training run, which
   trains, passes the gate and deploys the first model;
3. upload a drifted batch -> the retraining run scores the candidate against the champion; the gate decides;
4. serve the production endpoint and print a prediction.

The demo keeps its state in ``<local.workdir>/demo/`` (its own landing area, registry, runs, ledger and logs),
emptied at each start, so it always begins with no model and never touches the state of ``ctloop run``.
Everything it started is stopped on exit, on errors and on Ctrl-C / SIGTERM / SIGHUP, the running pipeline
(its whole process group: the runner and its step subprocesses) included; the local Spark service cancels the
job of a step that went away and stays, as between runs, until idle (ctloop/spark_service.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from ctloop.config import Settings
from ctloop.errors import CtloopError
from ctloop.gate import COMPARISON_CHECKS
from ctloop.launch_ledger import LaunchRecord, Ledger
from ctloop.local_launch import stop_unfinished
from devtools.emulators import FunctionServer, LocalCloud

REPO = Path(__file__).resolve().parents[1]
TRIGGER_MAIN = REPO / "cloud_functions" / "trigger" / "main.py"
ENTRY_POINT = "on_object_finalized"
MARKER = "_SUCCESS"
SETTINGS_FILE = "ctloop.demo.yaml"
LAUNCH_TIMEOUT = 60.0  # marker upload -> ledger row "launched"; measured at 0.1-0.4 s
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Echo = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def write_settings_file(settings: Settings, path: Path) -> Path:
    """The settings the launched runs read, written via a temp file so a run never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            yaml.safe_dump(settings.to_param(), out, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def prepare_demo_dir(root: Path) -> None:
    """Empty ``root`` for a new demo; refuse a non-empty directory the demo did not create."""
    if root.exists():
        if any(root.iterdir()) and not (root / SETTINGS_FILE).is_file():
            raise CtloopError(f"{root} is not empty and was not created by `ctloop demo` (no {SETTINGS_FILE} in "
                              "it); the demo empties this directory at start: move it away or use another "
                              "--workdir")
        shutil.rmtree(root)
    root.mkdir(parents=True)


@contextlib.contextmanager
def demo_lock(workdir: Path) -> Iterator[None]:
    """One demo per workdir: a second one would empty the first one's directory under it."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".demo.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CtloopError(f"another `ctloop demo` is running with workdir {workdir}; wait for it or use "
                              "another --workdir") from None
        yield  # closing the file releases the lock, also when the process dies


class Demo:
    """The running loop: emulators, the trigger function and the runs it launched."""

    def __init__(self, settings: Settings, *, echo: Echo = _print, launch_command: list[str] | None = None,
                 run_timeout: float = 3600.0, launch_timeout: float = LAUNCH_TIMEOUT) -> None:
        self.workdir = Path(settings.local.workdir).resolve()
        self.root = self.workdir / "demo"
        self.settings = settings.with_overrides({"backend": "local", "local.workdir": str(self.root)})
        self.echo = echo
        self.launch_command = launch_command
        self.run_timeout = run_timeout
        self.launch_timeout = launch_timeout
        self.state_dir = self.root / "trigger"
        self.ledger_path = self.state_dir / "ledger.sqlite"
        self.staging = self.root / "staging"
        self.prefix = f"{self.settings.data.bq_dataset}/{self.settings.data.bq_table}/"
        self.cloud = LocalCloud(log_dir=self.root / "logs", project=self.settings.gcp.project)
        self.function: FunctionServer | None = None
        self.bucket: Any = None
        self.prepared = False  # the directory is this demo's: its ledger lists only runs this demo caused

    # ------------------------------------------------------------------------------------------ set-up
    def start(self) -> None:
        s = self.settings
        prepare_demo_dir(self.root)
        self.prepared = True
        config = write_settings_file(s, self.root / SETTINGS_FILE)
        started = time.monotonic()
        self.cloud.start()
        self.bucket = self.cloud.gcs.client(s.gcp.project).create_bucket(s.gcp.landing_bucket)
        env = {
            "CTLOOP_TRIGGER_BACKEND": "local",
            "CTLOOP_TRIGGER_BUCKET": s.gcp.landing_bucket,
            "CTLOOP_TRIGGER_PREFIX": self.prefix,
            "CTLOOP_TRIGGER_MARKERS": MARKER,
            "CTLOOP_TRIGGER_STATE_DIR": str(self.state_dir),
            "CTLOOP_TRIGGER_MIRROR_DIR": str(s.local.landing_dir),
            "CTLOOP_TRIGGER_CONFIG": str(config),
            "CTLOOP_TRIGGER_LAUNCH_CWD": str(REPO),
        }
        if self.launch_command:
            env["CTLOOP_TRIGGER_LAUNCH_COMMAND"] = json.dumps(self.launch_command)
        self.function = self.cloud.start_function(TRIGGER_MAIN, ENTRY_POINT, env, name="trigger-function")
        self.cloud.pubsub.create_subscription(s.gcp.project, "ctloop-trigger", self.cloud.topic,
                                              push_endpoint=self.function.push_endpoint(self.cloud.topic))
        self.echo(f"local cloud up in {time.monotonic() - started:.1f}s: Pub/Sub emulator {self.cloud.pubsub.host}, "
                  f"fake-gcs-server {self.cloud.gcs.url}, trigger function {self.function.url}")
        self.echo(f"  gs://{s.gcp.landing_bucket} notifies {self.cloud.topic}, pushed to the function "
                  f"(batch mode: a {MARKER} marker starts one run)")
        self.echo(f"  demo state: {self.root} (service logs in logs/, run logs in trigger/logs/)")

    def stop(self) -> None:
        """Stop the runs the function launched, then every service; bounded in time, safe to call twice."""
        started = time.monotonic()
        was_up = self.cloud.pubsub is not None
        ledger = self._ledger()
        runs = self._unfinished(ledger)
        for run in runs:
            self._say(f"stopping run {run.job_id} (process group {run.pid})")
        # While the function server lives, it reaps the run's leader and records its exit code.
        killed = self._stop_runs(ledger) if runs else []
        self.cloud.stop()
        # A run launched between the look-up and the function's stop: nobody else will stop it.
        killed += self._stop_runs(ledger, timeout=2.0, skip={r.job_id for r in runs})
        if was_up:
            forced = f" ({len(killed)} run(s) needed SIGKILL)" if killed else ""
            self._say(f"stopped the trigger function, fake-gcs-server and the Pub/Sub emulator in "
                      f"{time.monotonic() - started:.1f}s{forced}")

    def _ledger(self) -> Ledger | None:
        """The function's launch ledger (None before this demo prepared its directory, or when unreadable)."""
        if not self.prepared:
            return None
        try:
            return Ledger(self.ledger_path)
        except sqlite3.Error as exc:  # the services must still be stopped
            self._say(f"cannot read the launch ledger {self.ledger_path} ({exc}); runs may be left running")
            return None

    def _stop_runs(self, ledger: Ledger | None, **kw: Any) -> list[str]:
        try:
            return stop_unfinished(ledger, **kw) if ledger else []
        except sqlite3.Error as exc:  # the services must still be stopped
            self._say(f"cannot read the launch ledger {self.ledger_path} ({exc}); runs may be left running")
            return []

    def _unfinished(self, ledger: Ledger | None) -> list[LaunchRecord]:
        try:
            return ledger.unfinished() if ledger else []
        except sqlite3.Error as exc:
            self._say(f"cannot read the launch ledger {self.ledger_path} ({exc}); runs may be left running")
            return []

    def _say(self, line: str) -> None:
        with contextlib.suppress(OSError):  # e.g. SIGHUP: the terminal is gone, the shutdown must go on
            self.echo(line)

    # ------------------------------------------------------------------------------------------ batches
    def upload_batch(self, files: list[Path], batch: str) -> str:
        """Upload the batch's files, then its marker; returns the marker's trigger URI."""
        names = []
        for path in files:
            self.bucket.blob(f"{self.prefix}{batch}/{path.name}").upload_from_filename(str(path))
            names.append(path.name)
        marker = self.bucket.blob(f"{self.prefix}{batch}/{MARKER}")
        marker.upload_from_string(b"")
        self.echo(f"  uploaded {', '.join(names)}, then {MARKER}")
        return f"gs://{self.bucket.name}/{marker.name}#{marker.generation}"

    def wait_launch(self, trigger_uri: str) -> LaunchRecord:
        """The run the function launched for ``trigger_uri``; fails after ``launch_timeout`` s."""
        uploaded = time.monotonic()
        deadline = uploaded + self.launch_timeout
        ledger = Ledger(self.ledger_path)
        while True:
            run = ledger.find(trigger_uri)
            if run is not None and run.status == "launched":
                break
            if time.monotonic() > deadline:
                why = run.error if run and run.error else "no launch recorded"
                raise CtloopError(f"the trigger function did not launch a run for {trigger_uri} within "
                                  f"{self.launch_timeout:.0f}s ({why}); see {self.cloud.log_dir}/trigger-function.log")
            time.sleep(0.05)
        self.echo(f"  trigger function launched run {run.job_id} {(time.monotonic() - uploaded) * 1000:.0f} ms after "
                  "the marker landed")
        return run

    def follow(self, run: LaunchRecord, trigger_uri: str) -> LaunchRecord:
        """Stream the run's log until its process ends; returns the final ledger row."""
        deadline = time.monotonic() + self.run_timeout
        ledger = Ledger(self.ledger_path)
        log_path = Path(run.log_path or "")
        with contextlib.ExitStack() as stack:
            log: IO[bytes] | None = None
            pending = b""
            while True:
                if log is None and log_path.is_file():
                    log = stack.enter_context(log_path.open("rb"))
                run = ledger.find(trigger_uri) or run
                if log is not None:
                    pending = self._echo_lines(pending + log.read())
                if run.exit_code is not None:
                    if log is not None:
                        self._echo_lines(pending + log.read() + b"\n")
                    return run
                if time.monotonic() > deadline:
                    raise CtloopError(f"run {run.job_id} still running after {self.run_timeout:.0f}s; "
                                      f"log {run.log_path}")
                time.sleep(0.2)

    def _echo_lines(self, data: bytes) -> bytes:
        """Echo the complete lines of ``data``; return the unfinished rest."""
        end = data.rfind(b"\n") + 1
        for line in data[:end].decode(errors="replace").splitlines():
            if line.strip():
                self.echo(f"  | {line}")
        return data[end:]


def sample_batch(settings: Settings, staging: Path, *, rows: int, seed: int, drift: float,
                 batch: str) -> list[Path]:
    """Sample data files for one batch; a drifted batch covers only the latest months, as new data would."""
    from devtools.sample_data import default_window, write_sample_data

    start, end = default_window()
    if drift > 0:
        months = end.year * 12 + end.month - 1 - 6
        start = start.replace(year=months // 12, month=months % 12 + 1)
    result = write_sample_data(staging, settings, rows=rows, seed=seed, drift=drift, batch=batch, start=start,
                               end=end)
    return list(result.paths)


# ---------------------------------------------------------------------------------------------- what happened
def load_record(settings: Settings, run_id: str) -> Any:
    """The run's record (``<runs_dir>/<run id>/run.json``), or None when the run wrote none."""
    from pipelines.local_run import RunRecord

    path = settings.local.runs_dir / run_id / "run.json"
    return RunRecord.load(path) if path.is_file() else None


def _gate_metrics(record: Any) -> dict[str, Any]:
    return record.artifact("evaluate-gate", "metrics").get("metadata", {}) if record is not None else {}


def describe_outcome(settings: Settings, record: Any, previous: Any = None) -> list[str]:
    """What the run decided and what serves now, in a few lines: drift seen by the champion, the gate's
    decisive checks, the production endpoint's traffic split (read from the registry)."""
    from ctloop.registry import LocalRegistry

    metric = settings.gate.primary_metric
    lines = []
    metrics = _gate_metrics(record)
    before = _gate_metrics(previous).get(metric)
    after = metrics.get(f"champion_{metric}")
    if isinstance(before, float) and isinstance(after, float):
        lines.append(f"drift: the champion's {metric} was {before:.4f} on the test split it was chosen on, "
                     f"{after:.4f} on the new data's test split")
    decision = record.output("evaluate-gate", "decision", "n/a") if record is not None else "n/a"
    reasons = json.loads(record.output("evaluate-gate", "reasons", "[]") or "[]") if record is not None else []
    failed = [r for r in reasons if not r.get("passed")]
    versus = [r for r in reasons if r.get("check") in COMPARISON_CHECKS]
    shown = failed or versus
    lines.append(f"gate: {decision}" + (f" ({'; '.join(str(r.get('message')) for r in shown)})" if shown else ""))
    endpoint = settings.deploy.production_endpoint
    ep = LocalRegistry(settings.local.registry_db).get_endpoint(endpoint) \
        if settings.local.registry_db.is_file() else None
    serving = [f"{d.model} v{d.version} {d.traffic_percent}%" for d in (ep.deployments if ep else ())
               if d.traffic_percent]
    lines.append(f"{endpoint} serves: {', '.join(serving) or 'nothing'}")
    return lines


# ---------------------------------------------------------------------------------------------- the demo
def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signal_handlers(handler: Any, signals: tuple[int, ...]) -> Iterator[None]:
    """Install ``handler`` for ``signals`` (main thread only; elsewhere Python refuses and none is needed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_demo(settings: Settings, *, rows: int = 20_000, drift: float = 0.6, seed: int = 7, echo: Echo = _print,
             launch_command: list[str] | None = None, predict: bool = True,
             run_timeout: float = 3600.0) -> int:
    """Run the loop end to end; 0 when both runs succeeded (whatever the gate decided), 1 when a run failed,
    130 when interrupted (Ctrl-C, SIGTERM or SIGHUP). Everything started is stopped before returning."""
    demo = Demo(settings, echo=echo, launch_command=launch_command, run_timeout=run_timeout)
    started = time.monotonic()
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then installs no handler.
    with demo_lock(demo.workdir), _signal_handlers(_interrupt, SHUTDOWN_SIGNALS):
        try:
            code = _run(demo, rows=rows, drift=drift, seed=seed, predict=predict)
        except KeyboardInterrupt:
            echo("\ninterrupted: stopping everything the demo started")
            code = 130
        finally:
            # A second Ctrl-C must not cut the shutdown short: that would leave the pipeline run behind.
            with _signal_handlers(signal.SIG_IGN, SHUTDOWN_SIGNALS):
                demo.stop()
    if code == 0:
        s = demo.settings
        echo(f"\ndemo finished in {time.monotonic() - started:.0f}s. Reports: {s.local.runs_dir}/<run id>/report.html; "
             f"look around with `ctloop --workdir {demo.root} registry` (or `endpoints`)")
    return code


def _run(demo: Demo, *, rows: int, drift: float, seed: int, predict: bool) -> int:
    echo, s = demo.echo, demo.settings
    echo(f"ctloop demo: landing bucket -> notification -> trigger function -> training pipeline -> gate -> "
         f"{s.deploy.production_endpoint}")
    demo.start()
    records: list[Any] = []
    batches = (("batch-0001", 0.0), ("batch-0002", drift))
    for step, (batch, batch_drift) in enumerate(batches, start=1):
        what = "sample data" if batch_drift == 0 else f"drifted data (drift={batch_drift}, latest 6 months)"
        echo(f"\n[{step}/3] {rows} rows of {what} -> gs://{s.gcp.landing_bucket}/{demo.prefix}{batch}/")
        files = sample_batch(s, demo.staging, rows=rows, seed=seed + step, drift=batch_drift, batch=batch)
        trigger_uri = demo.upload_batch(files, batch)
        run = demo.follow(demo.wait_launch(trigger_uri), trigger_uri)
        record = load_record(s, run.job_id)
        if run.exit_code != 0:
            echo(f"run {run.job_id} failed (exit {run.exit_code}); log {run.log_path}")
            return 1
        records.append(record)
        for line in describe_outcome(s, record, records[0] if step > 1 else None):
            echo(f"  => {line}")
    if predict:
        from pipelines.main_job import predict_from_served_endpoint

        echo(f"\n[3/3] a prediction from the production endpoint {s.deploy.production_endpoint}")
        predict_from_served_endpoint(s, records[-1], lambda line: echo(f"  {line}"))
    return 0


def main() -> None:  # pragma: no cover - `python -m devtools.demo`; the CLI's `ctloop demo` is the usual way
    from ctloop.config import load_settings

    config = Path("ctloop.yaml")
    sys.exit(run_demo(load_settings(config if config.is_file() else None)))


if __name__ == "__main__":
    main()
