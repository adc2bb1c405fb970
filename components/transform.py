"""transform: the extract's Parquet -> train / valid / test Datasets + a data-quality report.

One PySpark job (``components/spark/transform_job.py``) does the work on both backends:
- local: in a local Spark session, into a staging dir that is renamed onto the outputs only on success;
- cloud: as a Dataproc Serverless batch whose id derives from the run id (a retried step finds its batch).

Besides the three splits, the step keeps the quarantined rows and the job's JSON report next to the split
outputs (``<task dir>/quarantine/`` and ``<task dir>/transform_report.json``).
"""

import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp.dsl import Dataset, Input, Markdown, Output

# The component's executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its
# compile-time half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

# The Dataproc client and the report renderer live in their own modules; the step's public surface (the job
# file, batch ids, waiting on a batch) stays importable from here.
from components.dataproc import JOB_FILE as JOB_FILE
from components.dataproc import DataprocBatchError, build_batch, submit_batch, upload_job_file
from components.dataproc import batch_id_for as batch_id_for
from components.dataproc import wait_for_batch as wait_for_batch
from components.images import COMPONENT_IMAGE
from components.transform_report import QUARANTINE_DIR, REPORT_JSON, SPLITS, render_report
from ctloop.config import Settings
from ctloop.errors import DataValidationError
from ctloop.features import DERIVED_NAMES, FeatureSpec, feature_roles, resolve_feature_spec
from ctloop.parquet_files import parquet_files

if TYPE_CHECKING:
    from google.cloud import storage
    from google.cloud.dataproc_v1 import BatchControllerClient
    from pyspark.sql import SparkSession


# Upstream (extract) lineage the splits carry on, so train can cite it without walking the graph.
_CARRIED_LINEAGE = ("git_sha", "source_table", "snapshot_time")


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def transform(
    config: dict,
    run_id: str,
    dataset: Input[Dataset],
    train: Output[Dataset],
    valid: Output[Dataset],
    test: Output[Dataset],
    report: Output[Markdown],
):
    """Clean, deduplicate, quarantine, add point-in-time history features and split by time."""
    from components.transform import run_transform_step
    from ctloop.steps import run_step

    run_step(run_transform_step, config, run_id, dataset, train, valid, test, report)


@dataclass(frozen=True)
class TransformResult:
    spec: FeatureSpec
    report: dict[str, Any]  # the job's JSON report (transform_job.build_report)
    markdown: str
    batch_name: str | None = None  # the Dataproc batch (cloud backend)

    def split_metadata(self, split: str) -> dict[str, Any]:
        """Lineage for one split's Dataset artifact."""
        s = self.report["splits"][split]
        return {
            "split": split,
            "row_count": s["rows"],
            "positive_rate": s["positive_rate"],
            "ts_min": s["ts_min"],
            "ts_max": s["ts_max"],
            "feature_spec": json.loads(self.spec.to_json()),
            "columns": self.report["columns"],
            **({"dataproc_batch": self.batch_name} if self.batch_name else {}),
        }

    def report_metadata(self) -> dict[str, Any]:
        r = self.report
        return {
            "input_rows": r["input_rows"],
            "output_rows": r["output_rows"],
            "duplicates_dropped": r["duplicates_dropped"],
            "quarantined": r["quarantined"]["rows"],
            "quarantined_by_reason": r["quarantined"]["by_reason"],
            "rows_per_split": {s: r["splits"][s]["rows"] for s in SPLITS},
            "cut_points": r["cut_points"],
        }


def run_transform_step(config: dict, run_id: str, dataset: Any, train: Any, valid: Any, test: Any,
                       report: Any) -> TransformResult:
    """The component body: settings from the parameter, artifacts' paths and URIs in, lineage out."""
    settings = Settings.from_param(config)
    result = run_transform(
        settings, run_id=run_id, input_path=dataset.path, input_uri=dataset.uri,
        train_path=train.path, valid_path=valid.path, test_path=test.path,
        train_uri=train.uri, valid_uri=valid.uri, test_uri=test.uri, report_path=report.path,
    )
    upstream = dict(dataset.metadata or {})
    lineage = {"run_id": run_id, "source": dataset.uri}
    lineage.update({k: upstream[k] for k in _CARRIED_LINEAGE if k in upstream})
    if "checksum" in upstream:
        lineage["source_checksum"] = upstream["checksum"]
    for split, artifact in zip(SPLITS, (train, valid, test), strict=True):
        artifact.metadata.update(result.split_metadata(split))
        artifact.metadata.update(lineage)
    report.metadata.update(result.report_metadata())
    report.metadata["run_id"] = run_id
    return result


