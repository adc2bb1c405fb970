"""The local Spark service: one long-lived local Spark JVM that runs the local steps' Spark jobs, as Dataproc
runs the cloud's batches.

A step submits its job (the standalone job file and its arguments, exactly what the cloud backend gives
Dataproc) over a Unix socket. The service runs the file's ``main(argv, spark=...)`` in a session of its own
(``newSession``: its own SQL settings, the JVM shared) and answers with the job's report or its error. The
first job starts the service, detached, with its log beside its socket; it stops after
``local.spark_service_idle_seconds`` without a job (0: no service, every job starts and stops a JVM of its own).

Why: a fresh JVM spends most of a small job compiling (bench/: the transform's 100k-row job takes several times
longer in a fresh JVM than in a warm one). A client that goes away (its step stopped) cancels its job.

Protocol, one JSON object per line. Client: ``{"job_file", "argv", "name"}`` or ``{"stop": true}``. Service:
``{"accepted": pid}``, then ``{"result": report}`` or ``{"error": {"type", "builtin", "message"}}``.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import hashlib
import itertools
import json
import logging
import os
import runpy
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ctloop import local_daemon
from ctloop.config import Settings
from ctloop.errors import CtloopError
from ctloop.local_daemon import (
    DaemonAddress,
    announce,
    connect,
    locked,
    read_line,
    spawn,
    starting_pid,
    stop_daemons,
    tail,
    wait_listening,
)

log = logging.getLogger("ctloop.spark_service")

START_TIMEOUT_S = 180.0  # a cold JVM on a busy 2-core machine; the service says why when it fails sooner


class SparkServiceError(CtloopError):
    """The local Spark service could not be started or reached, or stopped during a job."""


def service_address(settings: Settings) -> DaemonAddress:
    """The service for this environment and these Spark settings: another interpreter, other Spark settings or
    another version of this module or the session's gets a service of its own."""
    local = settings.local
    return DaemonAddress.of("spark", {
        "python": sys.executable, "prefix": sys.prefix, "master": local.spark_master,
        "memory": local.spark_driver_memory, "partitions": local.spark_shuffle_partitions,
        "idle": local.spark_service_idle_seconds,
        # Read, not imported: importing the session module would import pyspark into every caller.
        "code": [hashlib.sha256(Path(__file__).with_name(f).read_bytes()).hexdigest()
                 for f in ("spark_service.py", "spark_session.py")],
    })


def run_spark_job(settings: Settings, job_file: Path, argv: list[str], *, name: str,
                  spark: Any = None, input_path: str | None = None) -> dict[str, Any]:
    """Run a standalone Spark job file's ``main(argv, spark=...)`` locally; returns its report.

    In ``spark`` (a caller's session) when given; else on the local Spark service; with the service off, in a
    session started for this job and stopped after it (the size of the Parquet input at ``input_path`` picks its
    JIT). A job's ``ValueError`` (bad data) reaches the caller as a ``ValueError`` with the same message in every
    case.
    """
    if spark is not None:
        return _main_of(job_file)(argv, spark=spark)
    if settings.local.spark_service_idle_seconds <= 0:
        from ctloop.spark_session import local_spark, parquet_rows

        session = local_spark(settings, app_name=name, rows=parquet_rows(input_path) if input_path else None)
        try:
            return _main_of(job_file)(argv, spark=session)
        finally:
            session.stop()
    return submit(settings, job_file, argv, name)


def _main_of(job_file: Path) -> Any:
    # The file as it is now, in a module of its own: a long-lived service never runs a stale copy, and
    # concurrent jobs never share a module's state. Its functions pickle by value, as under spark-submit.
    return runpy.run_path(str(job_file), run_name=f"ctloop_job_{next(_job_numbers)}")["main"]


_job_numbers = itertools.count(1)


# --- client -------------------------------------------------------------------------------------------------


def submit(settings: Settings, job_file: Path, argv: list[str], name: str) -> dict[str, Any]:
    """Run the job on the service (started if it is not running) and wait for its answer."""
    address = service_address(settings)
    request = {"job_file": str(Path(job_file).resolve()), "argv": argv, "name": name}
    for _ in range(3):  # a service that was stopping when we called: start another
        conn = _accepted(settings, address, request)
        if conn is not None:
            break
    else:
        raise SparkServiceError(f"local Spark service {address.socket}: it stopped three times before accepting "
                                f"job {name}; its log: {address.log}")
    with conn, conn.makefile("rb") as replies:
        answer = replies.readline()
    if not answer:
        raise SparkServiceError(f"local Spark service {address.socket}: it stopped during job {name}; its log "
                                f"(last lines):\n{tail(address.log)}")
    reply = json.loads(answer)
    if "result" in reply:
        return reply["result"]
    error = reply["error"]
    kind = getattr(builtins, error["type"], None) if error["builtin"] else None
    if isinstance(kind, type) and issubclass(kind, Exception):
        raise kind(error["message"])
    raise SparkServiceError(f"local Spark job {name} failed: {error['type']}: {error['message']} (traceback in "
                            f"{address.log})")


