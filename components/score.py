"""Batch scoring steps: the rows to score, then one scored row per entity written to the destination.

``collect_scoring_rows``: the extract step's own code and SQL (BigQuery export in the cloud, DuckDB over the
landing Parquet locally) over the ``scoring.window_days`` before the scoring time; or, for a run over a landed
batch (``input_uri``, "score this"), that batch's Parquet files, copied into the step's output.

``score_batch``: resolves the model (``scoring.model_version``: an alias such as ``champion`` or a version
number), runs ``components/spark/score_job.py`` (local Spark here, a Dataproc Serverless batch in the cloud)
and writes the scores where the business reads them: Parquet under ``scoring.output_dir`` locally, the
BigQuery table ``scoring.bq_table`` in the cloud. Idempotent per (run id, model version): a rerun replaces
its own rows (local: the folder ``run_id=<run>/model_version=<v>``; BigQuery: one transaction deletes and
inserts the pair's rows), never appends a second copy.
"""

import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kfp.dsl import HTML, Dataset, Input, Output

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.errors import CtloopError
from ctloop.features import DERIVED_NAMES
from ctloop.parquet_files import is_data_file, parquet_files
from ctloop.sql import parse_timestamp

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from components.extract import ParquetSummary

STEP = "score"
JOB_FILE = Path(__file__).parent / "spark" / "score_job.py"
REPORT_JSON = "score_report.json"
BQ_TIMEOUT_S = 3600.0


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def collect_scoring_rows(
    config: dict, run_id: str, rows: Output[Dataset], snapshot_time: str = "", input_uri: str = ""
) -> NamedTuple("Outputs", [("row_count", int)]):
    """The rows to score (the extract SQL over the scoring window, or the batch at ``input_uri``) as Parquet."""
    from components.score import collect_rows_to_artifact
    from ctloop.steps import run_step

    return run_step(collect_rows_to_artifact, config, run_id, snapshot_time, rows, input_uri)


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def score_batch(
    config: dict, run_id: str, rows: Input[Dataset], scores: Output[Dataset], report: Output[HTML],
    model_version: str = "", snapshot_time: str = "",
) -> NamedTuple("Outputs", [("scored_rows", int), ("model_version", str), ("destination", str)]):
    """Score each entity's latest row with the model; write the scores to the destination."""
    from components.score import score_to_artifacts
    from ctloop.steps import run_step

    return run_step(score_to_artifacts, config, run_id, rows, scores, report, model_version, snapshot_time)


# ---- the rows ---------------------------------------------------------------------------------------------

def scoring_time(snapshot_time: str | None) -> datetime:
    """The instant the scores are as of: the run's snapshot time, else now."""
    try:
        return parse_timestamp(snapshot_time) if snapshot_time else datetime.now(UTC).replace(microsecond=0)
    except (TypeError, ValueError) as exc:
        raise CtloopError(f"score: snapshot_time: {exc}") from exc


def extract_settings(settings: Settings, as_of: datetime) -> Settings:
    """The settings the extract runs with for the scoring rows: its window ends at the scoring time."""
    sc = settings.scoring
    overrides: dict[str, Any] = {"data.window_end": as_of.isoformat(),
                                 "data.window_days": sc.window_days or settings.data.window_days}
    if sc.source_table:
        overrides["data.bq_table"] = sc.source_table
    if sc.query_file:
        overrides["data.query_file"] = sc.query_file
    return settings.with_overrides(overrides)


def collect_rows(settings: Settings, *, run_id: str, output_path: str, output_uri: str,
                 snapshot_time: str | None = None, bq_client: Any = None) -> Any:
    """Run the extract (components.extract.run_extract) for the scoring window into ``output_path``."""
    from components.extract import run_extract

    as_of = scoring_time(snapshot_time)
    return run_extract(extract_settings(settings, as_of), run_id=run_id, output_path=output_path,
                       output_uri=output_uri, snapshot_time=as_of.isoformat(), bq_client=bq_client)


