"""extract: the source table's time window as a Parquet ``Dataset``.

Cloud: BigQuery runs ``EXPORT DATA ... AS <extract.sql>`` straight into the artifact's gs:// folder (no rows
pass through the component). Local: DuckDB runs the same SQL, transpiled, over the landing Parquet files. Both
backends validate the columns before writing, count and checksum the written files the same way, and leave
nothing at the output path when validation fails.

Checksum, local: SHA-256 of the row count, the column names/types and the sum (mod 2^64) of the low 64 bits of
each row's MD5 over its JSON text; summing makes it independent of row order and of how rows are split into files.
Cloud: SHA-256 of the row count, the column names/types and the exported objects' names, sizes and CRC32C as
Cloud Storage computed them on write, with the row count from the Parquet footers: no data page is read back, so
the step's I/O and memory stay flat however large the export (the local checksum would re-read all of it).
"""

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from kfp.dsl import Dataset, Output

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.errors import CtloopError, DataValidationError
from ctloop.launching import label_value
from ctloop.sql import (
    duckdb_connect,
    load_template,
    parse_timestamp,
    register_parquet_table,
    render_sql,
    transpile_for_duckdb,
)
from ctloop.steps import attempt_suffix, start_or_resume

STEP = "extract"
LOCAL_FILE_SIZE = "256MB"  # DuckDB starts a new part file past this size
EXPORT_TIMEOUT_S = 3600.0
MAX_EXPORT_ATTEMPTS = 10
_GCS_URI = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[A-Za-z0-9._~=+@:-]+)*/?$")
_NUMERIC = ("INT64", "FLOAT64", "NUMERIC", "BIGNUMERIC")


@dataclass(frozen=True)
class ExtractResult:
    """What the extract wrote. ``query``: the rendered BigQuery SQL; ``engine_query``: what the engine ran."""

    row_count: int
    columns: dict[str, str]  # name -> BigQuery type name (INT64, FLOAT64, STRING, TIMESTAMP, ...)
    checksum: str
    query: str
    source_table: str
    snapshot_time: str
    files: list[str]
    window_start: str
    window_end: str
    backend: str
    engine_query: str
    job_id: str | None = None


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def extract(
    config: dict, run_id: str, dataset: Output[Dataset], snapshot_time: str = ""
) -> NamedTuple("Outputs", [("row_count", int)]):
    """Extract the configured window of the source table into ``dataset`` (a folder of Parquet files)."""
    from components.extract import extract_to_artifact
    from ctloop.steps import run_step

    return run_step(extract_to_artifact, config, run_id, snapshot_time, dataset)


def extract_to_artifact(config: dict, run_id: str, snapshot_time: str, dataset: Any) -> tuple[int]:
    """The component's body: run the extract into the artifact and record its lineage in ``.metadata``."""
    settings = Settings.from_param(config)
    result = run_extract(settings, run_id=run_id, output_path=dataset.path, output_uri=dataset.uri,
                         snapshot_time=snapshot_time or None)
    dataset.metadata.update({
        "row_count": result.row_count,
        "columns": result.columns,
        "checksum": result.checksum,
        "query": result.query,
        "source_table": result.source_table,
        "snapshot_time": result.snapshot_time,
        "window_start": result.window_start,
        "window_end": result.window_end,
        "files": len(result.files),
        "backend": result.backend,
        "run_id": run_id,
        **({"bigquery_job_id": result.job_id} if result.job_id else {}),
    })
    return (result.row_count,)


def run_extract(
    settings: Settings,
    *,
    run_id: str,
    output_path: str,
    output_uri: str,
    snapshot_time: str | None = None,
    landing_dir: Path | None = None,
    bq_client: Any = None,
    storage_client: Any = None,
) -> ExtractResult:
    """Extract ``[window_end - data.window_days, window_end)`` of the source table into ``output_path``.

    ``window_end`` is ``data.window_end`` if set, else ``snapshot_time`` (ISO; no offset = UTC), else now.
    Local backend: reads ``landing_dir`` (default ``local.landing_dir``). Cloud backend: BigQuery exports to
    ``output_uri`` (gs://) and the files are read back through ``output_path`` (the /gcs/ mount on Vertex);
    ``bq_client``/``storage_client`` override the Google clients. Raises DataValidationError for missing or
    mistyped columns and too few rows; nothing is then left at ``output_path``.
    """
    if not run_id:
        raise CtloopError("extract: run_id must be a non-empty string (it keys the BigQuery job id)")
    try:
        now = datetime.now(UTC).replace(microsecond=0)
        snapshot = parse_timestamp(snapshot_time) if snapshot_time else now
        window_end = parse_timestamp(settings.data.window_end) if settings.data.window_end else snapshot
    except (TypeError, ValueError) as exc:
        raise CtloopError(f"extract: snapshot_time/data.window_end: {exc}") from exc
    source, template = load_template(settings.data.query_file)
    cols = settings.columns
    query = render_sql(template, {
        "source_table": settings.source_table,
        "id_column": cols.id_column,
        "timestamp_column": cols.timestamp_column,
        "window_end": window_end,
        "window_days": settings.data.window_days,
    }, source=source)
    window = {
        "snapshot_time": snapshot.isoformat(),
        "window_start": (window_end - timedelta(days=settings.data.window_days)).isoformat(),
        "window_end": window_end.isoformat(),
    }
    if settings.backend == "local":
        landing = landing_dir or settings.local.landing_dir
        return _run_local(settings, query, Path(output_path), landing, window)
    return _run_cloud(settings, query, run_id, Path(output_path), output_uri, bq_client, storage_client, window)


