"""The local launch ledger: a SQLite file with one row per job id, the one "launch once" record of local runs.

The trigger function (local backend) claims a row before it acknowledges a delivery; the monitoring pipeline's
launch step claims one before it starts a training run (ctloop/local_launch.py).

States: ``claimed`` (a delivery is launching it now), ``launched`` (done: every later delivery
short-circuits), ``failed`` (the launch raised: the next delivery retries it). A claim older than
``claim_seconds`` is taken over, so a delivery that died mid-launch does not block the job forever.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

SCHEMA = """
CREATE TABLE IF NOT EXISTS launches (
    job_id       TEXT PRIMARY KEY,
    trigger_uri  TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('claimed', 'launched', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    claimed_at   REAL,
    pid          INTEGER,
    command      TEXT,
    log_path     TEXT,
    exit_code    INTEGER,
    error        TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
)
"""


class LedgerBusy(RuntimeError):
    """Another delivery holds a fresh claim on this job (or the ledger stayed locked): retry later."""


@dataclass(frozen=True)
class LaunchRecord:
    job_id: str
    trigger_uri: str
    status: str
    attempts: int
    pid: int | None
    command: list[str] | None
    log_path: str | None
    exit_code: int | None
    error: str | None


Claim = Literal["claimed", "launched", "busy"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Ledger:
    """Thread- and process-safe: every operation is its own short ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, path: str | Path, timeout: float = 5.0, claim_seconds: float = 120.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.claim_seconds = claim_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as db:
            db.execute(SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: BEGIN IMMEDIATE is issued here so the write lock is taken up front and a
        # locked ledger surfaces as sqlite3.OperationalError after `timeout`: the delivery fails, is retried.
        with closing(sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def claim(self, job_id: str, trigger_uri: str) -> Claim:
        """Take the right to launch ``job_id``: 'launched' = done already, 'busy' = another delivery has it,
        'claimed' = this caller launches and must then mark the row launched or failed."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT status, claimed_at FROM launches WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO launches (job_id, trigger_uri, status, attempts, claimed_at, created_at, "
                    "updated_at) VALUES (?, ?, 'claimed', 1, ?, ?, ?)",
                    (job_id, trigger_uri, now, _now(), _now()))
                return "claimed"
            status, claimed_at = row
            if status == "launched":
                return "launched"
            if status == "claimed" and claimed_at is not None and now - claimed_at < self.claim_seconds:
                return "busy"
            db.execute("UPDATE launches SET status = 'claimed', attempts = attempts + 1, claimed_at = ?, "
                       "error = NULL, updated_at = ? WHERE job_id = ?", (now, _now(), job_id))
            return "claimed"

    def claim_waiting(self, job_id: str, trigger_uri: str, wait: float) -> Claim:
        """``claim``, waiting up to ``wait`` seconds for a concurrent delivery's launch to finish."""
        deadline = time.monotonic() + wait
        while True:
            state = self.claim(job_id, trigger_uri)
            if state != "busy" or time.monotonic() >= deadline:
                return state
            time.sleep(0.05)

    def mark_launched(self, job_id: str, pid: int, command: list[str], log_path: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE launches SET status = 'launched', pid = ?, command = ?, log_path = ?, "
                       "error = NULL, updated_at = ? WHERE job_id = ?",
                       (pid, json.dumps(command), log_path, _now(), job_id))

    def mark_failed(self, job_id: str, error: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE launches SET status = 'failed', error = ?, claimed_at = NULL, updated_at = ? "
                       "WHERE job_id = ?", (error[:2000], _now(), job_id))

    def record_exit(self, job_id: str, exit_code: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE launches SET exit_code = ?, updated_at = ? WHERE job_id = ?",
                       (exit_code, _now(), job_id))

    def get(self, job_id: str) -> LaunchRecord | None:
        found = self.records(job_id)
        return found[0] if found else None

    def find(self, trigger_uri: str) -> LaunchRecord | None:
        """The row of the run ``trigger_uri`` caused, if any."""
        found = [r for r in self.records() if r.trigger_uri == trigger_uri]
        return found[0] if found else None

    def unfinished(self) -> list[LaunchRecord]:
        """Rows with a process and no recorded exit code (still running, or their exit went unrecorded)."""
        return [r for r in self.records() if r.pid is not None and r.exit_code is None]

    def records(self, job_id: str | None = None) -> list[LaunchRecord]:
        """All rows (or the one for ``job_id``), oldest first."""
        query = ("SELECT job_id, trigger_uri, status, attempts, pid, command, log_path, exit_code, error "
                 "FROM launches WHERE ? IS NULL OR job_id = ? ORDER BY created_at, job_id")
        with closing(sqlite3.connect(self.path, timeout=self.timeout)) as db:
            rows = db.execute(query, (job_id, job_id)).fetchall()
        return [LaunchRecord(job_id=r[0], trigger_uri=r[1], status=r[2], attempts=r[3], pid=r[4],
                             command=json.loads(r[5]) if r[5] else None, log_path=r[6], exit_code=r[7],
                             error=r[8]) for r in rows]