def collect_batch(settings: Settings, *, input_uri: str, output_path: str, output_uri: str,
                  storage_client: Any = None) -> "ParquetSummary":
    """The Parquet data files of one landed batch (a folder or one file) as the rows to score, copied into the
    step's output (in Cloud Storage, server side), so the run keeps its input whatever lands there later."""
    from components.extract import _move_into_place, summarize_export, summarize_parquet

    if settings.backend == "local":
        if "://" in input_uri and not input_uri.startswith("file://"):
            raise CtloopError(f"score: input {input_uri!r}: the local backend reads a local folder or file "
                              "(the trigger's mirror_dir holds the landed batches)")
        source = Path(input_uri.removeprefix("file://"))
        if not source.exists():
            raise CtloopError(f"score: input {source}: no such folder or file")
        files = [source] if source.is_file() else parquet_files(source, recursive=True)
        if not files or not is_data_file(files[0].name):
            raise CtloopError(f"score: input {source}: expected Parquet data files (*.parquet), found none")
        output = Path(output_path)
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".batch-", dir=output.parent))
        for i, file in enumerate(files):
            shutil.copyfile(file, staging / f"part-{i:05d}.parquet")
        _move_into_place(staging, output)
        return summarize_parquet(output)
    if not input_uri.startswith("gs://") or not output_uri.startswith("gs://"):
        raise CtloopError(f"score (cloud): the input and rows URIs must be gs://..., found {input_uri!r} and "
                          f"{output_uri!r}")
    if storage_client is None:
        from google.cloud import storage

        storage_client = storage.Client(project=settings.gcp.project)
    src_bucket, _, src_prefix = input_uri.removeprefix("gs://").partition("/")
    dst_bucket, _, dst_prefix = output_uri.removeprefix("gs://").partition("/")
    blobs = sorted((b for b in storage_client.list_blobs(src_bucket, prefix=src_prefix)
                    if is_data_file(b.name[len(src_prefix):] or b.name.rpartition("/")[2])), key=lambda b: b.name)
    if not blobs:
        raise CtloopError(f"score: input {input_uri}: expected Parquet data files (*.parquet), found none")
    target = storage_client.bucket(dst_bucket)
    for i, blob in enumerate(blobs):
        copy = target.blob(f"{dst_prefix.rstrip('/')}/part-{i:05d}.parquet")
        token, _, _ = copy.rewrite(blob)  # server side; large objects take several calls
        while token is not None:
            token, _, _ = copy.rewrite(blob, token=token)
    summary = summarize_export(storage_client, output_uri, Path(output_path), {})
    if not summary.checksum:
        raise CtloopError(f"score: copied {len(blobs)} file(s) of {input_uri} to {output_uri}, but "
                          f"{output_path} does not show them")
    return summary


def collect_rows_to_artifact(config: dict, run_id: str, snapshot_time: str, rows: Any,
                             input_uri: str = "") -> tuple[int]:
    settings = Settings.from_param(config)
    if input_uri:
        batch = collect_batch(settings, input_uri=input_uri, output_path=rows.path, output_uri=rows.uri)
        rows.metadata.update({"row_count": batch.rows, "source": input_uri, "files": len(batch.files),
                              "checksum": batch.checksum, "run_id": run_id})
        return (batch.rows,)
    result = collect_rows(settings, run_id=run_id, output_path=rows.path, output_uri=rows.uri,
                          snapshot_time=snapshot_time)
    rows.metadata.update({"row_count": result.row_count, "source_table": result.source_table,
                          "window_start": result.window_start, "window_end": result.window_end,
                          "checksum": result.checksum, "run_id": run_id})
    return (result.row_count,)


# ---- the model --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoringModel:
    version: str
    artifact_uri: str


