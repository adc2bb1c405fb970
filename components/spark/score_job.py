"""The scoring job: rows to score -> the same features as training -> one scored row per entity.

Runs as a Dataproc Serverless batch in the scoring image (components/spark/Dockerfile: ctloop and the model's
libraries, Spark mounted by Dataproc), or on local Spark, and derives the features with the transform job's own
functions, so scoring cannot drift from training:
  1. read, check columns, drop exact duplicates, cast and quarantine (``flag_rows``; the label is not required);
  2. one row per (id, timestamp) (``dedup_id_timestamp``) and the point-in-time history features from strictly
     earlier rows (``add_history``): the rows are those before the scoring time, so each entity's latest row
     sees exactly the history it would have had in training;
  3. keep each entity's latest row and score it with the model (``mapInPandas`` over ``ctloop.scoring``);
  4. write the scores (Parquet) and a JSON report of counts and the score histogram.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from components.spark import transform_job as tj

log = logging.getLogger("ctloop.score_job")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="score_job", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="directory (path or URI) of the rows' Parquet files")
    p.add_argument("--scores-out", required=True, help="output directory of the scored rows")
    p.add_argument("--report-out", required=True, help="JSON report file (path or URI)")
    p.add_argument("--spec", required=True, help="the model's FeatureSpec JSON")
    p.add_argument("--feature-names", required=True,
                   help="JSON: the derived features' names (ctloop.features.DERIVED_NAMES)")
    p.add_argument("--non-negative", required=True, help="JSON list of numeric columns that cannot be negative")
    p.add_argument("--model-dir", required=True, help="model directory (local path, or gs:// on Dataproc)")
    p.add_argument("--model-version", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--scored-at", required=True, help="ISO timestamp recorded on every row")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, spark: SparkSession | None = None) -> dict[str, Any]:
    """Run the job; returns the report it wrote. ``spark`` lets a caller share its session."""
    args = parse_args(argv)
    spec = tj.JobSpec.from_json(args.spec, tj.FeatureNames.from_json(args.feature_names))
    non_negative = json.loads(args.non_negative)
    with tj.job_session(spark, "ctloop-score") as session:
        return _run(session, args, spec, non_negative)


def latest_features(spark: SparkSession, path: str, spec: tj.JobSpec, non_negative: list[str],
                    ) -> tuple[DataFrame, dict[str, int]]:
    """Each entity's latest clean row with its history features, plus the row counts along the way."""
    raw, nanos_as_long = tj.read_input(spark, path)
    if spec.label_column not in raw.columns:  # rows to score may not know their outcome yet
        raw = raw.withColumn(spec.label_column, F.lit(None).cast("int"))
    tj.check_columns(raw, spec, path)
    raw = raw.select(*[tj._col(c) for c in spec.source_columns])
    counts = {"input_rows": raw.count()}
    flagged = tj.flag_rows(raw.dropDuplicates(), spec, non_negative, nanos_as_long, label_required=False)
    clean = flagged.where(F.col(tj.REASON).isNull()).select(
        *[F.col(tj._quote(tj._TYPED + c)).alias(c) for c in spec.source_columns])
    featured = tj.add_history(tj.dedup_id_timestamp(clean, spec), spec)
    newest_first = Window.partitionBy(tj._col(spec.id_column)).orderBy(F.col(tj._TS_US).desc())
    latest = (featured.withColumn("__rank", F.row_number().over(newest_first)).where(F.col("__rank") == 1)
              .select(*[tj._col(c) for c in spec.output_columns]))
    return latest, counts


def _model_path(spark: SparkSession, model_dir: str) -> str:
    """A path every executor can read: a local directory as is, a gs:// one shipped with ``addFile``."""
    if "://" not in model_dir:
        return model_dir
    spark.sparkContext.addFile(model_dir.rstrip("/"), recursive=True)
    return "sparkfiles:" + model_dir.rstrip("/").rsplit("/", 1)[-1]


def _run(spark: SparkSession, args: argparse.Namespace, spec: tj.JobSpec, non_negative: list[str],
         ) -> dict[str, Any]:
    from ctloop.scoring import HISTOGRAM_BINS, LABEL, PROBABILITY, OutputColumns

    latest, counts = latest_features(spark, args.input, spec, non_negative)
    columns = OutputColumns(spec.id_column, spec.timestamp_column)
    schema = T.StructType([
        T.StructField(spec.id_column, T.StringType()), T.StructField(spec.timestamp_column, T.TimestampType()),
        T.StructField(PROBABILITY, T.DoubleType()), T.StructField(LABEL, T.IntegerType()),
        T.StructField("model_version", T.StringType()), T.StructField("run_id", T.StringType()),
        T.StructField("scored_at", T.TimestampType()),
    ])
    model_path = _model_path(spark, args.model_dir)
    version, run_id = args.model_version, args.run_id
    stamp = pd.Timestamp(args.scored_at)
    # Naive UTC: Spark reads naive pandas timestamps in the session time zone, which the job pins to UTC.
    scored_at = (stamp.tz_convert("UTC") if stamp.tzinfo else stamp).tz_localize(None)

    def score_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from pyspark import SparkFiles

        from ctloop.scoring import load_scoring_model, score_frame

        path = SparkFiles.get(model_path.removeprefix("sparkfiles:")) if model_path.startswith("sparkfiles:") \
            else model_path
        model = load_scoring_model(path)  # once per partition, not per batch
        for frame in batches:
            yield score_frame(model, frame, columns, model_version=version, run_id=run_id, scored_at=scored_at)

    scores = latest.mapInPandas(score_batches, schema=schema).persist()
    try:
        rows = scores.count()
        if rows == 0:
            raise ValueError(f"input {args.input}: no valid rows to score (every row was quarantined)")
        files = tj.output_files(rows, spark.sparkContext.defaultParallelism)
        scores.coalesce(files).write.mode("overwrite").parquet(args.scores_out)
        bins = F.least(F.floor(F.col(PROBABILITY) * HISTOGRAM_BINS).cast("int"), F.lit(HISTOGRAM_BINS - 1))
        hist = {r["bin"]: r["count"] for r in scores.groupBy(bins.alias("bin")).count().collect()}
        stats = scores.agg(F.sum(F.col(LABEL)).alias("positives"), F.avg(PROBABILITY).alias("mean")).first()
    finally:
        scores.unpersist()
    report = {
        "input": args.input,
        "input_rows": counts["input_rows"],
        "scored_rows": rows,
        "positives": int(stats["positives"] or 0),
        "mean_probability": float(stats["mean"]),
        "histogram": [int(hist.get(i, 0)) for i in range(HISTOGRAM_BINS)],
        "model_version": version,
        "run_id": run_id,
        "scored_at": scored_at.isoformat() + "Z",
        "columns": columns.names,
    }
    tj.write_text(spark, args.report_out, json.dumps(report, indent=2, sort_keys=True))
    log.info("scored %d entities from %d input rows", rows, counts["input_rows"])
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    main(sys.argv[1:])
