"""The extract step: DuckDB over landing Parquet (local); BigQuery EXPORT DATA, recording server (cloud)."""

from __future__ import annotations

import base64
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import google_crc32c
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.api_core.exceptions import BadRequest
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery, storage

from components.extract import (
    ExtractResult,
    export_statement,
    job_id_for,
    run_extract,
    summarize_parquet,
)
from ctloop.config import Settings
from ctloop.errors import CtloopError, DataValidationError
from devtools.sample_data import write_sample_data
from tests.recording_server import RecordedRequest, RecordingServer

SNAPSHOT = "2025-07-01T00:00:00Z"
WINDOW_END = datetime(2025, 7, 1, tzinfo=UTC)
WINDOW_DAYS = 365
TABLE = "ctloop-dev.ctloop.events"
JOBS = r"/bigquery/v2/projects/ctloop-dev/jobs"
TABLE_PATH = r"/bigquery/v2/projects/ctloop-dev/datasets/ctloop/tables/events"
OUTPUT_URI = "gs://ctloop-dev-pipeline-root/runs/run-7/extract/dataset"
OUTPUT_PREFIX = "runs/run-7/extract/dataset/"
OBJECTS = r"/storage/v1/b/ctloop-dev-pipeline-root/o"


def _settings(workdir: Path, **overrides: Any) -> Settings:
    base = {"local.workdir": str(workdir), "data.window_days": WINDOW_DAYS}
    return Settings().with_overrides({**base, **overrides})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: Any) -> Path:
    """A landing table with a base batch across the window start and a later batch after the window end."""
    root = tmp_path_factory.mktemp("work")
    s = _settings(root)
    write_sample_data(s.local.landing_dir, s, rows=20_000, start="2024-01-01", end="2025-07-01", batch="base")
    write_sample_data(s.local.landing_dir, s, rows=2_000, start="2025-07-01", end="2025-10-01", batch="later",
                      drift=0.5)
    return root


@pytest.fixture(scope="module")
def local_result(workdir: Path, tmp_path_factory: Any) -> tuple[ExtractResult, Path]:
    out = tmp_path_factory.mktemp("out") / "dataset"
    result = run_extract(_settings(workdir), run_id="run-7", output_path=str(out), output_uri=str(out),
                         snapshot_time=SNAPSHOT)
    return result, out


def _frame(path: Path) -> pd.DataFrame:
    # Arrow dtypes: nullable ints stay ints, so rows written back have the extract's exact types.
    return pq.read_table(path).to_pandas(types_mapper=pd.ArrowDtype)