def resolve_model(settings: Settings, ref: str) -> ScoringModel:
    """The registry version ``ref`` names: a version number, or an alias (``champion``)."""
    from ctloop.registry import RegistryError, open_registry

    try:
        version = open_registry(settings).get_version(ref)
    except RegistryError as exc:
        raise CtloopError(f"score: model {settings.model.display_name!r} has no version {ref!r}: {exc}; "
                          f"train a model first (ctloop run) or pass another --model-version") from exc
    return ScoringModel(str(version.version), version.artifact_uri)


def local_path(uri: str) -> Path:
    """``gs://b/p`` -> ``/gcs/b/p`` (the Vertex FUSE mount); ``file://`` and plain paths as they are."""
    from components.evaluate import champion_path

    return Path(champion_path(uri) or "")


# ---- scoring ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoringResult:
    report: dict[str, Any]  # the job's JSON report plus the reference distribution and destination
    destination: str
    model: ScoringModel
    batch_name: str | None = None


def destination_dir(settings: Settings, run_id: str, version: str) -> Path:
    """Local destination of one (run, version): its own folder, replaced whole by a rerun."""
    root = Path(settings.scoring.output_dir) if settings.scoring.output_dir else settings.local.path("scores")
    return root.resolve() / f"run_id={run_id}" / f"model_version={version}"


def destination_table(settings: Settings) -> str:
    return f"{settings.gcp.project}.{settings.data.bq_dataset}.{settings.scoring.bq_table}"


def run_scoring(
    settings: Settings,
    *,
    run_id: str,
    input_path: str,
    input_uri: str,
    scores_path: str,
    scores_uri: str,
    model_version: str = "",
    snapshot_time: str | None = None,
    spark: "SparkSession | None" = None,
    batch_client: Any = None,
    storage_client: Any = None,
    bq_client: Any = None,
    poll_seconds: float = 15.0,
    timeout_seconds: float = 6 * 3600.0,
) -> ScoringResult:
    """Score the rows at ``input_path`` with the model ``model_version`` (default ``scoring.model_version``).

    The scores land in ``scores_path`` (the step's artifact) and at the destination. Reruns with the same run
    id and version replace their own output.
    """
    from components.transform import _non_negative
    from ctloop.scoring import load_scoring_model

    model = resolve_model(settings, model_version or settings.scoring.model_version)
    loaded = load_scoring_model(local_path(model.artifact_uri))
    spec = loaded.spec
    as_of = scoring_time(snapshot_time)

    def argv(input_: str, scores: str, report: str, model_dir: str) -> list[str]:
        return ["--input", input_, "--scores-out", scores, "--report-out", report, "--spec", spec.to_json(),
                "--feature-names", json.dumps(DERIVED_NAMES),
                "--non-negative", json.dumps(_non_negative(settings, spec)), "--model-dir", model_dir,
                "--model-version", model.version, "--run-id", run_id, "--scored-at", as_of.isoformat()]

    scores_dir = Path(scores_path)
    batch_name = None
    if settings.backend == "local":
        report = _run_local(settings, argv, input_path, scores_dir, str(loaded.model_dir), spark)
        destination = publish_local(scores_dir, destination_dir(settings, run_id, model.version))
    else:
        batch_name, report = _run_cloud(settings, argv, run_id, input_uri, scores_dir, scores_uri, model,
                                        batch_client, storage_client, poll_seconds, timeout_seconds)
        destination = load_into_bigquery(settings, run_id=run_id, version=model.version,
                                         scores_uri=scores_uri, client=bq_client)
    report["reference"] = reference_distribution(loaded)
    report["destination"] = destination
    return ScoringResult(report=report, destination=destination, model=model, batch_name=batch_name)


