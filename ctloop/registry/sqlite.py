"""The local model registry and endpoints: SQLite with the semantics of Vertex AI Model Registry.

- A model has versions 1..n; each version records its artifact URI, labels, metrics and lineage, and the run
  key that produced it (unique per model, so registering the same run twice returns the existing version).
- Aliases (``champion``, ``default``, ``run-<id>``...) point at one version each and move atomically. Like
  Vertex, the first version of a model gets ``default``.
- Endpoints hold deployed model versions with a traffic split that always sums to 100 (or is empty). Deploying
  and undeploying redistribute traffic with the same arithmetic as the aiplatform SDK.

Every mutation runs in one ``BEGIN IMMEDIATE`` transaction on a WAL database, so concurrent processes (two
pipeline steps, a server reading the endpoint) see either the old or the new state, never half of it.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctloop.registry.base import NEW_DEPLOYMENT, AliasMoved, RegistryError, StaleSplit
from ctloop.registry.traffic import allocate_traffic, check_percent, unallocate_traffic

DEFAULT_ALIAS = "default"
# Vertex's alias format; also keeps aliases from being confused with numeric version ids.
_ALIAS = re.compile(r"^[a-z][a-z0-9-]{0,126}[a-z0-9]$")
_BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL REFERENCES models(name),
    version_id INTEGER NOT NULL CHECK (version_id >= 1),
    artifact_uri TEXT NOT NULL,
    run_key TEXT NOT NULL,
    labels TEXT NOT NULL,
    metrics TEXT NOT NULL,
    lineage TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (model, version_id),
    UNIQUE (model, run_key)
);
CREATE TABLE IF NOT EXISTS aliases (
    model TEXT NOT NULL,
    alias TEXT NOT NULL,
    version_id INTEGER NOT NULL,
    PRIMARY KEY (model, alias),
    FOREIGN KEY (model, version_id) REFERENCES versions(model, version_id)
);
CREATE TABLE IF NOT EXISTS endpoints (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    endpoint TEXT NOT NULL REFERENCES endpoints(name),
    deployed_model_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version_id INTEGER NOT NULL,
    traffic_percent INTEGER NOT NULL CHECK (traffic_percent BETWEEN 0 AND 100),
    seq INTEGER NOT NULL,
    deployed_at TEXT NOT NULL,
    PRIMARY KEY (endpoint, deployed_model_id),
    UNIQUE (endpoint, model, version_id),
    FOREIGN KEY (model, version_id) REFERENCES versions(model, version_id)
);
"""


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version_id: int
    artifact_uri: str
    run_key: str
    labels: dict[str, str]
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    aliases: tuple[str, ...]
    created_at: str

    @property
    def resource_name(self) -> str:
        """``model@version``, the same shape as a Vertex versioned model name."""
        return f"{self.model}@{self.version_id}"


@dataclass(frozen=True)
class Model:
    name: str
    created_at: str
    version_count: int


@dataclass(frozen=True)
class Deployment:
    endpoint: str
    deployed_model_id: str
    model: str
    version: int
    traffic_percent: int
    deployed_at: str


@dataclass(frozen=True)
class Endpoint:
    name: str
    created_at: str
    deployments: tuple[Deployment, ...] = field(default_factory=tuple)

    @property
    def traffic_split(self) -> dict[str, int]:
        return {d.deployed_model_id: d.traffic_percent for d in self.deployments}

    def find(self, model: str, version: int) -> Deployment | None:
        return next((d for d in self.deployments if d.model == model and d.version == int(version)), None)


