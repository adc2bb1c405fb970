"""One local Spark session per test process (a JVM start costs seconds): import ``spark`` into a test module.

    from tests.spark_fixtures import spark  # noqa: F401  (pytest fixture)

A JVM that dies mid-run fails every later Spark test with a bare "Connection refused"; ``jvm_death`` says how it
died instead (tests/conftest.py puts that on the failing test's summary line).
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Iterator

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


def jvm_death() -> str | None:
    """How this process's Spark JVM ended, or None while it runs (or when none was started)."""
    from pyspark import SparkContext

    proc = getattr(SparkContext._gateway, "proc", None)
    code = None if proc is None else proc.poll()
    if code is None:
        return None
    return f"the local Spark JVM exited with status {code}: {_EXITS.get(code, 'see its output above')}"


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    with warnings.catch_warnings():
        # pyspark warns at import that it is not yet tested with pandas 3; the jobs here do not use pandas.
        warnings.simplefilter("ignore", FutureWarning)
        from ctloop.spark_session import local_spark

        session = local_spark(Settings(), app_name="ctloop-tests")
    try:
        yield session
    finally:
        if jvm_death() is None:  # a dead JVM was reported on the test it failed; stopping it would only raise
            session.stop()