def _run_local(settings: Settings, argv: Any, input_path: str, scores_dir: Path, model_dir: str,
               spark: "SparkSession | None") -> dict[str, Any]:
    from ctloop.spark_service import run_spark_job

    scores_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".score-", dir=scores_dir.parent))
    try:
        job_argv = argv(str(Path(input_path).resolve()), str(staging / "scores"), str(staging / REPORT_JSON),
                        model_dir)
        report = run_spark_job(settings, JOB_FILE, job_argv, name="ctloop-score", spark=spark,
                               input_path=input_path)
        _replace(staging / "scores", scores_dir)
        _replace(staging / REPORT_JSON, scores_dir.parent / REPORT_JSON)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def publish_local(scores_dir: Path, destination: Path) -> str:
    """Put the scores at ``destination`` whole: staged next to it, then renamed over the previous copy."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(scores_dir, staging, ignore=shutil.ignore_patterns(".*", "_*"))
    _replace(staging, destination)
    return str(destination)


def _replace(src: Path, dst: Path) -> None:
    from components.transform import _replace as replace

    replace(src, dst)


def _run_cloud(settings: Settings, argv: Any, run_id: str, input_uri: str, scores_dir: Path, scores_uri: str,
               model: ScoringModel, batch_client: Any, storage_client: Any, poll_seconds: float,
               timeout_seconds: float) -> tuple[str, dict[str, Any]]:
    from components.dataproc import build_batch, submit_batch, upload_job_file

    gcp = settings.gcp
    for name, uri in (("rows", input_uri), ("scores", scores_uri), ("model", model.artifact_uri)):
        if not uri.startswith("gs://"):
            raise CtloopError(f"score (cloud): the {name} URI must be gs://..., found {uri!r}")
    if batch_client is None:
        from google.cloud import dataproc_v1

        batch_client = dataproc_v1.BatchControllerClient(
            client_options={"api_endpoint": f"{gcp.region}-dataproc.googleapis.com:443"})
    if storage_client is None:
        from google.cloud import storage

        storage_client = storage.Client(project=gcp.project)
    main_uri = upload_job_file(storage_client, gcp.staging_bucket, JOB_FILE)
    report_uri = posixpath.join(posixpath.dirname(scores_uri.rstrip("/")), REPORT_JSON)
    batch = build_batch(settings, run_id, main_uri, argv(input_uri, scores_uri, report_uri, model.artifact_uri),
                        step=STEP, container_image=gcp.scoring_image)
    parent = f"projects/{gcp.project}/locations/{gcp.region}"
    done = submit_batch(batch_client, parent, batch, run_id, poll_seconds, timeout_seconds, step=STEP)
    report_file = scores_dir.parent / REPORT_JSON  # the batch wrote it; read through the /gcs/ mount
    if not report_file.is_file():
        raise CtloopError(f"Dataproc batch {done.name} succeeded but {report_file} ({report_uri}) does not exist")
    return done.name, json.loads(report_file.read_text())


def load_statement(settings: Settings, *, run_id: str, version: str, scores_uri: str) -> str:
    """One BigQuery script: create the table if needed, stage the Parquet scores, then in one transaction
    delete the (run id, version) rows and insert the new ones, so a rerun replaces its own output."""
    from ctloop.scoring import OutputColumns

    cols = settings.columns
    table = f"`{destination_table(settings)}`"
    uri = scores_uri.rstrip("/") + "/*.parquet"
    run, ver = quote_string(run_id), quote_string(version)
    names = ", ".join(f"`{c}`" for c in OutputColumns(cols.id_column, cols.timestamp_column).names)
    return f"""CREATE TABLE IF NOT EXISTS {table} (
  `{cols.id_column}` STRING, `{cols.timestamp_column}` TIMESTAMP, probability FLOAT64, label INT64,
  model_version STRING, run_id STRING, scored_at TIMESTAMP)
