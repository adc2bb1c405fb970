"""The local Spark service (ctloop/spark_service.py) as the suites see it: which process it is, and stopping it so
a measurement starts cold."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def service_pid(settings: Any) -> int | None:
    """The running service's process id for these settings, or None."""
    from ctloop.spark_service import service_address

    try:
        return int(json.loads(service_address(settings).info.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def stop_service(settings: Any, timeout: float = 60.0) -> None:
    """Stop this environment's services (once their jobs are done) and wait for the one of ``settings`` to exit."""
    from ctloop.spark_service import process_alive, stop_services

    pid = service_pid(settings)
    stop_services(sys.prefix)
    deadline = time.monotonic() + timeout
    while pid is not None and process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