# ---- validation (both backends) ---------------------------------------------------------------------------

def validate_columns(columns: dict[str, str], settings: Settings) -> None:
    """Check the role and configured feature columns exist with usable types (BigQuery type names)."""
    cols = settings.columns
    table = settings.source_table
    required: dict[str, tuple[str, ...] | None] = {
        cols.id_column: None, cols.timestamp_column: ("TIMESTAMP",), cols.label_column: ("INT64", "BOOL"),
    }
    for name in cols.numeric_features or []:
        required[name] = _NUMERIC
    for name in cols.categorical_features or []:
        required.setdefault(name, None)
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataValidationError(f"{table}: missing required column(s) {missing}; expected them in the "
                                  f"extract, found columns {sorted(columns)}")
    for name, allowed in required.items():
        if allowed is not None and columns[name] not in allowed:
            raise DataValidationError(f"{table}: column {name!r} has type {columns[name]}; expected "
                                      f"{' or '.join(allowed)}")


def validate_source_columns(columns: dict[str, str], settings: Settings) -> None:
    """The query filters on the id and timestamp columns: check the source table has them, typed right."""
    cols = settings.columns
    table = settings.source_table
    missing = [c for c in (cols.id_column, cols.timestamp_column) if c not in columns]
    if missing:
        raise DataValidationError(f"{table}: missing required column(s) {missing} in the source table; "
                                  f"found columns {sorted(columns)}")
    if columns[cols.timestamp_column] != "TIMESTAMP":
        raise DataValidationError(f"{table}: column {cols.timestamp_column!r} has type "
                                  f"{columns[cols.timestamp_column]}; expected TIMESTAMP")


def validate_row_count(rows: int, settings: Settings) -> None:
    minimum = max(1, settings.data.min_rows)
    if rows < minimum:
        what = "no rows" if rows == 0 else f"{rows} rows"
        raise DataValidationError(
            f"{settings.source_table}: the extract window returned {what}; expected at least {minimum} "
            f"(data.min_rows); check data.window_end/window_days and that the table has data in the window")


# ---- shared: type names and the content checksum ---------------------------------------------------------

_DUCKDB_TYPES = {
    "VARCHAR": "STRING", "BOOLEAN": "BOOL", "DOUBLE": "FLOAT64", "FLOAT": "FLOAT64", "REAL": "FLOAT64",
    "TIMESTAMP WITH TIME ZONE": "TIMESTAMP", "TIMESTAMP": "DATETIME", "TIMESTAMP_NS": "DATETIME",
    "TIMESTAMP_MS": "DATETIME", "TIMESTAMP_S": "DATETIME", "DATE": "DATE", "TIME": "TIME", "BLOB": "BYTES",
    **dict.fromkeys(["BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT", "UBIGINT", "UINTEGER",
                     "USMALLINT", "UTINYINT"], "INT64"),
}
_BIGQUERY_TYPES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "RECORD": "STRUCT"}


def duckdb_type_name(type_name: str) -> str:
    """DuckDB type -> the BigQuery name both backends report (DECIMAL: NUMERIC, naive TIMESTAMP: DATETIME)."""
    t = type_name.upper()
    if t.startswith("DECIMAL"):
        return "NUMERIC"
    return _DUCKDB_TYPES.get(t, t)


def bigquery_type_name(field_type: str, mode: str | None = None) -> str:
    t = _BIGQUERY_TYPES.get(field_type.upper(), field_type.upper())
    return f"ARRAY<{t}>" if (mode or "").upper() == "REPEATED" else t


@dataclass(frozen=True)
class ParquetSummary:
    rows: int
    checksum: str
    files: list[str]