def _write_parts(df: pd.DataFrame, folder: Path, parts: int) -> None:
    folder.mkdir(parents=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    size = -(-len(df) // parts)
    for i in range(parts):
        pq.write_table(table.slice(i * size, size), folder / f"chunk-{i}.parquet")


# ---- local backend ---------------------------------------------------------------------------------------

def test_local_extract_is_the_window_without_exact_duplicates(workdir: Path, local_result: tuple,
                                                              tmp_path: Path):
    result, out = local_result
    src = _frame(workdir / "landing" / "ctloop" / "events")
    start = WINDOW_END - timedelta(days=WINDOW_DAYS)
    ts = src["event_ts"]
    expected = src[ts.isna() | ((ts >= start) & (ts < WINDOW_END)).fillna(False)].drop_duplicates()
    assert len(expected) < len(src) - 2_000  # the window cut the base batch and dropped the later one
    assert result.row_count == len(expected)
    got = _frame(out)
    assert len(got) == len(expected) and not got.duplicated().any()
    assert got["event_ts"].dropna().between(start, WINDOW_END, inclusive="left").all()
    # Malformed rows are the transform's to quarantine: they stay.
    assert got["customer_id"].isna().any() and got["event_ts"].isna().any()
    assert (~got["churned"].isin([0, 1])).any() and (got["monthly_charges"] < 0).any()
    # Same rows, shuffled and split differently: same checksum. The extract holds exactly the expected rows.
    _write_parts(expected.sample(frac=1.0, random_state=3), tmp_path / "relaid", parts=3)
    assert summarize_parquet(tmp_path / "relaid").checksum == result.checksum
    assert result.files == sorted(p.name for p in out.iterdir()) == ["part-0.parquet"]
    assert [p.name for p in out.parent.iterdir()] == ["dataset"]  # no staging folder left behind


def test_local_result_describes_the_extract(local_result: tuple):
    result, _ = local_result
    assert result.source_table == TABLE and result.backend == "local" and result.job_id is None
    assert result.snapshot_time == result.window_end == "2025-07-01T00:00:00+00:00"
    assert result.window_start == "2024-07-01T00:00:00+00:00"
    assert result.columns["event_ts"] == "TIMESTAMP" and result.columns["churned"] == "INT64"
    assert result.columns["monthly_charges"] == "FLOAT64" and result.columns["region"] == "STRING"
    assert "FROM `ctloop-dev.ctloop.events` AS source_row" in result.query
    assert "INTERVAL 365 DAY" in result.query and 'FROM "ctloop"."events"' in result.engine_query
    assert result.checksum.startswith("sha256:") and len(result.checksum) == 7 + 64


def test_rerun_gives_the_same_checksum_and_replaces_the_output(workdir: Path, local_result: tuple,
                                                               tmp_path: Path):
    first, _ = local_result
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "stale.parquet").write_bytes(b"left by an earlier attempt")
    for _ in range(2):
        again = run_extract(_settings(workdir), run_id="run-8", output_path=str(out), output_uri=str(out),
                            snapshot_time=SNAPSHOT)
        assert again.checksum == first.checksum and again.row_count == first.row_count
        assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_checksum_follows_content_not_layout(local_result: tuple, tmp_path: Path):
    result, out = local_result
    df = _frame(out)
    _write_parts(df.iloc[::-1], tmp_path / "reversed", parts=4)
    assert summarize_parquet(tmp_path / "reversed").checksum == result.checksum
    changed = df.copy()
    changed.loc[changed.index[10], "monthly_charges"] += 0.01
    _write_parts(changed, tmp_path / "changed", parts=1)
    assert summarize_parquet(tmp_path / "changed").checksum != result.checksum
    _write_parts(pd.concat([df, df.iloc[:1]]), tmp_path / "one_more", parts=1)
    assert summarize_parquet(tmp_path / "one_more").rows == result.row_count + 1
    assert summarize_parquet(tmp_path / "one_more").checksum != result.checksum


def test_window_end_setting_wins_over_the_snapshot(workdir: Path, tmp_path: Path):
    s = _settings(workdir, **{"data.window_end": "2025-01-01T00:00:00Z", "data.window_days": 30})
    result = run_extract(s, run_id="run-9", output_path=str(tmp_path / "d"), output_uri=str(tmp_path / "d"),
                         snapshot_time=SNAPSHOT)
    assert result.snapshot_time == "2025-07-01T00:00:00+00:00"
    assert result.window_start == "2024-12-02T00:00:00+00:00"
    assert result.window_end == "2025-01-01T00:00:00+00:00"
    ts = pq.read_table(tmp_path / "d").column("event_ts").drop_null().to_pandas()
    assert ts.min() >= pd.Timestamp("2024-12-02", tz="UTC")
    assert ts.max() < pd.Timestamp("2025-01-01", tz="UTC")


# ---- validation ------------------------------------------------------------------------------------------

def _small_landing(root: Path, **changes: Any) -> None:
    """A tiny landing table with the configured columns; ``changes`` replace (or, with None, drop) columns."""
    n = 150
    ts = [WINDOW_END - timedelta(hours=i + 1) for i in range(n)]
    columns: dict[str, Any] = {
        "customer_id": pa.array([f"C{i:07d}" for i in range(n)]),
        "event_ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        **{c: pa.array([float(i) for i in range(n)]) for c in
           ("monthly_charges", "total_charges", "data_usage_gb", "satisfaction_score")},
        **{c: pa.array(list(range(n)), pa.int64())
           for c in ("tenure_months", "support_calls", "late_payments")},
        **{c: pa.array(["x"] * n) for c in ("contract_type", "payment_method", "internet_service", "region")},
        "churned": pa.array([i % 2 for i in range(n)], pa.int64()),
    }
    for name, value in changes.items():
        if value is None:
            del columns[name]
        else:
            columns[name] = value(n) if callable(value) else value
    folder = root / "landing" / "ctloop" / "events" / "b1"
    folder.mkdir(parents=True)
    pq.write_table(pa.table(columns), folder / "part-00000.parquet")


