"""Log a sample of prediction requests and responses, off the hot path.

The request handler only draws a random number and, for a sampled request, appends references to its already
validated columns to an in-memory buffer (no copy, no I/O). A background thread writes the buffer as one file
when it holds ``flush_rows`` rows, every ``flush_seconds``, and on shutdown. Memory is bounded: past
``max_pending_rows`` sampled rows are dropped and counted instead of queued. A failed write is counted and
reported on stderr; logging never fails a prediction.

Sinks (layout: ``ctloop.prediction_log``): a local directory (Parquet files) or ``gs://bucket/prefix`` (JSON
Lines objects, each created with ``ifGenerationMatch=0`` so a retried upload never overwrites another file).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from ctloop.prediction_log import (
    DEPLOYED_MODEL_ID,
    ERROR,
    LABEL,
    LATENCY_MS,
    LOGGED_AT,
    MODEL,
    MODEL_VERSION,
    PROBABILITY,
    REQUEST_ID,
    day_dir,
)

if TYPE_CHECKING:
    from ctloop.config import Settings

Columns = dict[str, list[Any]]


@dataclass(frozen=True)
class PredictionLogConfig:
    """``uri``: the endpoint's log root (a directory or gs://bucket/prefix); ``sample_rate``: share of requests."""

    uri: str
    sample_rate: float
    flush_rows: int = 2000
    flush_seconds: float = 30.0
    max_pending_rows: int = 100_000
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"prediction log: sample_rate must be within [0, 1], found {self.sample_rate}")
        if not self.uri:
            raise ValueError("prediction log: uri is empty; expected a directory or gs://bucket/prefix")
        if self.flush_rows < 1 or self.max_pending_rows < 1 or self.flush_seconds <= 0:
            raise ValueError(f"prediction log: flush_rows, max_pending_rows and flush_seconds must be positive, "
                             f"found {self.flush_rows}, {self.max_pending_rows}, {self.flush_seconds}")


class Sink(Protocol):
    def write(self, table: pa.Table, day: date, name: str) -> str:
        """Write ``table`` as one new file of the day's folder; return where it went."""


class LocalParquetSink:
    def __init__(self, root: str | Path) -> None:
        self.root = str(root)

    def write(self, table: pa.Table, day: date, name: str) -> str:
        folder = Path(day_dir(self.root, day))
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{name}.parquet"
        tmp = folder / f".{name}.parquet.tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return str(target)


class GcsJsonlSink:
    """One JSON Lines object per flush, ``gs://bucket/prefix/date=YYYY-MM-DD/<name>.jsonl``."""

    def __init__(self, uri: str, client: Any = None) -> None:
        bucket, _, prefix = uri[len("gs://"):].partition("/")
        if not uri.startswith("gs://") or not bucket:
            raise ValueError(f"prediction log: expected gs://BUCKET/PREFIX, found {uri!r}")
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self._client = client

    def _bucket(self) -> Any:
        if self._client is None:
            from google.cloud import storage

            from serving.model import _storage_client  # the same credentials rules as the model download

            self._client = _storage_client(storage)
        return self._client.bucket(self.bucket_name)

    def write(self, table: pa.Table, day: date, name: str) -> str:
        folder = day_dir(self.prefix, day) if self.prefix else f"date={day.isoformat()}"
        object_name = f"{folder}/{name}.jsonl"
        lines = "".join(json.dumps(row, default=_json_default, allow_nan=False) + "\n"
                        for row in _json_rows(table))
        blob = self._bucket().blob(object_name)
        blob.upload_from_string(lines.encode(), content_type="application/x-ndjson", if_generation_match=0)
        return f"gs://{self.bucket_name}/{object_name}"


def _json_rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None
    return rows


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def make_sink(uri: str) -> Sink:
    return GcsJsonlSink(uri) if uri.startswith("gs://") else LocalParquetSink(uri)


@dataclass
class _Pending:
    logged_at: datetime
    columns: Columns
    probabilities: list[float]
    threshold: float
    deployed_model_id: str
    model: str
    version: str
    request_id: str = ""
    latency_ms: float = math.nan
    error: bool = False


