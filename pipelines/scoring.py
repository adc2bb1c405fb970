"""The scoring pipeline: the registry's champion (or a given version) scores every entity's latest row.

Steps, in order:
  1. collect_scoring_rows  the extract SQL (BigQuery / DuckDB) over the scoring window ending at the run's
                           snapshot time, or the landed batch ``input_uri`` ("score this") -> Dataset
  2. score_batch           the score job (Dataproc Serverless / local Spark): training's features, the model's
                           predict_proba -> scores Dataset, the destination (BigQuery / Parquet), HTML report

It runs on a schedule (terraform/scoring.tf: Cloud Scheduler -> the trigger function), for each batch that lands
under the landing bucket's score prefix (the same function), or from ``ctloop score``.
"""


import shutil
from collections.abc import Callable
from pathlib import Path

from kfp import dsl

from components.score import collect_scoring_rows, score_batch
from ctloop.config import Settings
from ctloop.launching import JOB_PREFIXES, pipeline_parameters
from pipelines.local_run import RunRecord, new_run_id, run_local

PIPELINE_NAME = "ctloop-scoring"



@dsl.pipeline(name=PIPELINE_NAME, description="Batch scoring: the champion scores every entity's latest row.")
def scoring_pipeline(config: dict, run_id: str, snapshot_time: str = "", trigger_uri: str = "",
                     model_version: str = "", input_uri: str = ""):
    # Both steps read moving state (new rows, the current champion) and write the destination: never cached.
    # No step-level retries: steps retry transient API errors themselves (ctloop/steps.py).
    rows = collect_scoring_rows(config=config, run_id=run_id, snapshot_time=snapshot_time, input_uri=input_uri)
    rows.set_display_name("collect-rows-bigquery").set_caching_options(False)

    scored = score_batch(config=config, run_id=run_id, rows=rows.outputs["rows"],
                         model_version=model_version, snapshot_time=snapshot_time)
    scored.set_display_name("score-dataproc-pyspark").set_caching_options(False)


def run_scoring_local(
    settings: Settings,
    *,
    run_id: str | None,
    snapshot_time: str = "",
    model_version: str = "",
    trigger_uri: str = "",
    input_uri: str = "",
    echo: Callable[[str], None] = print,
) -> tuple[int, RunRecord]:
    """Run the scoring pipeline with the KFP local runner; prints counts, the destination and the report path.
    ``input_uri``: a landed batch (folder or file) to score instead of the settings' scoring window.

    Returns (exit code, run record).
    """
    run_id = run_id or new_run_id(JOB_PREFIXES["scoring"])
    version = model_version or settings.scoring.model_version
    echo(f"ctloop score {run_id} (local: DuckDB, Spark {settings.local.spark_master}; model {version})")
    arguments = {**pipeline_parameters(settings, run_id, snapshot_time, trigger_uri), "model_version": model_version,
                 "input_uri": input_uri}
    record = run_local(scoring_pipeline, settings, run_id=run_id, arguments=arguments, echo=echo, uses_spark=True)
    keep_report(record, settings.local.runs_dir / run_id)
    echo_summary(record, echo)
    if record.status != "SUCCEEDED":
        echo(f"error: {record.error}")
        return 1, record
    return 0, record


def keep_report(record: RunRecord, run_dir: Path) -> None:
    """Copy the step's HTML report next to the run record and name it there (as training runs do)."""
    source = Path(record.artifact("score-batch", "report").get("uri") or "")
    if record.report_path or not source.is_file():
        return
    target = run_dir / "report.html"
    shutil.copyfile(source, target)
    record.report_path = str(target)
    (run_dir / "run.json").write_text(record.to_json())


def echo_summary(record: RunRecord, echo: Callable[[str], None]) -> None:
    echo(f"status: {record.status} in {record.seconds:.1f}s")
    meta = record.artifact("score-batch", "scores").get("metadata", {})
    if meta:
        ref = meta.get("reference") or {}
        echo(f"rows: {meta['input_rows']} read, {meta['scored_rows']} entities scored by model version "
             f"{meta['model_version']}; mean probability {meta['mean_probability']:.4f}"
             + (f" (test split: {ref['mean_probability']:.4f})" if ref.get("mean_probability") is not None else ""))
        echo(f"scores: {meta['destination']}")
    if record.report_path:
        echo(f"report: {record.report_path}")