FEATURES = {"columns.numeric_features": ["tenure_months", "monthly_charges", "total_charges", "support_calls",
                                         "data_usage_gb", "late_payments", "satisfaction_score"],
            "columns.categorical_features": ["contract_type", "payment_method", "internet_service", "region"]}


@pytest.mark.parametrize(("changes", "overrides", "message"), [
    ({"churned": None}, {},
     "missing required column(s) ['churned']; expected them in the extract, found columns"),
    ({}, {"columns.numeric_features": ["tenure_months", "nonexistent"]},
     "missing required column(s) ['nonexistent']"),
    ({"event_ts": lambda n: pa.array(["2025-06-30 10:00:00"] * n)}, {},
     "column 'event_ts' has type STRING; expected TIMESTAMP"),
    ({"event_ts": lambda n: pa.array([datetime(2025, 6, 30)] * n, pa.timestamp("us"))}, {},
     "column 'event_ts' has type DATETIME; expected TIMESTAMP"),
    ({"churned": lambda n: pa.array([0.0] * n)}, {},
     "column 'churned' has type FLOAT64; expected INT64 or BOOL"),
    ({"monthly_charges": lambda n: pa.array(["12.5"] * n)}, {},
     "column 'monthly_charges' has type STRING; expected INT64 or FLOAT64 or NUMERIC or BIGNUMERIC"),
    ({}, {"data.window_end": "2020-01-01T00:00:00Z"},
     "the extract window returned no rows; expected at least 100 (data.min_rows)"),
    ({}, {"data.min_rows": 1000},
     "the extract window returned 150 rows; expected at least 1000 (data.min_rows)"),
])
def test_bad_data_is_refused_and_nothing_is_written(tmp_path: Path, changes: dict, overrides: dict,
                                                    message: str):
    _small_landing(tmp_path, **changes)
    out = tmp_path / "out" / "dataset"
    with pytest.raises(DataValidationError) as err:
        run_extract(_settings(tmp_path, **{**FEATURES, **overrides}), run_id="r", output_path=str(out),
                    output_uri=str(out), snapshot_time=SNAPSHOT)
    assert str(err.value).startswith(f"{TABLE}: ")
    assert message in str(err.value)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_small_table_itself_passes(tmp_path: Path):
    """The validation cases above differ from a valid table only in what each one changes."""
    _small_landing(tmp_path)
    result = run_extract(_settings(tmp_path, **FEATURES), run_id="r", output_path=str(tmp_path / "d"),
                         output_uri=str(tmp_path / "d"), snapshot_time=SNAPSHOT)
    assert result.row_count == 150


def test_missing_landing_data_names_the_folder(tmp_path: Path):
    with pytest.raises(DataValidationError, match=r"ctloop-dev.ctloop.events: expected Parquet files under "
                                                  r".*landing/ctloop/events, found none"):
        run_extract(_settings(tmp_path), run_id="r", output_path=str(tmp_path / "d"), output_uri="x",
                    snapshot_time=SNAPSHOT)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"run_id": ""}, "run_id must be a non-empty string"),
    ({"snapshot_time": "soon"},
     "snapshot_time/data.window_end: expected an ISO 8601 timestamp, found 'soon'"),
])
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, message: str):
    with pytest.raises(CtloopError) as err:
        args = {"run_id": "r", "output_path": str(tmp_path / "d"), "output_uri": "x",
                "snapshot_time": SNAPSHOT, **kwargs}
        run_extract(_settings(tmp_path), **args)
    assert message in str(err.value)


# ---- the KFP component under the local runner ------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom:RuntimeWarning")
def test_component_writes_the_dataset_and_its_lineage(workdir: Path, local_result: tuple, tmp_path: Path):
    from kfp import local

    from components.extract import extract

    expected, _ = local_result
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    # kfp refuses None in a dict parameter; the unset optional settings fall back to their defaults.
    config = _settings(workdir).model_dump(mode="json", exclude_none=True)
    task = extract(config=config, run_id="run-7", snapshot_time=SNAPSHOT)
    dataset = task.outputs["dataset"]
    assert task.outputs["row_count"] == expected.row_count
    meta = dataset.metadata
    assert meta["row_count"] == expected.row_count and meta["checksum"] == expected.checksum
    assert meta["columns"] == expected.columns and meta["query"] == expected.query
    assert meta["source_table"] == TABLE and meta["snapshot_time"] == expected.snapshot_time
    assert meta["run_id"] == "run-7" and meta["backend"] == "local"
    assert sorted(p.name for p in Path(dataset.path).iterdir()) == ["part-0.parquet"]


