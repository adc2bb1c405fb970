"""The online store of per-entity history states: one interface, an embedded backend and a Vertex AI one.

A store holds, per entity id, the ``ctloop.history.HistoryState`` after its latest event (as JSON) and when it
was materialized. ``write`` replaces the whole contents (a rerun over the same splits writes the same rows, and
entities gone from the data leave the store); ``read`` answers the entities it knows.

- ``SQLiteStore``: one SQLite file (under ``local.workdir``), written in one transaction; readers in other
  processes see the old contents or the new, never a mix (WAL).
- ``VertexFeatureStore`` (ctloop/online_store_vertex.py): a BigQuery table the pipeline writes, a Vertex AI
  Feature Store feature view over it (synced after each write) and online serving from the view.

``ctloop.online_stores`` opens the one the settings name.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ctloop.errors import CtloopError
from ctloop.history import HistoryState

if TYPE_CHECKING:
    from ctloop.config import Settings

STORE_FILE = "online_store.sqlite"
# The serving container's variable naming the feature view it reads (cloud); unset, it serves without a store.
FEATURE_VIEW_ENV = "CTLOOP_FEATURE_VIEW"
# The record's fields, the same in every backend (the BigQuery table's columns, the feature view's features).
ENTITY = "entity_id"
STATE = "state"
AS_OF = "as_of"


class OnlineStoreUnavailable(CtloopError):
    """The store cannot be read (not materialized yet, or its service failed): nothing to derive features from."""


@dataclass(frozen=True)
class StoredHistory:
    """An entity's state as the store holds it; ``as_of`` (ISO 8601, UTC): the data it was folded from ends there."""

    state: HistoryState
    as_of: str


class OnlineStore(Protocol):
    """Where serving looks up history states; ``blocking`` stores (network calls) are read off the event loop."""

    blocking: bool
    description: str

    def write(self, states: Mapping[str, HistoryState], as_of: str) -> int:
        """Replace the contents with ``states``; returns the number of entities written."""
        ...

    def read(self, entity_ids: Iterable[str]) -> dict[str, StoredHistory]:
        """The stored states of those of ``entity_ids`` the store knows."""
        ...


class SQLiteStore:
    """The embedded store: a SQLite file, one row per entity."""

    blocking = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{self.path}"
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"CREATE TABLE IF NOT EXISTS history ({ENTITY} TEXT PRIMARY KEY, {STATE} TEXT NOT NULL, "
                     f"{AS_OF} TEXT NOT NULL)")
        return conn

    def _conn(self, create: bool = False) -> sqlite3.Connection:
        # One connection per thread: sqlite3 connections must not cross threads.
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if not create and not self.path.is_file():
                # Serving every entity as unknown from an empty store would be silent skew: refuse instead.
                raise OnlineStoreUnavailable(f"online store {self.path} does not exist: no history states have "
                                             f"been materialized (the training pipeline's materialize_features "
                                             f"step writes them)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._local.conn = self._connect()
        return conn

    def write(self, states: Mapping[str, HistoryState], as_of: str) -> int:
        conn = self._conn(create=True)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM history")
            conn.executemany(f"INSERT INTO history ({ENTITY}, {STATE}, {AS_OF}) VALUES (?, ?, ?)",
                             ((e, s.to_json(), as_of) for e, s in states.items()))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return len(states)

    def read(self, entity_ids: Iterable[str]) -> dict[str, StoredHistory]:
        ids = list(dict.fromkeys(entity_ids))
        if not ids:
            return {}
        conn = self._conn()
        if len(ids) == 1:  # the common case, one prepared statement
            rows = conn.execute(f"SELECT {ENTITY}, {STATE}, {AS_OF} FROM history WHERE {ENTITY} = ?",
                                ids).fetchall()
        else:
            rows = []
            for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                chunk = ids[start:start + 500]
                rows += conn.execute(f"SELECT {ENTITY}, {STATE}, {AS_OF} FROM history WHERE {ENTITY} "
                                     f"IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        return {e: StoredHistory(HistoryState.from_json(s), m) for e, s, m in rows}

    def count(self) -> int:
        return self._conn().execute("SELECT count(*) FROM history").fetchone()[0]


def local_store_path(settings: Settings) -> Path:
    return Path(settings.local.workdir) / STORE_FILE