class PredictionLogger:
    """Samples requests, buffers them and writes them from one background thread."""

    def __init__(self, config: PredictionLogConfig, numeric: Sequence[str], categorical: Sequence[str],
                 sink: Sink | None = None) -> None:
        self.config = config
        self.numeric = tuple(numeric)
        self.categorical = tuple(categorical)
        self.sink = sink or make_sink(config.uri)
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._pending: list[_Pending] = []
        self._pending_rows = 0
        self._thread: threading.Thread | None = None
        self._token = str(os.getpid())
        self.sampled_requests = 0
        self.logged_rows = 0
        self.dropped_rows = 0
        self.write_errors = 0

    # -- the hot path ----------------------------------------------------------------------------------------
    def offer(self, columns: Columns, probabilities: list[float], threshold: float, deployed_model_id: str,
              model: str = "", version: str = "", **request: Any) -> bool:
        """Log this request with probability ``sample_rate``; True when it was sampled (and not dropped).
        ``request``: ``request_id``, ``latency_ms``, ``error`` (then ``probabilities`` are NaN)."""
        if not self.draw():
            return False
        return self.record(columns, probabilities, threshold, deployed_model_id, model, version, **request)

    def draw(self) -> bool:
        """Whether to log this request (probability ``sample_rate``)."""
        rate = self.config.sample_rate
        return rate > 0.0 and (rate >= 1.0 or self._rng.random() < rate)

    def record(self, columns: Columns, probabilities: list[float], threshold: float, deployed_model_id: str,
               model: str = "", version: str = "", request_id: str = "", latency_ms: float = math.nan,
               error: bool = False) -> bool:
        """Log this request (already drawn: a shadow copy follows the draw of the live request it copies)."""
        rows = len(probabilities)
        with self._lock:
            if self._stop:
                return False
            self.sampled_requests += 1
            if self._pending_rows + rows > self.config.max_pending_rows:
                self.dropped_rows += rows
                return False
            self._pending.append(_Pending(datetime.now(UTC), columns, probabilities, threshold,
                                          deployed_model_id, model, version, request_id, latency_ms, error))
            self._pending_rows += rows
            full = self._pending_rows >= self.config.flush_rows
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
                self._thread.start()
        if full:
            self._wake.set()
        return True

    # -- the writer thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=self.config.flush_seconds)
            self._wake.clear()
            self.flush()
            with self._lock:
                if self._stop and not self._pending:
                    return

    def flush(self) -> int:
        """Write whatever is buffered now (one file per day it spans); returns the rows written."""
        with self._lock:
            batch, self._pending, self._pending_rows = self._pending, [], 0
        if not batch:
            return 0
        written = 0
        for day, items in _by_day(batch).items():
            name = f"part-{items[0].logged_at:%Y%m%dT%H%M%S}-{self._token}-{uuid.uuid4().hex[:8]}"
            try:
                table = self._table(items)
                self.sink.write(table, day, name)
            except Exception as exc:  # noqa: BLE001 - logging must never take the server down
                self.write_errors += 1
                print(f"prediction log: could not write {sum(len(i.probabilities) for i in items)} rows to "
                      f"{self.config.uri}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            written += table.num_rows
        with self._lock:
            self.logged_rows += written
        return written

    def _table(self, items: list[_Pending]) -> pa.Table:
        data: dict[str, pa.Array] = {}
        sizes = [len(i.probabilities) for i in items]

        def repeat(values: list[Any]) -> list[Any]:
            return [v for v, n in zip(values, sizes, strict=True) for _ in range(n)]

        data[LOGGED_AT] = pa.array(repeat([i.logged_at for i in items]), type=pa.timestamp("us", tz="UTC"))
        data[DEPLOYED_MODEL_ID] = pa.array(repeat([i.deployed_model_id for i in items]), type=pa.string())
        data[MODEL] = pa.array(repeat([i.model for i in items]), type=pa.string())
        data[MODEL_VERSION] = pa.array(repeat([i.version for i in items]), type=pa.string())
        probs = [p for i in items for p in i.probabilities]
        data[PROBABILITY] = pa.array(probs, type=pa.float64())
        thresholds = repeat([i.threshold for i in items])
        data[LABEL] = pa.array([None if math.isnan(p) else int(p >= t) for p, t in zip(probs, thresholds, strict=True)],
                               type=pa.int64())
        data[REQUEST_ID] = pa.array(repeat([i.request_id for i in items]), type=pa.string())
        data[LATENCY_MS] = pa.array(repeat([i.latency_ms for i in items]), type=pa.float64())
        data[ERROR] = pa.array(repeat([int(i.error) for i in items]), type=pa.int64())
        for name in self.numeric:
            data[name] = pa.array([v for i in items for v in i.columns[name]], type=pa.float64())
        for name in self.categorical:
            data[name] = pa.array([v for i in items for v in i.columns[name]], type=pa.string())
        return pa.table(data)

    def close(self, timeout: float = 30.0) -> None:
        """Stop sampling, write what is buffered and wait for the writer thread."""
        with self._lock:
            self._stop = True
            thread = self._thread
        if thread is None:
            self.flush()
        else:
            self._wake.set()
            thread.join(timeout=timeout)
        with self._lock:
            # Ready for a server restarted in the same process: the next sampled request starts a new writer.
            self._stop = False
            self._thread = None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pending = self._pending_rows
        return {"uri": self.config.uri, "sampleRate": self.config.sample_rate,
                "sampledRequests": self.sampled_requests, "loggedRows": self.logged_rows,
                "pendingRows": pending, "droppedRows": self.dropped_rows, "writeErrors": self.write_errors}


def config_from_settings(settings: Settings, endpoint: str) -> PredictionLogConfig | None:
    """The prediction log of ``endpoint`` as ``settings.monitoring`` configures it; None when logging is off."""
    from ctloop.prediction_log import log_root

    m = settings.monitoring
    if m.sample_rate <= 0:
        return None
    return PredictionLogConfig(uri=log_root(settings, endpoint), sample_rate=m.sample_rate,
                               flush_rows=m.log_flush_rows, flush_seconds=m.log_flush_seconds,
                               max_pending_rows=m.log_max_pending_rows)


def _by_day(items: list[_Pending]) -> dict[date, list[_Pending]]:
    out: dict[date, list[_Pending]] = {}
    for item in items:
        out.setdefault(item.logged_at.date(), []).append(item)
    return out