def _accepted(settings: Settings, address: DaemonAddress, request: dict[str, Any]) -> socket.socket | None:
    """A connection whose request the service accepted, or None when the service stopped before accepting.

    Under the address's lock: so only one caller starts a service, and a service never stops between a
    caller's connecting and its job being accepted (the service takes the same lock to stop).
    """
    with locked(address.lock):
        conn = connect(address.socket)
        if conn is None:
            pid = starting_pid(address)
            pid = spawn(address, _serve_argv(settings)) if pid is None else pid
            conn = wait_listening(address, pid, START_TIMEOUT_S, SparkServiceError, "local Spark service")
        try:
            conn.sendall(json.dumps(request).encode() + b"\n")
            accepted = read_line(conn)
        except OSError:
            accepted = b""
        if not accepted:
            conn.close()
            return None
        return conn


def start_soon(settings: Settings) -> None:
    """Start the service unless it runs or is starting, without waiting for it: a local run calls this first, so
    the JVM starts while the steps before its first Spark job run."""
    local_daemon.start_soon(service_address(settings), _serve_argv(settings))


def _serve_argv(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "ctloop.spark_service", "serve", "--settings", json.dumps(settings.to_param())]


def stop_services(prefix: str | None = None) -> list[int]:
    """Ask every service of this user (of the environment at ``prefix``, when given) to stop once its jobs are
    done; returns their process ids."""
    return stop_daemons("spark", prefix)


# --- service ------------------------------------------------------------------------------------------------


class _Service:
    def __init__(self, settings: Settings, address: DaemonAddress) -> None:
        from ctloop.spark_session import local_spark

        self.address = address
        self.idle_s = settings.local.spark_service_idle_seconds
        self.spark = local_spark(settings, app_name="ctloop-spark-service", long_lived=True)
        self.state = threading.Lock()
        self.active = 0
        self.last_done = time.monotonic()
        self.stopping = threading.Event()
        self.groups = itertools.count(1)

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.address.socket))
        os.chmod(self.address.socket, 0o600)
        listener.listen(64)
        listener.settimeout(0.5)  # so the accept loop sees a stop
        announce(self.address)
        log.info("listening on %s (stops after %.0f s idle)", self.address.socket, self.idle_s)
        threading.Thread(target=self._stop_when_idle, name="idle", daemon=True).start()
        with listener:
            while not self.stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        while self.active:
            time.sleep(0.1)
        self.spark.stop()
        log.info("stopped")

    def _stop_when_idle(self) -> None:
        while not self.stopping.wait(min(5.0, self.idle_s / 4)):
            with self.state:
                idle = self.active == 0 and time.monotonic() - self.last_done >= self.idle_s
            if idle:
                self.stop(require_idle=True)

    def stop(self, require_idle: bool) -> None:
        # The client's lock: no caller is between connecting and being accepted while the socket goes.
        with locked(self.address.lock), self.state:
            if require_idle and self.active:
                return
            self.address.socket.unlink(missing_ok=True)
            self.address.info.unlink(missing_ok=True)
            self.stopping.set()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = json.loads(read_line(conn) or b"null")
            except ValueError:
                return
            if not isinstance(request, dict):
                return
            if request.get("stop"):
                conn.sendall(json.dumps({"accepted": os.getpid()}).encode() + b"\n")
                threading.Thread(target=self.stop, args=(False,), daemon=True).start()
                return
            with self.state:
                if self.stopping.is_set():
                    return  # the caller starts another service
                self.active += 1
            try:
                conn.sendall(json.dumps({"accepted": os.getpid()}).encode() + b"\n")
                self._run(conn, request)
            finally:
                with self.state:
                    self.active -= 1
                    self.last_done = time.monotonic()

    def _run(self, conn: socket.socket, request: dict[str, Any]) -> None:
        name, group = str(request.get("name", "job")), f"ctloop-job-{next(self.groups)}"
        sc = self.spark.sparkContext
        sc.setJobGroup(group, name, interruptOnCancel=True)
        done = threading.Event()
        threading.Thread(target=self._cancel_on_hangup, args=(conn, group, done), daemon=True).start()
        started = time.monotonic()
        log.info("%s (%s): started", name, group)
        try:
            result = _main_of(Path(request["job_file"]))(list(request["argv"]), spark=self.spark.newSession())
            reply: dict[str, Any] = {"result": result}
            log.info("%s (%s): done in %.2f s", name, group, time.monotonic() - started)
        except (Exception, SystemExit) as e:  # an argparse error in the job exits
            log.exception("%s (%s): failed after %.2f s", name, group, time.monotonic() - started)
            reply = {"error": {"type": type(e).__name__, "builtin": type(e).__module__ == "builtins",
                               "message": str(e)}}
        finally:
            done.set()
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply, default=str).encode() + b"\n")

    def _cancel_on_hangup(self, conn: socket.socket, group: str, done: threading.Event) -> None:
        with contextlib.suppress(OSError):
            conn.recv(1)  # the client sends nothing more: this returns when it hangs up (or we close)
        if not done.is_set():
            log.warning("%s: the client went away; cancelling its Spark jobs", group)
            # Those running and those it would start: the job may be between two of them.
            self.spark.sparkContext._jsc.sc().cancelJobGroupAndFutureJobs(group, "the client went away")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctloop.spark_service", description=__doc__.splitlines()[0],
                                epilog="python -m ctloop.local_daemon stop: stop the services once their jobs are done")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a service (the first job starts one: there is no need to)")
    serve.add_argument("--settings", required=True, help="the settings as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings.from_param(json.loads(args.settings))
    _Service(settings, service_address(settings)).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