# ---- cloud backend: the real BigQuery client against the recording server --------------------------------

def _client(server: RecordingServer) -> bigquery.Client:
    return bigquery.Client(project="ctloop-dev", credentials=AnonymousCredentials(), location="europe-west4",
                           client_options={"api_endpoint": server.url})


def _gcs(server: RecordingServer) -> storage.Client:
    return storage.Client(project="ctloop-dev", credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": server.url})


def _crc32c(path: Path) -> str:
    return base64.b64encode(google_crc32c.value(path.read_bytes()).to_bytes(4, "big")).decode()


def _schema(columns: dict[str, str]) -> dict:
    # BigQuery's REST schema spells INT64/FLOAT64/BOOL the legacy way.
    legacy = {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN"}
    return {"fields": [{"name": n, "type": legacy.get(t, t), "mode": "NULLABLE"} for n, t in columns.items()]}


class FakeBigQuery:
    """Answers jobs.insert like BigQuery: dry runs with a schema, the export by writing the Parquet files
    where the artifact's gs:// folder is mounted (``mount``), as the /gcs/ FUSE mount shows them on Vertex."""

    def __init__(self, server: RecordingServer, schema: dict, mount: Path, files: list[Path],
                 table_schema: dict | None = None) -> None:
        self.schema, self.mount, self.files = schema, mount, files
        server.route("POST", JOBS, self.insert)
        server.route("GET", TABLE_PATH, {
            "tableReference": {"projectId": "ctloop-dev", "datasetId": "ctloop", "tableId": "events"},
            "schema": table_schema or schema})
        server.route("GET", r"/bigquery/v2/projects/ctloop-dev/queries/.+", self.results)
        server.route("GET", OBJECTS, self.list_objects)

    def list_objects(self, req: RecordedRequest) -> tuple[int, dict]:
        """Cloud Storage's objects.list over what the export wrote, with the hashes GCS keeps per object."""
        prefix = req.query["prefix"][0]
        files = sorted(self.mount.glob("*.parquet")) if prefix == OUTPUT_PREFIX and self.mount.is_dir() else []
        return 200, {"kind": "storage#objects", "items": [
            {"name": prefix + f.name, "size": str(f.stat().st_size), "crc32c": _crc32c(f)} for f in files]}

    def results(self, req: RecordedRequest) -> tuple[int, dict]:
        job_id = req.path.rsplit("/", 1)[1]
        return 200, {"jobReference": {"projectId": "ctloop-dev", "jobId": job_id}, "jobComplete": True,
                     "totalRows": "0"}

    def insert(self, req: RecordedRequest) -> tuple[int, dict]:
        body = req.json
        done = {"jobReference": body["jobReference"], "configuration": body["configuration"],
                "status": {"state": "DONE"}}
        if body["configuration"].get("dryRun"):
            return 200, {**done, "statistics": {"query": {"schema": self.schema}}}
        self.mount.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(self.files):
            shutil.copy(f, self.mount / f"part-{i:012d}.parquet")
        return 200, done


def _inserts(server: RecordingServer, dry: bool) -> list[dict]:
    return [r.json for r in server.find("POST", JOBS) if bool(r.json["configuration"].get("dryRun")) == dry]


def test_cloud_exports_with_a_deterministic_job(workdir: Path, local_result: tuple, tmp_path: Path,
                                                recording_server: RecordingServer):
    expected, local_out = local_result
    mount = tmp_path / "gcs" / "dataset"
    FakeBigQuery(recording_server, _schema(expected.columns), mount, sorted(local_out.glob("*.parquet")))
    s = _settings(workdir, backend="cloud")
    result = run_extract(s, run_id="run-7", output_path=str(mount), output_uri=OUTPUT_URI,
                         snapshot_time=SNAPSHOT, bq_client=_client(recording_server),
                         storage_client=_gcs(recording_server))

    (table_get,) = recording_server.find("GET", TABLE_PATH)  # the source schema, checked before any job
    assert recording_server.requests.index(table_get) == 0
    (dry,) = _inserts(recording_server, dry=True)
    assert dry["configuration"]["query"] == {"query": expected.query, "useLegacySql": False}
    (export,) = _inserts(recording_server, dry=False)
    statement = (f"EXPORT DATA OPTIONS (uri = '{OUTPUT_URI}/part-*.parquet', format = 'PARQUET', "
                 f"overwrite = true) AS\n{expected.query}")
    assert export["configuration"]["query"] == {"query": statement, "useLegacySql": False}
    assert export["configuration"]["labels"] == {"app": "ctloop", "env": "dev", "ctloop-run": "run-7",
                                                 "ctloop-step": "extract"}
    job_id = export["jobReference"]["jobId"]
    assert export["jobReference"] == {"jobId": job_id, "projectId": "ctloop-dev", "location": "europe-west4"}
    assert job_id == job_id_for("run-7", statement) == result.job_id
    assert job_id.startswith("ctloop_extract_run-7_")
    # The same rows as the local backend, counted from the Parquet footers; the checksum from the objects' CRC32C
    # and sizes that Cloud Storage lists for the export's folder (tests below: nothing else is read back).
    assert result.row_count == expected.row_count
    (listing,) = recording_server.find("GET", OBJECTS)
    assert listing.query["prefix"] == [OUTPUT_PREFIX]
    assert result.checksum.startswith("sha256:") and result.checksum != expected.checksum
    assert result.columns == expected.columns and result.engine_query == statement
    assert result.files == ["part-000000000000.parquet"] and result.backend == "cloud"


def test_cloud_retry_reuses_the_existing_job_on_conflict(workdir: Path, local_result: tuple, tmp_path: Path,
                                                         recording_server: RecordingServer):
    expected, local_out = local_result
    mount = tmp_path / "gcs" / "dataset"
    parts = sorted(local_out.glob("*.parquet"))
    fake = FakeBigQuery(recording_server, _schema(expected.columns), mount, parts)
    s = _settings(workdir, backend="cloud")
    first = run_extract(s, run_id="run-7", output_path=str(mount), output_uri=OUTPUT_URI,
                        snapshot_time=SNAPSHOT, bq_client=_client(recording_server),
                         storage_client=_gcs(recording_server))

    def conflict(req: RecordedRequest) -> tuple[int, dict]:
        if req.json["configuration"].get("dryRun"):
            return fake.insert(req)
        message = f"Already Exists: Job ctloop-dev:europe-west4.{first.job_id}"
        return 409, {"error": {"code": 409, "message": message}}

    recording_server.route("POST", JOBS, conflict)
    recording_server.route("GET", rf"{JOBS}/{first.job_id}", {
        "jobReference": {"projectId": "ctloop-dev", "jobId": first.job_id, "location": "europe-west4"},
        "configuration": {"query": {"query": first.engine_query}}, "status": {"state": "DONE"}})
    again = run_extract(s, run_id="run-7", output_path=str(mount), output_uri=OUTPUT_URI,
                        snapshot_time=SNAPSHOT, bq_client=_client(recording_server),
                         storage_client=_gcs(recording_server))
    exports = _inserts(recording_server, dry=False)
    assert [e["jobReference"]["jobId"] for e in exports] == [first.job_id, first.job_id]
    (get,) = recording_server.find("GET", rf"{JOBS}/{first.job_id}")
    assert get.query["location"] == ["europe-west4"]
    assert again.job_id == first.job_id and again.checksum == first.checksum


def test_cloud_validates_the_dry_run_schema_before_exporting(workdir: Path, local_result: tuple,
                                                             tmp_path: Path,
                                                             recording_server: RecordingServer):
    expected, _ = local_result
    mount = tmp_path / "gcs" / "dataset"
    # The table is fine, but the query's result is not (a custom query_file could do this).
    FakeBigQuery(recording_server, _schema({**expected.columns, "churned": "FLOAT64"}), mount, [],
                 table_schema=_schema(expected.columns))
    with pytest.raises(DataValidationError, match=r"'churned' has type FLOAT64; expected INT64 or BOOL"):
        run_extract(_settings(workdir, backend="cloud"), run_id="run-7", output_path=str(mount),
                    output_uri=OUTPUT_URI, snapshot_time=SNAPSHOT, bq_client=_client(recording_server),
                         storage_client=_gcs(recording_server))
    assert len(_inserts(recording_server, dry=True)) == 1
    assert _inserts(recording_server, dry=False) == [] and not mount.exists()


def test_cloud_checks_the_source_timestamp_before_any_job(workdir: Path, local_result: tuple, tmp_path: Path,
                                                          recording_server: RecordingServer):
    expected, _ = local_result
    FakeBigQuery(recording_server, _schema({**expected.columns, "event_ts": "STRING"}), tmp_path / "gcs", [])
    with pytest.raises(DataValidationError) as err:
        run_extract(_settings(workdir, backend="cloud"), run_id="run-7", output_path=str(tmp_path / "gcs"),
                    output_uri=OUTPUT_URI, snapshot_time=SNAPSHOT, bq_client=_client(recording_server),
                         storage_client=_gcs(recording_server))
    assert str(err.value) == f"{TABLE}: column 'event_ts' has type STRING; expected TIMESTAMP"
    assert len(recording_server.find("GET", TABLE_PATH)) == 1 and recording_server.find("POST", JOBS) == []


def test_cloud_removes_an_export_with_too_few_rows(workdir: Path, local_result: tuple, tmp_path: Path,
                                                   recording_server: RecordingServer):
    expected, _ = local_result
    few = tmp_path / "few.parquet"
    pq.write_table(pq.read_table(next(local_result[1].glob("*.parquet"))).slice(0, 5), few)
    mount = tmp_path / "gcs" / "dataset"
    FakeBigQuery(recording_server, _schema(expected.columns), mount, [few])
    with pytest.raises(DataValidationError, match=r"returned 5 rows; expected at least 100"):
        run_extract(_settings(workdir, backend="cloud"), run_id="run-7", output_path=str(mount),
                    output_uri=OUTPUT_URI, snapshot_time=SNAPSHOT, bq_client=_client(recording_server),
                         storage_client=_gcs(recording_server))
    assert len(_inserts(recording_server, dry=False)) == 1 and not mount.exists()


def test_cloud_export_without_visible_files_is_an_error(workdir: Path, local_result: tuple, tmp_path: Path,
                                                       recording_server: RecordingServer):
    expected, _ = local_result
    FakeBigQuery(recording_server, _schema(expected.columns), tmp_path / "elsewhere", [])
    message = (r"export job ctloop_extract_run-7_\w+ finished but no Parquet files are visible at "
               r".*gcs/dataset \(expected the mount of gs://")
    with pytest.raises(CtloopError, match=message):
        run_extract(_settings(workdir, backend="cloud"), run_id="run-7",
                    output_path=str(tmp_path / "gcs" / "dataset"), output_uri=OUTPUT_URI,
                    snapshot_time=SNAPSHOT, bq_client=_client(recording_server),
                         storage_client=_gcs(recording_server))


def test_cloud_job_errors_surface(workdir: Path, local_result: tuple, tmp_path: Path,
                                  recording_server: RecordingServer):
    expected, _ = local_result
    fake = FakeBigQuery(recording_server, _schema(expected.columns), tmp_path / "gcs", [])

    def failing(req: RecordedRequest) -> tuple[int, dict]:
        status, body = fake.insert(req)
        if not req.json["configuration"].get("dryRun"):
            body["status"] = {"state": "DONE", "errorResult": {"reason": "invalidQuery",
                                                               "message": "Access Denied: bucket"}}
        return status, body

    recording_server.route("POST", JOBS, failing)
    with pytest.raises(BadRequest, match="Access Denied: bucket"):
        run_extract(_settings(workdir, backend="cloud"), run_id="run-7", output_path=str(tmp_path / "gcs"),
                    output_uri=OUTPUT_URI, snapshot_time=SNAPSHOT, bq_client=_client(recording_server),
                         storage_client=_gcs(recording_server))


@pytest.mark.parametrize("uri", ["/tmp/local/dataset", "gs://bucket/it's", "s3://bucket/x", "gs://B/x"])
def test_export_needs_a_plain_gcs_folder(uri: str):
    with pytest.raises(CtloopError, match="expected a gs:// folder of plain characters as output URI"):
        export_statement("SELECT 1", uri)


def test_job_ids_are_deterministic_and_valid():
    a = job_id_for("run 7/ä", "SELECT 1")
    assert a == job_id_for("run 7/ä", "SELECT 1")
    assert a != job_id_for("run 7/ä", "SELECT 2") and a != job_id_for("run_7/ä", "SELECT 1")
    assert a.startswith("ctloop_extract_run_7__") and len(a) <= 1024
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in a)


def test_a_failed_export_is_retried_under_a_new_job_id(workdir: Path, local_result: tuple, tmp_path: Path,
                                                        recording_server: RecordingServer):
    """The step reruns after a transient export failure: the failed job is found (409) and not waited on again;
    the next attempt gets its own id and succeeds."""
    from ctloop.steps import run_step, transient_retry

    expected, local_out = local_result
    mount = tmp_path / "gcs" / "dataset"
    fake = FakeBigQuery(recording_server, _schema(expected.columns), mount, sorted(local_out.glob("*.parquet")))
    jobs: dict[str, dict] = {}

    def insert(req: RecordedRequest) -> tuple[int, dict]:
        if req.json["configuration"].get("dryRun"):
            return fake.insert(req)
        job_id = req.json["jobReference"]["jobId"]
        if job_id in jobs:
            return 409, {"error": {"code": 409, "message": f"Already Exists: Job ctloop-dev:europe-west4.{job_id}"}}
        status, body = fake.insert(req)
        if not jobs:  # the first export fails in BigQuery's backend
            body["status"] = {"state": "DONE", "errorResult": {"reason": "backendError", "message": "try again"}}
        jobs[job_id] = body
        return status, body

    recording_server.route("POST", JOBS, insert)
    recording_server.route("GET", rf"{JOBS}/[\w-]+", lambda req: (200, jobs[req.path.rsplit("/", 1)[1]]))
    s = _settings(workdir, backend="cloud")
    result = run_step(run_extract, s, run_id="run-7", output_path=str(mount), output_uri=OUTPUT_URI,
                      snapshot_time=SNAPSHOT, bq_client=_client(recording_server),
                         storage_client=_gcs(recording_server),
                      retry=transient_retry(deadline_s=30.0, initial_s=0.01))

    first = job_id_for("run-7", result.engine_query)
    second = job_id_for("run-7", result.engine_query, attempt=2)
    assert second == first + "-a2" and result.job_id == second
    assert [e["jobReference"]["jobId"] for e in _inserts(recording_server, dry=False)] == [first, first, second]
    (get,) = recording_server.find("GET", rf"{JOBS}/{first}")  # found failed on the rerun: next attempt
    assert get.query["location"] == ["europe-west4"]
    assert result.row_count == expected.row_count


def test_the_cloud_summary_reads_only_metadata(local_result: tuple, tmp_path: Path,
                                               recording_server: RecordingServer):
    """Row counts from the footers, checksum from the object hashes: an export whose data pages are unreadable
    still summarizes (so they were not read), and changed content changes the checksum."""
    from components.extract import summarize_export

    expected, local_out = local_result
    mount = tmp_path / "gcs" / "dataset"
    fake = FakeBigQuery(recording_server, _schema(expected.columns), mount, sorted(local_out.glob("*.parquet")))
    fake.insert(RecordedRequest("POST", JOBS, {}, {}, b'{"jobReference": {}, "configuration": {}}'))
    before = summarize_export(_gcs(recording_server), OUTPUT_URI, mount, expected.columns)
    assert before.rows == expected.row_count and before.files == ["part-000000000000.parquet"]

    part = mount / before.files[0]
    data = bytearray(part.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4:len(data) - footer - 8] = bytes(len(data) - footer - 12)  # zero every data page, keep the footer
    part.write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017 - the full read of the local backend cannot read it any more
        summarize_parquet(mount)
    after = summarize_export(_gcs(recording_server), OUTPUT_URI, mount, expected.columns)
    assert after.rows == before.rows and after.checksum != before.checksum
    assert summarize_export(_gcs(recording_server), OUTPUT_URI, mount, expected.columns) == after
