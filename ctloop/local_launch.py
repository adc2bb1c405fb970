"""Local launches: a pipeline run as a detached ``ctloop`` process, started once per job id, and stopped again.

The ledger (ctloop/launch_ledger.py) is claimed before anything starts, so duplicate deliveries and retried steps
start nothing new; the process gets its own session (process group), so it outlives the caller and can be
stopped as a whole (the runner, its step subprocesses, a JVM of their own). The local Spark service is not in
the group: it outlives runs, and cancels the job of a step that went away (ctloop/spark_service.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ctloop.launch_ledger import Ledger, LedgerBusy
from ctloop.launching import Pipeline

STOP_TIMEOUT = 15.0  # SIGTERM -> SIGKILL for a run's process group (a JVM runs its shutdown hooks)
# The executor's flag: under it ``kfp.dsl`` leaves out the pipeline-building half a launched run needs.
_EXECUTOR_ONLY_ENV = ("_KFP_RUNTIME",)


def cli_argv(python: str, config: str, pipeline: Pipeline, run_id: str, trigger_uri: str,
             snapshot_time: str, input_uri: str = "") -> list[str]:
    """The ``ctloop`` command that runs ``pipeline`` locally (``run`` for training, ``monitor`` for monitoring,
    ``score`` for scoring, whose ``input_uri`` names the batch to score, "" for the settings' scoring window)."""
    head = [python, "-m", "pipelines.cli", "--config", config]
    if pipeline == "training":
        return [*head, "run", "--run-id", run_id, "--trigger-uri", trigger_uri, "--no-serve",
                "--snapshot-time", snapshot_time]
    if pipeline == "scoring":
        return [*head, "score", "--run-id", run_id, "--trigger-uri", trigger_uri, "--snapshot-time", snapshot_time,
                "--input", input_uri]
    return [*head, "monitor", "--run-id", run_id, "--trigger-uri", trigger_uri, "--snapshot-time", snapshot_time]


def launch_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without the KFP executor's flags."""
    return {k: v for k, v in (os.environ if base is None else base).items() if k not in _EXECUTOR_ONLY_ENV}


def launch_once(
    ledger: Ledger,
    job_id: str,
    trigger_uri: str,
    command: Callable[[], list[str]],
    log_path: Path,
    *,
    cwd: str | None = None,
    wait: float = 0.0,
    record_exit: bool = False,
    on_error: Callable[[str, Exception], None] | None = None,
    on_exit: Callable[[int], None] | None = None,
) -> bool:
    """Start ``command()`` as a detached process once for ``job_id``: True when this call started it, False when
    it had been started already; LedgerBusy when another caller is starting it right now (retry later).

    ``command`` runs only after the claim (it may prepare files, e.g. mirror the batch); if it or the start
    raises, the claim is released so a retry may launch. ``record_exit`` waits for the process on a thread
    and records its exit code (for callers that outlive the run, such as the trigger's server), then calls
    ``on_exit(code)``; ``on_error(what, exc)`` hears of ledger writes that failed after the process started.
    """
    state = ledger.claim_waiting(job_id, trigger_uri, wait=wait)
    if state == "launched":
        return False
    if state == "busy":
        raise LedgerBusy(f"job {job_id} is being launched by another caller; retry later")
    try:
        argv = command()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            # A new session: the run outlives the caller and the caller's process group.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=cwd or None, env=launch_env(), start_new_session=True, close_fds=True)
    except BaseException as exc:
        try:
            ledger.mark_failed(job_id, f"{type(exc).__name__}: {exc}")
        except Exception as mark_exc:  # the claim then expires after claim_seconds; the retry still works
            if on_error:
                on_error("could not record the failed launch", mark_exc)
        raise
    if record_exit:
        threading.Thread(target=_record_exit, args=(ledger, job_id, proc, on_error, on_exit), daemon=True,
                         name=f"wait-{job_id}").start()
    _record_launch(ledger, job_id, proc.pid, argv, log_path, on_error)
    return True


def _record_launch(ledger: Ledger, job_id: str, pid: int, argv: list[str], log_path: Path,
                   on_error: Callable[[str, Exception], None] | None) -> None:
    """The process runs now: raising would get the launch retried and could start a second run, so a briefly
    locked ledger is retried here; if it stays locked the run goes on unrecorded, and its claim only expires
    after ``claim_seconds``."""
    for attempt in range(1, 4):
        try:
            ledger.mark_launched(job_id, pid, argv, str(log_path))
            return
        except sqlite3.OperationalError as exc:
            if on_error:
                on_error(f"could not record the launched run (attempt {attempt} of 3)", exc)


def _record_exit(ledger: Ledger, job_id: str, proc: subprocess.Popen[bytes],
                 on_error: Callable[[str, Exception], None] | None, on_exit: Callable[[int], None] | None) -> None:
    code = proc.wait()  # also reaps the child, so finished runs leave no zombies behind
    try:
        ledger.record_exit(job_id, code)
    except Exception as exc:
        if on_error:
            on_error(f"could not record the run's exit code {code}", exc)
    if on_exit:
        on_exit(code)


# ----------------------------------------------------------------------------------------------- stopping
def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``; zombies are dead and do not count."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: ask the kernel whether the group has any process at all
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        state, _ppid, pgrp = text[text.rfind(")") + 2:].split()[:3]  # the name in (...) may hold spaces
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_groups(pgids: list[int], timeout: float = STOP_TIMEOUT) -> list[int]:
    """SIGTERM each group, SIGKILL what is left after ``timeout`` s; returns the groups that needed SIGKILL."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = [g for g in pgids if group_members(g)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [g for g in alive if group_members(g)]
    for pgid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return alive


def stop_unfinished(ledger: Ledger, timeout: float = STOP_TIMEOUT, skip: set[str] | None = None) -> list[str]:
    """Stop every run the ledger lists as started and not finished (each is its own process group), except
    the job ids in ``skip``; returns the job ids that needed SIGKILL."""
    runs = {r.pid: r.job_id for r in ledger.unfinished() if r.pid and r.job_id not in (skip or set())}
    return [runs[pgid] for pgid in stop_groups(list(runs), timeout)]
