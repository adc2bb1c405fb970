"""Local launch: ledger claim, optional mirror of the batch into the landing area, detached pipeline run.

A schedule tick has no batch: nothing is mirrored for it."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from ctloop_trigger.jobs import LaunchRequest
from ctloop_trigger.ledger import Ledger, LedgerBusy
from ctloop_trigger.logs import log
from ctloop_trigger.mirror import mirror_batch
from ctloop_trigger.settings import TriggerSettings

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def launch_argv(settings: TriggerSettings, request: LaunchRequest) -> list[str]:
    """The configured command (training, or monitoring for a monitoring request) with its placeholders filled;
    each value stays one argv element (no shell)."""
    values = {"python": sys.executable, "config": settings.resolve_bundle_path(settings.config),
              "run_id": request.job_id, "trigger_uri": request.trigger_uri}
    command = settings.monitor_command if request.pipeline == "monitoring" else settings.launch_command
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in command]


class LocalLauncher:
    """Exactly one detached pipeline process per job id, recorded in ``<state_dir>/ledger.sqlite``."""

    def __init__(self, settings: TriggerSettings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir).resolve()
        self.logs_dir = self.state_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.state_dir / "ledger.sqlite", timeout=settings.ledger_timeout,
                             claim_seconds=settings.claim_seconds)

    def launch(self, request: LaunchRequest) -> bool:
        """True when this call started the run, False when it had been started already. Raises to retry."""
        wait = self.settings.ledger_timeout
        state = self.ledger.claim_waiting(request.job_id, request.trigger_uri, wait=wait)
        if state == "launched":
            return False
        if state == "busy":
            raise LedgerBusy(f"job {request.job_id} is being launched by another delivery; retry later")
        try:
            if self.settings.mirror_dir and request.bucket:
                mirror_batch(request, self.settings)
            pid, argv, log_path = self._spawn(request)
        except BaseException as exc:
            try:
                self.ledger.mark_failed(request.job_id, f"{type(exc).__name__}: {exc}")
            except Exception as mark_exc:  # the claim then expires after claim_seconds; the retry still works
                log("ERROR", "could not record the failed launch", job_id=request.job_id,
                    error=repr(mark_exc))
            raise
        self._record_launch(request.job_id, pid, argv, log_path)
        return True

    def _record_launch(self, job_id: str, pid: int, argv: list[str], log_path: Path) -> None:
        """The process runs now: raising would get the delivery retried and could start a second run, so a
        briefly locked ledger is retried here; if it stays locked the run goes on unrecorded (logged), and its
        claim only expires after ``claim_seconds``."""
        for attempt in range(1, 4):
            try:
                self.ledger.mark_launched(job_id, pid, argv, str(log_path))
                return
            except sqlite3.OperationalError as exc:
                log("WARNING" if attempt < 3 else "ERROR", "could not record the launched run",
                    job_id=job_id, pid=pid, attempt=attempt, error=repr(exc))

    def _spawn(self, request: LaunchRequest) -> tuple[int, list[str], Path]:
        argv = launch_argv(self.settings, request)
        log_path = self.logs_dir / f"{request.job_id}.log"  # job ids are [a-z0-9-]: safe as a file name
        cwd = self.settings.launch_cwd or None
        with open(log_path, "ab") as out:
            # A new session: the run outlives this request and the function server's process group.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=cwd, env=dict(os.environ), start_new_session=True, close_fds=True)
        threading.Thread(target=self._record_exit, args=(request.job_id, proc), daemon=True,
                         name=f"wait-{request.job_id}").start()
        return proc.pid, argv, log_path

    def _record_exit(self, job_id: str, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()  # also reaps the child, so finished runs leave no zombies behind
        try:
            self.ledger.record_exit(job_id, code)
        except Exception as exc:
            log("WARNING", "could not record the run's exit code", job_id=job_id, exit_code=code,
                error=repr(exc))
        log("INFO" if code == 0 else "ERROR", "pipeline process exited", job_id=job_id, exit_code=code)