def run_transform(
    settings: Settings,
    *,
    run_id: str,
    input_path: str,
    input_uri: str,
    train_path: str,
    valid_path: str,
    test_path: str,
    train_uri: str,
    valid_uri: str,
    test_uri: str,
    report_path: str,
    spark: "SparkSession | None" = None,
    batch_client: "BatchControllerClient | None" = None,
    storage_client: "storage.Client | None" = None,
    poll_seconds: float = 15.0,
    timeout_seconds: float = 6 * 3600.0,
) -> TransformResult:
    """Run the transform job on ``settings.backend`` and write the splits, their feature spec and the report.

    ``spark`` (local) lets a caller share its session; otherwise one is started and stopped here.
    ``batch_client``/``storage_client`` (cloud) default to clients for ``settings.gcp``.
    """
    column_types = read_column_types(input_path)
    _check_role_columns(settings, column_types, input_path)
    try:
        spec = resolve_feature_spec(settings, column_types)
    except ValueError as e:
        raise DataValidationError(f"input {input_path}: {e}") from e
    non_negative = _non_negative(settings, spec)
    paths = dict(zip(SPLITS, (train_path, valid_path, test_path), strict=True))
    if settings.backend == "local":
        report = _run_local(settings, spec, non_negative, input_path, paths, report_path, spark)
        batch_name = None
    else:
        uris = dict(zip(SPLITS, (train_uri, valid_uri, test_uri), strict=True))
        batch_name, report = _run_cloud(settings, spec, non_negative, run_id, input_uri, paths, uris,
                                        batch_client, storage_client, poll_seconds, timeout_seconds)
        for split in SPLITS:
            Path(paths[split]).mkdir(parents=True, exist_ok=True)
            spec.write(paths[split])
    markdown = render_report(report, spec, run_id, feature_roles(spec, settings))
    _write_file(Path(report_path), markdown)
    return TransformResult(spec=spec, report=report, markdown=markdown, batch_name=batch_name)


def read_column_types(input_path: str) -> dict[str, str]:
    """Column name -> Arrow type name of the extract's Parquet files (one footer, no data read).

    ``pyarrow.parquet`` rather than ``pyarrow.dataset``, which imports pandas: the step does not need it.
    The extract writes one schema, so the first file's footer speaks for all (as a dataset's schema would).
    """
    import pyarrow.parquet as pq

    root = Path(input_path)
    files = [str(p) for p in parquet_files(root)] if root.is_dir() else []
    if not files:
        raise DataValidationError(f"input {input_path}: no *.parquet files; "
                                  "expected the extract's Dataset directory")
    types: dict[str, str] = {}
    for f in pq.read_schema(files[0]):
        t = f.type
        types[f.name] = str(getattr(t, "value_type", t))  # dictionary-encoded strings read as their values
    return types


def job_args(spec: FeatureSpec, non_negative: list[str], settings: Settings, *, input_uri: str,
             outputs: dict[str, str], quarantine: str, report: str) -> list[str]:
    """The job's command line (the same on both backends)."""
    args = ["--input", input_uri]
    for split in SPLITS:
        args += [f"--{split}-out", outputs[split]]
    args += [
        "--quarantine-out", quarantine,
        "--report-out", report,
        "--spec", spec.to_json(),
        "--feature-names", json.dumps(DERIVED_NAMES),
        "--valid-fraction", repr(settings.data.valid_fraction),
        "--test-fraction", repr(settings.data.test_fraction),
        "--non-negative", json.dumps(non_negative),
    ]
    return args