def summarize_parquet(directory: Path) -> ParquetSummary:
    """Row count and layout-independent content checksum of the ``*.parquet`` files in ``directory``."""
    files = sorted(p.name for p in Path(directory).glob("*.parquet"))
    if not files:
        return ParquetSummary(rows=0, checksum=_checksum(0, 0, []), files=[])
    con = duckdb_connect()
    try:
        glob = _sql_string(Path(directory) / "*.parquet")
        source = f"read_parquet('{glob}', union_by_name = true)"
        schema = list(_describe(con, f"SELECT * FROM {source}").items())
        rows, row_hash_sum = con.execute(
            "SELECT count(*), coalesce(sum(md5_number_lower(CAST(to_json(r) AS VARCHAR))), 0) "
            f"FROM {source} AS r"
        ).fetchone()
    finally:
        con.close()
    checksum = _checksum(int(rows), int(row_hash_sum), schema)
    return ParquetSummary(rows=int(rows), checksum=checksum, files=files)


def _checksum(rows: int, row_hash_sum: int, schema: list[tuple[str, str]]) -> str:
    payload = json.dumps({"rows": rows, "row_hash_sum": row_hash_sum % 2**64, "columns": schema},
                         separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


# ---- local backend: DuckDB over the landing Parquet ------------------------------------------------------

def _run_local(settings: Settings, query: str, output: Path, landing_dir: Path,
               window: dict[str, str]) -> ExtractResult:
    table_dir = Path(landing_dir) / settings.data.bq_dataset / settings.data.bq_table
    if not any(table_dir.rglob("*.parquet")):
        raise DataValidationError(f"{settings.source_table}: expected Parquet files under {table_dir}, found "
                                  f"none (write sample data with `ctloop sample-data`)")
    engine_query = transpile_for_duckdb(query)
    con = duckdb_connect()
    token = uuid.uuid4().hex[:12]
    staging = output.parent / f".{output.name}.tmp-{token}"
    spill = output.parent / f".{output.name}.spill-{token}"
    try:
        files_glob = str(table_dir / "**" / "*.parquet")
        register_parquet_table(con, settings.data.bq_dataset, settings.data.bq_table, files_glob)
        source = f'"{settings.data.bq_dataset}"."{settings.data.bq_table}"'
        validate_source_columns(_describe(con, f"SELECT * FROM {source}"), settings)
        columns = _describe(con, engine_query)
        validate_columns(columns, settings)
        output.parent.mkdir(parents=True, exist_ok=True)
        # The dedup window holds ~0.7 kB per row: let DuckDB spill past its memory limit, in a folder we own,
        # and drop the output ordering nobody relies on (the checksum ignores order).
        con.execute(f"SET temp_directory = '{_sql_string(spill)}'")
        con.execute("SET preserve_insertion_order = false")
        target = _sql_string(staging)
        options = f"FORMAT parquet, FILE_SIZE_BYTES '{LOCAL_FILE_SIZE}', FILENAME_PATTERN 'part-{{i}}'"
        (rows,) = con.execute(f"COPY ({engine_query}) TO '{target}' ({options})").fetchone()
        validate_row_count(int(rows), settings)
        summary = summarize_parquet(staging)
        _move_into_place(staging, output)
    finally:
        con.close()
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(spill, ignore_errors=True)
    return ExtractResult(row_count=summary.rows, columns=columns, checksum=summary.checksum, query=query,
                         source_table=settings.source_table, files=summary.files, backend="local",
                         engine_query=engine_query, **window)


def _sql_string(path: Path) -> str:
    return str(path).replace("'", "''")


def _describe(con: Any, query: str) -> dict[str, str]:
    """Column name -> BigQuery type name of ``query``'s result, without running it."""
    described = con.execute(f"DESCRIBE {query}").fetchall()
    return {name: duckdb_type_name(type_name) for name, type_name, *_ in described}


def _move_into_place(staging: Path, output: Path) -> None:
    """Replace ``output`` with ``staging``; at no point does ``output`` hold a partial result."""
    old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:12]}"
    if output.exists() or output.is_symlink():
        os.replace(output, old)
    os.replace(staging, output)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


# ---- cloud backend: BigQuery EXPORT DATA -----------------------------------------------------------------

