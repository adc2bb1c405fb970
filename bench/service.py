"""The local daemons (ctloop/local_daemon.py: the Spark service, the step server) as the suites see them: which
process each is, and stopping them so a measurement starts cold."""

from __future__ import annotations

import sys
import time
from typing import Any


def service_pid(settings: Any) -> int | None:
    """The running Spark service's process id for these settings, or None."""
    from ctloop.local_daemon import daemon_pid
    from ctloop.spark_service import service_address

    return daemon_pid(service_address(settings))


def step_server_pid() -> int | None:
    """The running step server of this environment (the newest, should there be several), or None.

    Found by its description rather than its identity: the run that started it computed that identity in its
    own environment (with the local thread settings), not the bench's."""
    from ctloop.local_daemon import described, process_alive

    found = [(address.info.stat().st_mtime, pid) for address, pid in described("steps", sys.prefix)
             if process_alive(pid)]
    return max(found)[1] if found else None


def stop_daemons(kind: str = "spark", timeout: float = 60.0) -> None:
    """Stop this environment's daemons of ``kind`` ("*": all) once their work is done, and wait for them to exit."""
    from ctloop.local_daemon import process_alive
    from ctloop.local_daemon import stop_daemons as ask_to_stop

    pids = ask_to_stop(kind, sys.prefix)
    deadline = time.monotonic() + timeout
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