def deployed_model_id(model: str, version: int) -> str:
    """Deterministic deployed-model id, so a redeploy after an undeploy gets the same id."""
    return f"{model}-v{int(version)}"


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        raise RegistryError(
            f"alias {alias!r}: expected lowercase letters, digits and '-', starting with a letter and not "
            f"ending with '-', at most 128 characters (the Vertex alias format)"
        )
    return alias


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class LocalRegistry:
    """Model Registry + Endpoints on one SQLite file. Safe to use from several processes at once."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    # -- plumbing ------------------------------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: transactions are explicit, so each mutation is exactly one BEGIN IMMEDIATE.
        conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the write lock is taken up front so read-then-write cannot race."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- models and versions -------------------------------------------------------------------------------
    def register_version(
        self,
        model: str,
        artifact_uri: str,
        run_key: str,
        labels: Mapping[str, str] | None = None,
        metrics: Mapping[str, Any] | None = None,
        lineage: Mapping[str, Any] | None = None,
        aliases: Iterable[str] = (),
    ) -> ModelVersion:
        """Add the next version of ``model`` (created if new) and point ``aliases`` at it.

        Idempotent by ``run_key``: if this model already has a version from that run, it is returned unchanged
        (aliases are not re-applied, so a later alias move is never undone by a retry).
        """
        if not model:
            raise RegistryError("model: expected a non-empty model name")
        if not run_key:
            raise RegistryError(f"model {model!r}: run_key must be non-empty (it makes registering "
                                "idempotent)")
        aliases = [check_alias(a) for a in aliases]
        with self._write() as conn:
            existing = conn.execute(
                "SELECT version_id FROM versions WHERE model=? AND run_key=?", (model, run_key)
            ).fetchone()
            if existing is not None:
                return self._version(conn, model, existing["version_id"])
            now = _now()
            conn.execute("INSERT OR IGNORE INTO models(name, created_at) VALUES (?, ?)", (model, now))
            version_id = conn.execute(
                "SELECT COALESCE(MAX(version_id), 0) + 1 FROM versions WHERE model=?", (model,)
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO versions(model, version_id, artifact_uri, run_key, labels, metrics, lineage, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (model, version_id, artifact_uri, run_key, _dump(labels), _dump(metrics), _dump(lineage),
                 now),
            )
            if version_id == 1:
                aliases = [DEFAULT_ALIAS, *aliases]
            for alias in aliases:
                self._move_alias(conn, model, alias, version_id)
            return self._version(conn, model, version_id)

    def get_version(self, model: str, version: int | str) -> ModelVersion:
        """A version by number or alias; raises RegistryError naming what is missing."""
        with self._connect() as conn:
            return self._version(conn, model, self._resolve(conn, model, version))

    def list_versions(self, model: str) -> list[ModelVersion]:
        with self._connect() as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT version_id FROM versions WHERE model=? ORDER BY version_id", (model,))]
            return [self._version(conn, model, v) for v in ids]

    def list_models(self) -> list[Model]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT m.name, m.created_at, COUNT(v.version_id) AS n FROM models m "
                "LEFT JOIN versions v ON v.model = m.name GROUP BY m.name ORDER BY m.name"
            ).fetchall()
        return [Model(name=r["name"], created_at=r["created_at"], version_count=r["n"]) for r in rows]

    def find_by_run_key(self, model: str, run_key: str) -> ModelVersion | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT version_id FROM versions WHERE model=? AND run_key=?", (model, run_key)
            ).fetchone()
            return None if row is None else self._version(conn, model, row["version_id"])

    # -- aliases -------------------------------------------------------------------------------------------
    def set_alias(self, model: str, alias: str, version: int) -> ModelVersion:
        """Point ``alias`` at ``version`` (moving it from wherever it was)."""
        return self.set_aliases(model, {alias: version})[alias]

    def set_aliases(self, model: str, moves: Mapping[str, int]) -> dict[str, ModelVersion]:
        """Move several aliases in one transaction: readers see all moves or none."""
        for alias in moves:
            check_alias(alias)
        with self._write() as conn:
            for alias, version in moves.items():
                self._move_alias(conn, model, alias, self._resolve(conn, model, version))
            return {alias: self._version(conn, model, int(v)) for alias, v in moves.items()}

    def compare_and_set_aliases(self, model: str, moves: Mapping[str, int],
                                expected: Mapping[str, int | None]) -> dict[str, ModelVersion]:
        """``set_aliases`` if each alias in ``expected`` still names that version (None: no version), checked
        in the same transaction; otherwise raises ``AliasMoved`` and moves nothing."""
        for alias in moves:
            check_alias(alias)
        with self._write() as conn:
            for alias, want in expected.items():
                row = conn.execute("SELECT version_id FROM aliases WHERE model=? AND alias=?",
                                   (model, alias)).fetchone()
                found = None if row is None else int(row[0])
                if found != (None if want is None else int(want)):
                    raise AliasMoved(alias, None if want is None else str(want),
                                     None if found is None else str(found))
            for alias, version in moves.items():
                self._move_alias(conn, model, alias, self._resolve(conn, model, version))
            return {alias: self._version(conn, model, int(v)) for alias, v in moves.items()}

    def remove_alias(self, model: str, alias: str) -> None:
        if alias == DEFAULT_ALIAS:
            raise RegistryError(f"model {model!r}: the {DEFAULT_ALIAS!r} alias can be moved but not removed")
        with self._write() as conn:
            conn.execute("DELETE FROM aliases WHERE model=? AND alias=?", (model, alias))

    def get_alias(self, model: str, alias: str) -> ModelVersion | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT version_id FROM aliases WHERE model=? AND alias=?", (model, alias)
            ).fetchone()
            return None if row is None else self._version(conn, model, row["version_id"])

    # -- endpoints -----------------------------------------------------------------------------------------
    def ensure_endpoint(self, name: str) -> Endpoint:
        if not name:
            raise RegistryError("endpoint: expected a non-empty endpoint name")
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO endpoints(name, created_at) VALUES (?, ?)", (name, _now()))
            return self._endpoint(conn, name)

    def get_endpoint(self, name: str) -> Endpoint | None:
        with self._connect() as conn:
            return self._endpoint(conn, name)

    def deploy(self, endpoint: str, model: str, version: int, traffic_percent: int = 100,
               keep: int | None = None, traffic_split: Mapping[str, int] | None = None) -> Deployment:
        """Deploy ``model@version`` to ``endpoint`` with ``traffic_percent`` of its traffic.

        The other deployments share the rest in proportion to their current traffic. Deploying a version that
        is already on the endpoint changes nothing and returns the existing deployment. ``keep`` caps how many
        deployments stay: the oldest others are undeployed (traffic redistributed) until ``keep`` remain.
        ``traffic_split`` instead sets the whole split as Vertex's ``deployModel`` does: ``"0"`` is the new
        deployment, deployed ids left out get 0%.
        """
        if traffic_split is not None:
            return self._deploy_with_split(endpoint, model, version, traffic_split)
        check_percent(traffic_percent, "traffic_percent")
        if keep is not None and keep < 1:
            raise RegistryError(f"keep: expected at least 1 deployment to keep, found {keep}")
        with self._write() as conn:
            self._require_endpoint(conn, endpoint)
            version = self._resolve(conn, model, version)
            current = self._deployments(conn, endpoint)
            for d in current:
                if d.model == model and d.version == version:
                    return d
            new_id = deployed_model_id(model, version)
            pruned = current[: max(0, len(current) + 1 - keep)] if keep is not None else []
            # Pruned deployments give their traffic back to the survivors first, so the new version gets
            # exactly traffic_percent and the survivors share the rest; all of it lands in one transaction.
            split = {d.deployed_model_id: d.traffic_percent for d in current}
            for old in pruned:
                split = unallocate_traffic(split, old.deployed_model_id)
            if current and not split and traffic_percent < 100:
                raise RegistryError(f"keep={keep} undeploys every other model, so nobody would take the "
                                    f"other {100 - traffic_percent}%; deploy with 100 or keep more versions")
            split = allocate_traffic(split, new_id, traffic_percent)
            seq = 1 + max((r[0] for r in conn.execute(
                "SELECT seq FROM deployments WHERE endpoint=?", (endpoint,))), default=0)
            conn.execute(
                "INSERT INTO deployments(endpoint, deployed_model_id, model, version_id, traffic_percent, "
                "seq, deployed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (endpoint, new_id, model, version, traffic_percent, seq, _now()),
            )
            for old in pruned:
                conn.execute("DELETE FROM deployments WHERE endpoint=? AND deployed_model_id=?",
                             (endpoint, old.deployed_model_id))
            self._write_split(conn, endpoint, split)
            return next(d for d in self._deployments(conn, endpoint) if d.deployed_model_id == new_id)

    def undeploy(self, endpoint: str, model: str, version: int,
                 traffic_split: Mapping[str, int] | None = None) -> Endpoint:
        """Remove ``model@version`` from ``endpoint``; the others scale back up to 100%, or take
        ``traffic_split`` (ids left out get 0%). No-op if absent."""
        with self._write() as conn:
            self._require_endpoint(conn, endpoint)
            current = self._deployments(conn, endpoint)
            target = next((d for d in current if d.model == model and d.version == int(version)), None)
            if target is not None:
                split = unallocate_traffic({d.deployed_model_id: d.traffic_percent for d in current},
                                           target.deployed_model_id)
                if traffic_split is not None:
                    rest = [d.deployed_model_id for d in current if d is not target]
                    split = self._full_split(endpoint, rest, traffic_split)
                conn.execute("DELETE FROM deployments WHERE endpoint=? AND deployed_model_id=?",
                             (endpoint, target.deployed_model_id))
                self._write_split(conn, endpoint, split)
            return self._endpoint(conn, endpoint)

    def set_traffic(self, endpoint: str, split: Mapping[str, int]) -> Endpoint:
        """Replace the traffic split. Every id must be deployed; ids left out get 0; the total must be 100."""
        with self._write() as conn:
            self._require_endpoint(conn, endpoint)
            deployed = {d.deployed_model_id for d in self._deployments(conn, endpoint)}
            unknown = sorted(set(split) - deployed)
            if unknown:
                raise RegistryError(f"endpoint {endpoint!r}: traffic split names {unknown}, which are not "
                                    f"deployed; deployed: {sorted(deployed)}")
            for key, pct in split.items():
                check_percent(pct, f"traffic split[{key!r}]")
            total = sum(split.values())
            if total != 100:
                raise RegistryError(f"endpoint {endpoint!r}: traffic split must sum to 100, found {total} "
                                    f"({dict(split)})")
            self._write_split(conn, endpoint, {k: split.get(k, 0) for k in deployed})
            return self._endpoint(conn, endpoint)

    def _deploy_with_split(self, endpoint: str, model: str, version: int,
                           traffic_split: Mapping[str, int]) -> Deployment:
        with self._write() as conn:
            self._require_endpoint(conn, endpoint)
            version = self._resolve(conn, model, version)
            current = self._deployments(conn, endpoint)
            existing = next((d for d in current if d.model == model and d.version == version), None)
            if existing is not None:
                return existing
            new_id = deployed_model_id(model, version)
            named = {(new_id if k == NEW_DEPLOYMENT else k): v for k, v in traffic_split.items()}
            split = self._full_split(endpoint, [*(d.deployed_model_id for d in current), new_id], named)
            seq = 1 + max((d_seq[0] for d_seq in conn.execute(
                "SELECT seq FROM deployments WHERE endpoint=?", (endpoint,))), default=0)
            conn.execute(
                "INSERT INTO deployments(endpoint, deployed_model_id, model, version_id, traffic_percent, "
                "seq, deployed_at) VALUES (?, ?, ?, ?, 0, ?, ?)",
                (endpoint, new_id, model, version, seq, _now()),
            )
            self._write_split(conn, endpoint, split)
            return next(d for d in self._deployments(conn, endpoint) if d.deployed_model_id == new_id)

    @staticmethod
    def _full_split(endpoint: str, ids: list[str], split: Mapping[str, int]) -> dict[str, int]:
        """``split`` over every id in ``ids`` (missing ones at 0); it may name no other id and sums to 100."""
        unknown = sorted(set(split) - set(ids))
        if unknown:
            raise StaleSplit(f"endpoint {endpoint!r}: traffic split names {unknown}, which are not "
                             f"deployed; deployed: {sorted(ids)}")
        for key, pct in split.items():
            check_percent(pct, f"traffic split[{key!r}]")
        if ids and sum(split.values()) != 100:
            raise RegistryError(f"endpoint {endpoint!r}: traffic split must sum to 100, found "
                                f"{sum(split.values())} ({dict(split)})")
        return {k: split.get(k, 0) for k in ids}

    # -- internals -----------------------------------------------------------------------------------------
    def _resolve(self, conn: sqlite3.Connection, model: str, version: int | str) -> int:
        """A version number, or an alias, to an existing version number."""
        if conn.execute("SELECT 1 FROM models WHERE name=?", (model,)).fetchone() is None:
            raise RegistryError(f"model {model!r} is not registered")
        if isinstance(version, int) or (isinstance(version, str) and version.isdigit()):
            row = conn.execute("SELECT version_id FROM versions WHERE model=? AND version_id=?",
                               (model, int(version))).fetchone()
        else:
            row = conn.execute("SELECT version_id FROM aliases WHERE model=? AND alias=?",
                               (model, version)).fetchone()
        if row is None:
            known = [r[0] for r in conn.execute(
                "SELECT version_id FROM versions WHERE model=? ORDER BY version_id", (model,))]
            raise RegistryError(f"model {model!r} has no version {version!r}; versions: {known}")
        return int(row[0])

    def _move_alias(self, conn: sqlite3.Connection, model: str, alias: str, version_id: int) -> None:
        conn.execute(
            "INSERT INTO aliases(model, alias, version_id) VALUES (?, ?, ?) "
            "ON CONFLICT(model, alias) DO UPDATE SET version_id=excluded.version_id",
            (model, alias, version_id),
        )

    def _version(self, conn: sqlite3.Connection, model: str, version_id: int) -> ModelVersion:
        row = conn.execute(
            "SELECT * FROM versions WHERE model=? AND version_id=?", (model, version_id)
        ).fetchone()
        if row is None:
            raise RegistryError(f"model {model!r} has no version {version_id}")
        aliases = tuple(r[0] for r in conn.execute(
            "SELECT alias FROM aliases WHERE model=? AND version_id=? ORDER BY alias", (model, version_id)))
        return ModelVersion(
            model=model,
            version_id=row["version_id"],
            artifact_uri=row["artifact_uri"],
            run_key=row["run_key"],
            labels=json.loads(row["labels"]),
            metrics=json.loads(row["metrics"]),
            lineage=json.loads(row["lineage"]),
            aliases=aliases,
            created_at=row["created_at"],
        )

    def _require_endpoint(self, conn: sqlite3.Connection, name: str) -> None:
        if conn.execute("SELECT 1 FROM endpoints WHERE name=?", (name,)).fetchone() is None:
            raise RegistryError(f"endpoint {name!r} does not exist; create it with ensure_endpoint")

    def _deployments(self, conn: sqlite3.Connection, endpoint: str) -> list[Deployment]:
        rows = conn.execute(
            "SELECT * FROM deployments WHERE endpoint=? ORDER BY seq", (endpoint,)
        ).fetchall()
        return [
            Deployment(endpoint=endpoint, deployed_model_id=r["deployed_model_id"], model=r["model"],
                       version=r["version_id"], traffic_percent=r["traffic_percent"],
                       deployed_at=r["deployed_at"])
            for r in rows
        ]

    def _endpoint(self, conn: sqlite3.Connection, name: str) -> Endpoint | None:
        row = conn.execute("SELECT * FROM endpoints WHERE name=?", (name,)).fetchone()
        if row is None:
            return None
        deployments = tuple(self._deployments(conn, name))
        return Endpoint(name=name, created_at=row["created_at"], deployments=deployments)

    def _write_split(self, conn: sqlite3.Connection, endpoint: str, split: Mapping[str, int]) -> None:
        if split and sum(split.values()) != 100:
            raise RegistryError(f"endpoint {endpoint!r}: traffic split {dict(split)} does not sum to 100")
        for key, pct in split.items():
            conn.execute("UPDATE deployments SET traffic_percent=? WHERE endpoint=? AND deployed_model_id=?",
                         (pct, endpoint, key))


def _dump(value: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(value or {}), sort_keys=True, default=str)
