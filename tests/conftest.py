from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.recording_server import RecordingServer


@pytest.fixture
def recording_server() -> Iterator[RecordingServer]:
    server = RecordingServer().start()
    try:
        yield server
    finally:
        server.stop()
