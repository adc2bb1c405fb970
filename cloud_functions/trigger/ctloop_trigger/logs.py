"""Structured log lines on stdout, the shape Cloud Logging parses (``severity``, ``message`` + fields)."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

_LOCK = threading.Lock()
_MAX_FIELD = 300  # object names are untrusted and may be long: keep log lines bounded


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_FIELD:
        return f"{value[:_MAX_FIELD]}...(+{len(value) - _MAX_FIELD} chars)"
    return value


def log(severity: str, message: str, **fields: Any) -> None:
    """Write one JSON line; ``None`` fields are left out. json.dumps escapes control characters."""
    entry = {"severity": severity, "message": message, "component": "ctloop-trigger"}
    entry.update({k: _bounded(v) for k, v in fields.items() if v is not None})
    line = json.dumps(entry, default=str, ensure_ascii=True)
    with _LOCK:  # gunicorn serves concurrent events on threads: one line per write
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