def _run_local(settings: Settings, spec: FeatureSpec, non_negative: list[str], input_path: str,
               paths: dict[str, str], report_path: str, spark: "SparkSession | None") -> dict[str, Any]:
    from ctloop.spark_service import run_spark_job

    task_dir = Path(paths["train"]).parent
    task_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".transform-", dir=task_dir))
    try:
        outputs = {split: str(staging / split) for split in SPLITS}
        argv = job_args(spec, non_negative, settings, input_uri=str(Path(input_path).resolve()),
                        outputs=outputs, quarantine=str(staging / QUARANTINE_DIR),
                        report=str(staging / REPORT_JSON))
        report = run_spark_job(settings, JOB_FILE, argv, name="ctloop-transform", spark=spark,
                               input_path=input_path)
        for split in SPLITS:
            spec.write(outputs[split])
        # Publish only now: every output is complete in staging.
        for split in SPLITS:
            _replace(staging / split, Path(paths[split]))
        _replace(staging / QUARANTINE_DIR, task_dir / QUARANTINE_DIR)
        _replace(staging / REPORT_JSON, task_dir / REPORT_JSON)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _run_cloud(settings: Settings, spec: FeatureSpec, non_negative: list[str], run_id: str, input_uri: str,
               paths: dict[str, str], uris: dict[str, str], batch_client: "BatchControllerClient | None",
               storage_client: "storage.Client | None", poll_seconds: float,
               timeout_seconds: float) -> tuple[str, dict[str, Any]]:
    gcp = settings.gcp
    if batch_client is None:
        from google.cloud import dataproc_v1

        # Dataproc batches are served by the regional endpoint only.
        batch_client = dataproc_v1.BatchControllerClient(
            client_options={"api_endpoint": f"{gcp.region}-dataproc.googleapis.com:443"})
    if storage_client is None:
        from google.cloud import storage

        storage_client = storage.Client(project=gcp.project)
    for name, uri in [("input", input_uri), *uris.items()]:
        if not uri.startswith("gs://"):
            raise ValueError(f"cloud transform: the {name} artifact URI must be gs://..., found {uri!r}")
    task_uri = posixpath.dirname(uris["train"].rstrip("/"))
    main_uri = upload_job_file(storage_client, gcp.staging_bucket)
    args = job_args(spec, non_negative, settings, input_uri=input_uri, outputs=uris,
                    quarantine=f"{task_uri}/{QUARANTINE_DIR}", report=f"{task_uri}/{REPORT_JSON}")
    batch = build_batch(settings, run_id, main_uri, args)
    parent = f"projects/{gcp.project}/locations/{gcp.region}"
    done = submit_batch(batch_client, parent, batch, run_id, poll_seconds, timeout_seconds)
    # The batch wrote the report to GCS; the component reads it through the /gcs/ mount of the task dir.
    report_file = Path(paths["train"]).parent / REPORT_JSON
    if not report_file.is_file():
        raise DataprocBatchError(f"Dataproc batch {done.name} succeeded but {report_file} "
                                 f"({task_uri}/{REPORT_JSON}) does not exist")
    return done.name, json.loads(report_file.read_text())


def _check_role_columns(settings: Settings, column_types: dict[str, str], input_path: str) -> None:
    roles = settings.columns.role_columns
    missing = [c for c in roles if c not in column_types]
    if missing:
        fields = ["columns.id_column", "columns.timestamp_column", "columns.label_column"]
        named = [f"{f}={c!r}" for f, c in zip(fields, roles, strict=True) if c in missing]
        raise DataValidationError(f"input {input_path}: missing column(s) {missing} ({', '.join(named)}); "
                          f"found columns {sorted(column_types)}")


def _non_negative(settings: Settings, spec: FeatureSpec) -> list[str]:
    configured = settings.columns.non_negative
    if configured is None:
        return list(spec.numeric)
    unknown = [c for c in configured if c not in spec.numeric]
    if unknown:
        raise ValueError(f"columns.non_negative: {unknown} are not numeric features; "
                         f"the numeric features are {spec.numeric}")
    return list(configured)


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst``, replacing what a previous attempt left there."""
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _write_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
