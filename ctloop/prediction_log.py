"""The prediction log's layout, shared by the server that writes it and the drift check that reads it.

One row per logged instance: the model features exactly as the model scored them, plus these columns::

    __logged_at (UTC timestamp)  __deployed_model_id  __model  __model_version  __probability  __label
    __request_id  __latency_ms (the request, as the server measured it)  __error (1: the model failed)

A failed request's rows have a null probability and label. A shadow deployment's rows carry the request id of
the live request they copy. Logs written before the last three columns existed read them as missing.

Files live under ``<root>/date=YYYY-MM-DD/`` (``root`` = ``<log_uri>/<endpoint>``), one per flush, never
appended to or rewritten: ``part-<time>-<pid>-<random>.parquet`` (local sink) or ``.jsonl`` (Cloud Storage
sink, one JSON object per line). A writer puts a file in place by renaming a temporary name that does not end
in the suffix, so a reader never sees half a file.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from ctloop.config import Settings
from ctloop.errors import DataValidationError

if TYPE_CHECKING:
    import pandas as pd

# pandas is imported by the readers: a step that only needs the layout (register) does not pay its import, 0.3 s
# of a fresh process.

LOGGED_AT = "__logged_at"
DEPLOYED_MODEL_ID = "__deployed_model_id"
MODEL = "__model"
MODEL_VERSION = "__model_version"
PROBABILITY = "__probability"
LABEL = "__label"
REQUEST_ID = "__request_id"
LATENCY_MS = "__latency_ms"
ERROR = "__error"
META_COLUMNS = (LOGGED_AT, DEPLOYED_MODEL_ID, MODEL, MODEL_VERSION, PROBABILITY, LABEL, REQUEST_ID, LATENCY_MS,
                ERROR)
SUFFIXES = (".parquet", ".jsonl")
_DAY_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_GCS_FUSE_ROOT = "/gcs/"


def log_root(settings: Settings, endpoint: str) -> str:
    """Where ``endpoint``'s log lives: ``<monitoring.log_uri>/<endpoint>`` with the backend's default uri."""
    base = settings.monitoring.log_uri
    if not base:
        if settings.backend == "cloud":
            base = f"gs://{settings.gcp.staging_bucket}/prediction_log"
        else:
            base = str(settings.local.path("prediction_log"))
    return f"{base.rstrip('/')}/{endpoint}"


def day_dir(root: str, day: date) -> str:
    return f"{root.rstrip('/')}/date={day.isoformat()}"


def local_path(uri: str) -> Path:
    """A readable path for ``uri``: ``gs://b/p`` is ``/gcs/b/p`` (the Cloud Storage FUSE mount on Vertex)."""
    return Path(_GCS_FUSE_ROOT + uri[len("gs://"):]) if uri.startswith("gs://") else Path(uri)


def read_prediction_log(root: str, start: datetime, end: datetime) -> pd.DataFrame:
    """Every logged row with ``start <= __logged_at < end``, from the day folders that window touches.

    Raises DataValidationError when ``root`` does not exist (nothing was ever logged there).
    """
    import pandas as pd

    base = local_path(root)
    if not base.is_dir():
        raise DataValidationError(f"prediction log {root}: no such directory ({base}); is logging on "
                                  f"(monitoring.sample_rate > 0) for this endpoint?")
    first, last = start.astimezone(UTC).date(), (end.astimezone(UTC) - timedelta(microseconds=1)).date()
    frames: list[pd.DataFrame] = []
    for folder in sorted(base.iterdir()):
        m = _DAY_DIR.match(folder.name)
        if not (m and folder.is_dir() and first <= date.fromisoformat(m.group(1)) <= last):
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.name.endswith(SUFFIXES):
                continue
            frames.append(_read_file(path))
    if not frames:
        return pd.DataFrame(columns=list(META_COLUMNS))
    frame = pd.concat([f for f in frames if not f.empty] or frames, ignore_index=True)
    stamps = pd.to_datetime(frame[LOGGED_AT], utc=True)
    keep = (stamps >= pd.Timestamp(start).tz_convert(UTC)) & (stamps < pd.Timestamp(end).tz_convert(UTC))
    frame = frame.loc[keep].reset_index(drop=True)
    frame[LOGGED_AT] = stamps[keep].reset_index(drop=True)
    return frame


def _read_file(path: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True, dtype=False)
    except Exception as exc:  # pyarrow / json raise several types for a damaged file
        raise DataValidationError(f"prediction log file {path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if LOGGED_AT not in frame.columns and not frame.empty:
        raise DataValidationError(f"prediction log file {path}: no {LOGGED_AT!r} column; found {list(frame.columns)}")
    return frame