def job_id_for(run_id: str, statement: str, step: str = STEP, attempt: int = 1) -> str:
    """Deterministic BigQuery job id: a rerun of the same run and statement finds the job (409); a later
    attempt, after that job failed, gets a suffix (ctloop.steps.start_or_resume)."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", run_id)[:100]
    digest = hashlib.sha256(f"{run_id}\0{step}\0{statement}".encode()).hexdigest()[:16]
    return f"ctloop_{step}_{slug}_{digest}{attempt_suffix(attempt)}"


def job_labels(settings: Settings, run_id: str, step: str = STEP) -> dict[str, str]:
    """Settings labels plus the run and step, as BigQuery label values (lowercase, [a-z0-9_-], <= 63)."""
    return {**settings.labels, "ctloop-run": label_value(run_id), "ctloop-step": step}


def export_statement(query: str, output_uri: str) -> str:
    """``EXPORT DATA`` of ``query`` as Parquet part files under ``output_uri`` (a retry overwrites them)."""
    if not _GCS_URI.match(output_uri):
        raise CtloopError(f"extract (cloud): expected a gs:// folder of plain characters as output URI, "
                          f"found {output_uri!r}; run the cloud backend with a gs:// pipeline root")
    uri = output_uri.rstrip("/") + "/part-*.parquet"
    return f"EXPORT DATA OPTIONS (uri = '{uri}', format = 'PARQUET', overwrite = true) AS\n{query}"


def _bq_columns(schema: list[Any]) -> dict[str, str]:
    return {f.name: bigquery_type_name(f.field_type, f.mode) for f in schema}


def _bigquery_client(settings: Settings) -> Any:
    from google.cloud import bigquery

    return bigquery.Client(project=settings.gcp.project, location=settings.gcp.region)


def summarize_export(storage_client: Any, output_uri: str, mount: Path,
                     schema: dict[str, str]) -> ParquetSummary:
    """Row count and checksum of an export from its metadata only: the objects' CRC32C and sizes from Cloud
    Storage, the row counts from each file's Parquet footer (read through ``mount``)."""
    import pyarrow.parquet as pq

    bucket, _, prefix = output_uri.removeprefix("gs://").partition("/")
    prefix = prefix.rstrip("/") + "/"
    objects = sorted((b.name.removeprefix(prefix), int(b.size or 0), b.crc32c or "")
                     for b in storage_client.list_blobs(bucket, prefix=prefix, fields="items(name,size,crc32c)")
                     if b.name.endswith(".parquet") and "/" not in b.name.removeprefix(prefix))
    files = [name for name, _, _ in objects if (mount / name).is_file()]
    if not objects or len(files) < len(objects):  # nothing exported, or the mount does not show it
        return ParquetSummary(rows=0, checksum="", files=files)
    rows = sum(pq.ParquetFile(mount / name).metadata.num_rows for name in files)
    payload = json.dumps({"rows": rows, "columns": sorted(schema.items()), "objects": objects},
                         separators=(",", ":"))
    return ParquetSummary(rows=rows, checksum="sha256:" + hashlib.sha256(payload.encode()).hexdigest(), files=files)


def _storage_client(settings: Settings) -> Any:
    from google.cloud import storage

    return storage.Client(project=settings.gcp.project)


def _run_cloud(settings: Settings, query: str, run_id: str, output: Path, output_uri: str, client: Any,
               storage_client: Any, window: dict[str, str]) -> ExtractResult:
    from google.cloud import bigquery

    statement = export_statement(query, output_uri)
    client = client or _bigquery_client(settings)
    labels = job_labels(settings, run_id)
    # The window filter needs a TIMESTAMP column; without one the dry run fails with a bare signature error.
    validate_source_columns(_bq_columns(client.get_table(settings.source_table).schema), settings)
    # A dry run returns the result schema without reading data: validate before anything is written.
    dry_config = bigquery.QueryJobConfig(dry_run=True, use_legacy_sql=False, labels=labels)
    dry = client.query(query, job_config=dry_config, job_retry=None)
    if dry.schema is None:
        raise CtloopError(f"{settings.source_table}: the BigQuery dry run returned no schema for the query")
    columns = _bq_columns(dry.schema)
    validate_columns(columns, settings)

    config = bigquery.QueryJobConfig(use_legacy_sql=False, labels=labels)

    def existing(job_id: str) -> Any:
        return client.get_job(job_id, project=settings.gcp.project, location=settings.gcp.region)

    # A rerun step waits on the export that already ran (or runs) under this id, or starts the next attempt
    # when that one failed (its error surfaced from job.result() on the earlier attempt).
    job_id, job = start_or_resume(
        lambda attempt: job_id_for(run_id, statement, attempt=attempt),
        lambda job_id: client.query(statement, job_id=job_id, job_config=config, job_retry=None),
        existing, lambda job: job.state == "DONE" and job.error_result is not None, MAX_EXPORT_ATTEMPTS,
        f"run {run_id!r}: BigQuery export")
    job.result(timeout=EXPORT_TIMEOUT_S)

    summary = summarize_export(storage_client or _storage_client(settings), output_uri, output, columns)
    if not summary.checksum:
        # BigQuery writes at least one (maybe empty) file: none visible means the mount does not show them.
        raise CtloopError(f"{settings.source_table}: export job {job_id} finished but no Parquet files are "
                          f"visible at {output} (expected the mount of {output_uri})")
    try:
        validate_row_count(summary.rows, settings)
    except DataValidationError:
        shutil.rmtree(output, ignore_errors=True)
        raise
    return ExtractResult(row_count=summary.rows, columns=columns, checksum=summary.checksum, query=query,
                         source_table=settings.source_table, files=summary.files, backend="cloud",
                         engine_query=statement, job_id=job_id, **window)
