"""``ctloop demo``: the whole continuous-training loop on this machine, the way a user would watch it.

1. start the Pub/Sub emulator, fake-gcs-server (notifications on) and the trigger function (local backend,
   batch-marker mode, mirroring the landing bucket into ``local.landing_dir``);
2. upload a sample batch plus its ``_SUCCESS`` marker -> the function launches the first training run, which
   trains, passes the gate and deploys the first model;
3. upload a drifted batch -> the retraining run scores the candidate against the champion; the gate decides;
4. serve the production endpoint and print a prediction.

Everything is stopped on exit, on errors and on Ctrl-C (the running pipeline included).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ctloop.config import Settings
from ctloop.emulators import LocalCloud
from ctloop.errors import CtloopError

REPO = Path(__file__).resolve().parents[1]
TRIGGER_MAIN = REPO / "cloud_functions" / "trigger" / "main.py"
ENTRY_POINT = "on_object_finalized"
MARKER = "_SUCCESS"

Echo = Callable[[str], None]


@dataclass(frozen=True)
class LaunchedRun:
    """A ledger row of the trigger function (``<state_dir>/ledger.sqlite``, table ``launches``)."""

    job_id: str
    status: str
    pid: int | None
    log_path: str | None
    exit_code: int | None
    error: str | None


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


def find_launch(ledger: Path, trigger_uri: str) -> LaunchedRun | None:
    if not ledger.is_file():
        return None
    with contextlib.closing(sqlite3.connect(ledger, timeout=5)) as db:
        row = db.execute("SELECT job_id, status, pid, log_path, exit_code, error FROM launches "
                         "WHERE trigger_uri = ?", (trigger_uri,)).fetchone()
    return LaunchedRun(*row) if row else None


class Demo:
    """The running loop: emulators, the trigger function and the runs it launched."""

    def __init__(self, settings: Settings, *, echo: Echo = print, launch_command: list[str] | None = None,
                 run_timeout: float = 3600.0) -> None:
        workdir = Path(settings.local.workdir).resolve()
        self.settings = settings.with_overrides({"backend": "local", "local.workdir": str(workdir)})
        self.echo = echo
        self.launch_command = launch_command
        self.run_timeout = run_timeout
        self.demo_dir = workdir / "demo"
        self.state_dir = self.demo_dir / "trigger"
        self.prefix = f"{self.settings.data.bq_dataset}/{self.settings.data.bq_table}/"
        self.cloud = LocalCloud(log_dir=self.demo_dir / "logs", project=self.settings.gcp.project)
        self.active: LaunchedRun | None = None
        self.bucket: Any = None

    # ------------------------------------------------------------------------------------------ set-up
    def start(self) -> None:
        s = self.settings
        config = write_settings_file(s, self.demo_dir / "ctloop.demo.yaml")
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
        fn = self.cloud.start_function(TRIGGER_MAIN, ENTRY_POINT, env, name="trigger-function")
        self.cloud.pubsub.create_subscription(s.gcp.project, "ctloop-trigger", self.cloud.topic,
                                              push_endpoint=fn.push_endpoint(self.cloud.topic))
        self.echo(f"local cloud up in {time.monotonic() - started:.1f}s: Pub/Sub emulator "
                  f"{self.cloud.pubsub.host}, GCS {self.cloud.gcs.url} (bucket gs://{s.gcp.landing_bucket}), "
                  f"trigger function {fn.url}")
        self.echo(f"logs: {self.demo_dir / 'logs'}")

    def stop(self) -> None:
        if self.active is not None and self.active.exit_code is None and self.active.pid:
            self.echo(f"stopping run {self.active.job_id} (pid {self.active.pid})")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.active.pid, signal.SIGTERM)  # the run leads its own session
        self.cloud.stop()

    # ------------------------------------------------------------------------------------------ batches
    def upload_batch(self, files: list[Path], batch: str) -> str:
        """Upload the batch's files, then its marker; returns the marker's trigger URI."""
        for path in files:
            self.bucket.blob(f"{self.prefix}{batch}/{path.name}").upload_from_filename(str(path))
        marker = self.bucket.blob(f"{self.prefix}{batch}/{MARKER}")
        marker.upload_from_string(b"")
        self.echo(f"uploaded {len(files)} file(s) + {MARKER} to gs://{self.bucket.name}/{self.prefix}{batch}/")
        return f"gs://{self.bucket.name}/{marker.name}#{marker.generation}"

    def follow(self, trigger_uri: str) -> LaunchedRun:
        """Wait until the function launches the run for ``trigger_uri``; stream its log until it ends."""
        ledger = self.state_dir / "ledger.sqlite"
        uploaded = time.monotonic()
        deadline = uploaded + self.run_timeout
        run = None
        while run is None or run.status != "launched":
            run = find_launch(ledger, trigger_uri)
            if time.monotonic() > deadline or (run and run.status == "failed"):
                raise CtloopError(f"the trigger did not launch a run for {trigger_uri}: "
                                  f"{run.error if run else 'no ledger row'}; see {self.demo_dir / 'logs'}")
            time.sleep(0.05)
        self.active = run
        self.echo(f"trigger launched run {run.job_id} {(time.monotonic() - uploaded) * 1000:.0f} ms after "
                  "the marker landed")
        offset = 0
        while True:
            offset = self._echo_new_lines(Path(run.log_path or ""), offset)
            run = find_launch(ledger, trigger_uri) or run
            self.active = run
            if run.exit_code is not None:
                self._echo_new_lines(Path(run.log_path or ""), offset)
                return run
            if time.monotonic() > deadline:
                raise CtloopError(f"run {run.job_id} still running after {self.run_timeout:.0f}s; "
                                  f"log {run.log_path}")
            time.sleep(0.2)

    def _echo_new_lines(self, path: Path, offset: int) -> int:
        if not path.is_file():
            return offset
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.decode(errors="replace").splitlines():
            self.echo(f"  | {line}")
        return offset + len(complete)


def sample_batch(settings: Settings, staging: Path, *, rows: int, seed: int, drift: float,
                 batch: str) -> list[Path]:
    """Sample data files for one batch; a drifted batch covers only the latest months, as new data would."""
    from ctloop.sample_data import default_window, write_sample_data

    start, end = default_window()
    if drift > 0:
        months = end.year * 12 + end.month - 1 - 6
        start = start.replace(year=months // 12, month=months % 12 + 1)
    result = write_sample_data(staging, settings, rows=rows, seed=seed, drift=drift, batch=batch, start=start,
                               end=end)
    return list(result.paths)


def run_demo(settings: Settings, *, rows: int = 20_000, drift: float = 0.6, seed: int = 7, echo: Echo = print,
             launch_command: list[str] | None = None, predict: bool = True,
             run_timeout: float = 3600.0) -> int:
    """Run the loop end to end; 0 when both runs finished (whatever the gate decided), 130 on Ctrl-C."""
    demo = Demo(settings, echo=echo, launch_command=launch_command, run_timeout=run_timeout)
    staging = demo.demo_dir / "staging"
    try:
        demo.start()
        runs: list[LaunchedRun] = []
        for step, (batch, batch_drift) in enumerate((("batch-0001", 0.0), ("batch-0002", drift)), start=1):
            what = "sample data" if batch_drift == 0 else f"drifted data (drift={batch_drift})"
            echo(f"\n[{step}/2] new {what}: {rows} rows in {batch}")
            files = sample_batch(demo.settings, staging, rows=rows, seed=seed + step, drift=batch_drift,
                                 batch=batch)
            run = demo.follow(demo.upload_batch(files, batch))
            runs.append(run)
            if run.exit_code != 0:
                echo(f"run {run.job_id} failed (exit {run.exit_code}); log {run.log_path}")
                return 1
        if predict:
            _predict(demo.settings, runs[-1].job_id, echo)
        return 0
    except KeyboardInterrupt:
        echo("\ninterrupted: shutting everything down")
        return 130
    finally:
        demo.stop()


def _predict(settings: Settings, run_id: str, echo: Echo) -> None:
    from pipelines.local_run import RunRecord
    from pipelines.main_job import echo_summary, predict_from_served_endpoint

    record = RunRecord.load(settings.local.runs_dir / run_id / "run.json")
    echo("\nretraining run summary:")
    echo_summary(record, echo)
    predict_from_served_endpoint(settings, record, echo)


def main() -> None:  # pragma: no cover - `python -m pipelines.demo` until the CLI wires `ctloop demo`
    from ctloop.config import load_settings

    config = Path("ctloop.yaml")
    sys.exit(run_demo(load_settings(config if config.is_file() else None)))


if __name__ == "__main__":
    main()
