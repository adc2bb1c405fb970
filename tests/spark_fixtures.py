"""One local Spark session per test process (a JVM start costs seconds): import ``spark`` into a test module.

    from tests.spark_fixtures import spark  # noqa: F401  (pytest fixture)

Module-scoped fixtures call ``live_session()`` instead. A JVM that dies mid-run would fail every later Spark
test with a bare "Connection refused": ``jvm_death`` says how it died (with the JVM's last log lines, which go
to a file of their own), and ``live_session`` starts a new JVM for the tests after it. tests/conftest.py puts
the death on the failing test's report and runs that test once more in the new JVM, reported as a rerun.
"""

from __future__ import annotations

import os
import signal
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest

from ctloop.config import Settings

# How a local Spark driver JVM ends, by exit status (pyspark starts it with its stdin on a pipe from Python).
_EXITS = {
    0: "its stdin pipe from Python was closed (the gateway exits on EOF)",
    50: "an uncaught exception in a task thread",
    52: "java.lang.OutOfMemoryError in a task thread",
    -signal.SIGKILL: "SIGKILL (the kernel's OOM killer, or a kill)",
    -signal.SIGABRT: "a JVM crash (SIGABRT; hs_err_pid*.log in the working directory)",
    -signal.SIGBUS: "SIGBUS (a memory-mapped file on a full disk)",
    -signal.SIGSEGV: "a JVM crash (SIGSEGV; hs_err_pid*.log in the working directory)",
    -signal.SIGTERM: "SIGTERM",
}
# The JVM's stdout and stderr (Spark's log at WARN and above): a file, so a death's cause can be read back
# instead of landing in whichever test's captured output happened to be open when the JVM started.
JVM_LOG = Path(tempfile.gettempdir()) / f"ctloop-tests-spark-{os.getpid()}.log"
_session: Any = None


def jvm_death() -> str | None:
    """How this process's Spark JVM ended and its last log lines, or None while it runs (or none started)."""
    from pyspark import SparkContext

    proc = getattr(SparkContext._gateway, "proc", None)
    code = None if proc is None else proc.poll()
    if code is None:
        return None
    try:
        tail = JVM_LOG.read_text(errors="replace").strip().splitlines()[-15:]
    except OSError:
        tail = []
    last = "".join(f"\n  {line}" for line in tail)
    return f"the local Spark JVM exited with status {code}: {_EXITS.get(code, 'see its log')}" + (
        f"; its last log lines ({JVM_LOG}):{last}" if last else "")


def _forget_dead_jvm() -> None:
    """Drop pyspark's handles on a dead JVM so the next session starts a new one."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    SparkContext._active_spark_context = None
    SparkContext._gateway = None
    SparkContext._jvm = None
    SparkSession._instantiatedSession = None
    SparkSession._activeSession = None


def live_session() -> Any:
    """This process's local Spark session, started on first use and again if its JVM has died."""
    global _session
    with warnings.catch_warnings():
        # pyspark warns at import that it is not yet tested with pandas 3; the jobs here do not use pandas.
        warnings.simplefilter("ignore", FutureWarning)
        from ctloop.spark_session import local_spark

    if _session is not None:
        if jvm_death() is None:
            return _session
        _forget_dead_jvm()
    # The JVM inherits fds 1 and 2 at its start: point them at the log file for that moment only.
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(JVM_LOG, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            _session = local_spark(Settings(), app_name="ctloop-tests")
            return _session
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def stop_session() -> None:
    """Stop the session at the end of the run, unless its JVM is already dead (stopping it would only raise)."""
    if _session is not None and jvm_death() is None:
        _session.stop()
        JVM_LOG.unlink(missing_ok=True)


@pytest.fixture
def spark() -> Any:
    return live_session()
