from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from ctloop.config import Settings
from ctloop.threads import use_local_threads
from tests.recording_server import RecordingServer

# Tests run OpenMP/BLAS work like local steps do (ctloop/threads.py): set before any test imports NumPy.
use_local_threads(Settings())


@pytest.fixture
def recording_server() -> Iterator[RecordingServer]:
    server = RecordingServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None],
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A Spark test that fails because the shared JVM died says how it died on its summary line."""
    report = yield
    if report.failed and "spark" in getattr(item, "fixturenames", ()):
        from tests.spark_fixtures import jvm_death

        death = jvm_death()
        crash = getattr(report.longrepr, "reprcrash", None)
        if death and crash is not None:
            crash.message = f"{death}; {crash.message}"
        if death:
            report.sections.append(("Spark JVM", death))
    return report
