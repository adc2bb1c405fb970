from __future__ import annotations

import sys
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


# Spark tests run again after the shared JVM died under them: (test id, how the JVM died).
_SPARK_RERUNS: list[tuple[str, str]] = []


def _spark_started() -> bool:
    return "tests.spark_fixtures" in sys.modules


@pytest.fixture(scope="session", autouse=True)
def _stop_spark_at_the_end() -> Iterator[None]:
    yield
    from ctloop.local_daemon import stop_daemons

    stop_daemons("*", sys.prefix)  # the local Spark service and step server the pipelines started (they would idle on)
    if _spark_started():
        from tests.spark_fixtures import stop_session

        stop_session()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A Spark test whose JVM died under it runs once more in a new JVM; the death is reported either way.

    Only a dead JVM earns the second run (the test's checks are unchanged): it is the process the tests
    share, not the job under test, that needs replacing."""
    try:
        return (yield)
    except Exception:
        if "spark" not in getattr(item, "funcargs", {}):
            raise
        from tests.spark_fixtures import jvm_death, live_session

        death = jvm_death()
        if death is None:
            raise
        _SPARK_RERUNS.append((item.nodeid, death))
        item.add_report_section("call", "Spark JVM", f"{death}\nthe test ran again in a new JVM")
        item.funcargs["spark"] = live_session()
        item.runtest()
        return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None],
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A Spark test that fails because the shared JVM died says how it died on its summary line."""
    report = yield
    if report.failed and "spark" in getattr(item, "fixturenames", ()) and _spark_started():
        from tests.spark_fixtures import jvm_death

        death = jvm_death()
        crash = getattr(report.longrepr, "reprcrash", None)
        if death and crash is not None:
            crash.message = f"{death}; {crash.message}"
        if death:
            report.sections.append(("Spark JVM", death))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SPARK_RERUNS:
        terminalreporter.write_sep("=", "Spark tests run again after the shared JVM died", yellow=True)
        for nodeid, death in _SPARK_RERUNS:
            terminalreporter.write_line(f"RERUN {nodeid}: {death}")
