from __future__ import annotations

from collections.abc import Iterator

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