PARTITION BY DATE(scored_at) CLUSTER BY run_id, model_version;
LOAD DATA INTO TEMP TABLE scored FROM FILES (format = 'PARQUET', uris = [{quote_string(uri)}]);
BEGIN TRANSACTION;
DELETE FROM {table} WHERE run_id = {run} AND model_version = {ver};
INSERT INTO {table} ({names})
SELECT {names}
FROM scored WHERE run_id = {run} AND model_version = {ver};
COMMIT TRANSACTION;"""


def quote_string(value: str) -> str:
    """A BigQuery string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def load_into_bigquery(settings: Settings, *, run_id: str, version: str, scores_uri: str,
                       client: Any = None) -> str:
    """Run ``load_statement`` as one job whose id derives from (run, version, statement): a retried step
    waits on the job that already ran instead of running it twice. Returns the table name."""
    from google.cloud import bigquery

    from components.extract import MAX_EXPORT_ATTEMPTS, job_id_for, job_labels
    from ctloop.steps import start_or_resume

    statement = load_statement(settings, run_id=run_id, version=version, scores_uri=scores_uri)
    client = client or bigquery.Client(project=settings.gcp.project, location=settings.gcp.region)
    config = bigquery.QueryJobConfig(use_legacy_sql=False, labels=job_labels(settings, run_id, step=STEP))
    # A rerun waits on the job that already ran (or runs) under this id; after a failed one, the next attempt.
    _, job = start_or_resume(
        lambda attempt: job_id_for(f"{run_id}-v{version}", statement, step=STEP, attempt=attempt),
        lambda job_id: client.query(statement, job_id=job_id, job_config=config, job_retry=None),
        lambda job_id: client.get_job(job_id, project=settings.gcp.project, location=settings.gcp.region),
        lambda job: job.state == "DONE" and job.error_result is not None, MAX_EXPORT_ATTEMPTS,
        f"run {run_id!r}: BigQuery scores load")
    job.result(timeout=BQ_TIMEOUT_S)
    return destination_table(settings)


# ---- the report -------------------------------------------------------------------------------------------

def reference_distribution(loaded: Any) -> dict[str, Any]:
    """The model's scores on its own test split (the sibling of ``lineage.train_uri`` in the transform's
    outputs), as the histogram the run's scores are compared with; ``{}`` when that split is gone."""
    from ctloop.modeling import read_split
    from ctloop.scoring import histogram

    train_uri = str((loaded.card.data.get("lineage") or {}).get("train_uri") or "")
    if not train_uri:
        return {}
    test_uri = posixpath.join(posixpath.dirname(train_uri.rstrip("/")), "test")
    path = local_path(test_uri)
    if not path.is_dir():
        return {"uri": test_uri, "missing": True}
    frame = read_split(path, loaded.spec, "test")
    proba = loaded.predict_proba(frame)
    return {"uri": test_uri, "rows": len(frame), "histogram": histogram(proba),
            "mean_probability": float(proba.mean()), "positive_rate": float((proba >= loaded.threshold).mean())}


def score_to_artifacts(config: dict, run_id: str, rows: Any, scores: Any, report: Any, model_version: str,
                       snapshot_time: str) -> tuple[int, str, str]:
    """The component body: score, then record counts, distributions and the destination."""
    from components.scoring_report import render_scoring_report

    settings = Settings.from_param(config)
    result = run_scoring(settings, run_id=run_id, input_path=rows.path, input_uri=rows.uri,
                         scores_path=scores.path, scores_uri=scores.uri, model_version=model_version,
                         snapshot_time=snapshot_time)
    r = result.report
    meta = {"scored_rows": r["scored_rows"], "input_rows": r["input_rows"], "positives": r["positives"],
            "mean_probability": r["mean_probability"], "histogram": r["histogram"], "model_version": r["model_version"],
            "model_uri": result.model.artifact_uri, "destination": result.destination, "run_id": run_id,
            "reference": r["reference"], **({"dataproc_batch": result.batch_name} if result.batch_name else {})}
    scores.metadata.update(meta)
    report.metadata.update({"destination": result.destination, "run_id": run_id})
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(report.path).parent, prefix=".report-")
    with os.fdopen(fd, "w") as f:
        f.write(render_scoring_report(run_id, meta))
    os.replace(tmp, report.path)
    return (r["scored_rows"], result.model.version, result.destination)
