"""The transform job: raw extract -> clean, point-in-time featured, temporally split Parquet + JSON report.

Standalone (pyspark and the standard library only): the cloud backend uploads this file to GCS and runs it as
a Dataproc Serverless batch; the local backend calls ``main(argv, spark=...)`` in a local Spark session. The
feature spec and the derived features' names (defined in ``ctloop.features``) arrive as arguments.

Steps, in order:
  1. Read the input Parquet directory; check the spec's columns are there.
  2. Drop exact duplicate rows (all source columns equal).
  3. Cast: id -> string, timestamp -> timestamp (UTC), label -> int, numeric -> double (NaN -> null),
     categorical -> string.
  4. Quarantine malformed rows, each with one ``_reason`` (the first that applies, in this order) and the
     ``_reason_column`` it concerns: ``null_id`` (null or blank), ``null_timestamp``, ``unparseable_value``
     (a non-null value the cast cannot read: timestamp, label, numerics in column order), ``null_label``,
     ``invalid_label`` (not 0 or 1), ``negative_value`` (in a column that cannot be negative); then
     ``conflicting_label``: every otherwise clean row of an (id, timestamp) whose clean rows disagree on the
     label (which one is true is unknown, so none is kept). Quarantined rows keep their source values, so the
     report can be traced back to the input.
  5. Keep one row per (id, timestamp): the first by the remaining columns in output order, ascending, nulls
     last, so reruns keep the same row. Quarantine runs first, so a malformed twin never displaces a good row.
  6. History features per entity from strictly earlier rows only: a range frame over the timestamp in
     microseconds ending at -1 µs, so rows at the same instant never see each other whatever the dedup did.
     ``hist_prior_events`` (0 for a first event), ``hist_days_since_prior`` and ``hist_prior_mean_<col>``
     (null without an earlier value), all doubles so every model numeric has one type.
  7. Temporal split at two timestamp quantiles (Spark's percentile_approx, a distributed sketch): rows before
     the first cut are train, rows from the first cut and before the second are valid, the rest test. A row
     exactly at a cut goes to the later split, so every valid timestamp is strictly after every train
     timestamp (and test after valid); an empty split is an error.
  8. Write each split (id, timestamp, label, numeric, categorical, derived; timestamps as UTC
     TIMESTAMP_MICROS), the quarantine, and the JSON report. Only aggregates reach the driver.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.util import inheritable_thread_target

log = logging.getLogger("ctloop.transform_job")

REASON = "_reason"
REASON_COLUMN = "_reason_column"
SPLITS = ("train", "valid", "test")
# Rank error of the timestamp quantile sketch: 0.01% of the rows, tiny next to any useful split fraction.
QUANTILE_RELATIVE_ERROR = 1e-4
ROWS_PER_FILE = 1_000_000
# Below this many rows per file, splitting an output across cores costs more in tasks and files than it saves.
MIN_ROWS_PER_FILE = 250_000

_TS_US = "__ts_us"
_SPLIT = "__split"
_TYPED = "__typed__"
_SOURCE = "__source__"
_WELL_FORMED = "__well_formed"
_CONFLICT = "__conflict"
_KEEP = "__keep"
_COPIES = "__copies"
_TWINS = "__twins"
_MICROS_PER_DAY = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Session settings this job relies on; restored afterwards so a shared session is left as found.
_SESSION_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}
_NANOS_AS_LONG = "spark.sql.legacy.parquet.nanosAsLong"


@dataclass(frozen=True)
class FeatureNames:
    """The derived features' names. They are defined in ``ctloop.features``, which this file cannot import on
    Dataproc: the component passes them as ``--feature-names``."""

    prior_events: str
    days_since_prior: str
    prior_mean_prefix: str

    @classmethod
    def from_json(cls, text: str) -> FeatureNames:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--feature-names: not valid JSON ({e})") from e
        expected = sorted(cls.__dataclass_fields__)
        if not isinstance(data, dict) or sorted(data) != expected:
            raise ValueError(f"--feature-names: expected the keys {expected}, found {data!r}")
        return cls(**data)


@dataclass(frozen=True)
class JobSpec:
    """The parts of ``ctloop.features.FeatureSpec`` the job needs, parsed from its JSON."""

    id_column: str
    timestamp_column: str
    label_column: str
    numeric: list[str]
    categorical: list[str]
    names: FeatureNames
    history_means: list[str] = field(default_factory=list)
    history_enabled: bool = True

    @classmethod
    def from_json(cls, text: str, names: FeatureNames) -> JobSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--spec: not valid JSON ({e})") from e
        required = ["id_column", "timestamp_column", "label_column", "numeric", "categorical"]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"--spec: missing field(s) {missing}; found {sorted(data)}")
        known = {f for f in cls.__dataclass_fields__} - {"names"}
        return cls(**{k: v for k, v in data.items() if k in known}, names=names)

    @property
    def derived(self) -> list[str]:
        if not self.history_enabled:
            return []
        n = self.names
        return [n.prior_events, n.days_since_prior] + [n.prior_mean_prefix + c for c in self.history_means]

    @property
    def source_columns(self) -> list[str]:
        return [self.id_column, self.timestamp_column, self.label_column, *self.numeric, *self.categorical]

    @property
    def output_columns(self) -> list[str]:
        return self.source_columns + self.derived


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="transform_job", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="directory (path or URI) of the extract's Parquet files")
    for split in SPLITS:
        p.add_argument(f"--{split}-out", required=True, help=f"output directory of the {split} split")
    p.add_argument("--quarantine-out", required=True, help="output directory of the quarantined rows")
    p.add_argument("--report-out", required=True, help="JSON report file (path or URI)")
    p.add_argument("--spec", required=True, help="FeatureSpec JSON")
    p.add_argument("--feature-names", required=True,
                   help='JSON {"prior_events", "days_since_prior", "prior_mean_prefix"}: the derived features\' names')
    p.add_argument("--valid-fraction", type=float, required=True)
    p.add_argument("--test-fraction", type=float, required=True)
    p.add_argument("--non-negative", default=None,
                   help="JSON list of numeric columns that cannot be negative (default: all numeric columns)")
    args = p.parse_args(argv)
    for name in ("valid_fraction", "test_fraction"):
        value = getattr(args, name)
        if not 0 < value < 0.5:
            p.error(f"--{name.replace('_', '-')}: expected a fraction in (0, 0.5), found {value}")
    if args.valid_fraction + args.test_fraction >= 1:
        p.error("--valid-fraction + --test-fraction must leave rows for train")
    return args


def main(argv: list[str] | None = None, spark: SparkSession | None = None) -> dict[str, Any]:
    """Run the job; returns the report it wrote. ``spark`` lets a caller share its session."""
    args = parse_args(argv)
    spec = JobSpec.from_json(args.spec, FeatureNames.from_json(args.feature_names))
    non_negative = spec.numeric if args.non_negative is None else json.loads(args.non_negative)
    unknown = [c for c in non_negative if c not in spec.numeric]
    if unknown:
        raise ValueError(f"--non-negative: {unknown} are not numeric features of the spec {spec.numeric}")
    with job_session(spark, "ctloop-transform") as session:
        return _run(session, args, spec, non_negative)


@contextlib.contextmanager
def job_session(spark: SparkSession | None, app_name: str) -> Iterator[SparkSession]:
    """The caller's session (or a new one, stopped afterwards) with the job's settings, restored on exit."""
    own_session = spark is None
    if spark is None:
        spark = SparkSession.builder.appName(app_name).getOrCreate()
    saved = {k: spark.conf.get(k, None) for k in [*_SESSION_CONF, _NANOS_AS_LONG]}
    for key, value in _SESSION_CONF.items():
        spark.conf.set(key, value)
    try:
        yield spark
    finally:
        for key, value in saved.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
        if own_session:
            spark.stop()


def _run(spark: SparkSession, args: argparse.Namespace, spec: JobSpec, non_negative: list[str],
         ) -> dict[str, Any]:
    raw, nanos_as_long = read_input(spark, args.input)
    check_columns(raw, spec, args.input)
    raw = raw.select(*[_col(c) for c in spec.source_columns])
    counts: dict[str, Any] = {"input_rows": raw.count()}
    log.info("read %d rows from %s", counts["input_rows"], args.input)

    # One shuffle by id, one sort, one cache: exact duplicates (every source column equal) are grouped within
    # the id's partition, counted as their copies, then flagged (flags depend on a row's values alone); the
    # conflicting labels, the one row per (id, timestamp) and the history all come from windows over a single
    # sort of those partitions (``check_and_feature``).
    distinct = (raw.repartition(_col(spec.id_column))
                .groupBy(*[_col(c) for c in spec.source_columns]).agg(F.count(F.lit(1)).alias(_COPIES)))
    flagged = flag_rows(distinct, spec, non_negative, nanos_as_long)
    rows = check_and_feature(flagged.select(
        *[_col(c).alias(_SOURCE + c) for c in spec.source_columns],
        *[F.col(_quote(_TYPED + c)).alias(c) for c in spec.source_columns],
        REASON, REASON_COLUMN, _COPIES), spec).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        quarantine = rows.where(F.col(REASON).isNotNull()).select(
            *[F.col(_quote(_SOURCE + c)).alias(c) for c in spec.source_columns], REASON, REASON_COLUMN)
        # One pass over the cache counts every reason and sketches the clean rows' timestamps for the cut points
        # (the group without a reason).
        probs = [1.0 - args.valid_fraction - args.test_fraction, 1.0 - args.test_fraction]
        groups = rows.groupBy(REASON, REASON_COLUMN).agg(
            F.count(F.lit(1)).alias("count"), F.sum(_COPIES).alias("copies"),
            F.percentile_approx(F.when(F.col(REASON).isNull(), F.col(_TS_US)), probs,
                                round(1 / QUANTILE_RELATIVE_ERROR)).alias("cuts")).collect()
        reasons = [r for r in groups if r[REASON] is not None]
        counts["bad"] = reasons
        bad_rows = sum(r["count"] for r in reasons)
        bad_input_rows = sum(int(r["copies"]) for r in reasons)
        if counts["input_rows"] == bad_input_rows:
            _write_parquet(quarantine, bad_rows, args.quarantine_out)
            raise ValueError(f"input {args.input}: no valid rows left after quarantine "
                             f"({_reason_text(counts['bad'])}); nothing to split")
        featured = rows.where(F.col(REASON).isNull()).select(
            *[_col(c) for c in spec.output_columns], _TS_US, _TWINS)

        cuts = next((int(r["cuts"][0]), int(r["cuts"][1])) for r in groups if r[REASON] is None)
        split = featured.withColumn(_SPLIT, F.when(F.col(_TS_US) < cuts[0], "train")
                                    .when(F.col(_TS_US) < cuts[1], "valid").otherwise("test"))
        stats = split_stats(split, spec)
        _check_splits(stats, cuts, args)
        counts["clean_rows"] = sum(stats[s]["clean_rows"] for s in SPLITS)
        counts["distinct_rows"] = counts["clean_rows"] + bad_rows
        writes = [(quarantine, bad_rows, args.quarantine_out)]
        writes += [(split.where(F.col(_SPLIT) == name).select(*[_col(c) for c in spec.output_columns]),
                    stats[name]["rows"], getattr(args, f"{name}_out")) for name in SPLITS]
        # Each output is one or a few files, each written by one task: several outputs at once keep every
        # core busy (Spark runs jobs from different threads side by side).
        with ThreadPoolExecutor(max_workers=len(writes), thread_name_prefix="write") as pool:
            # The writes belong to the caller's job group, so cancelling the job cancels them too.
            for future in [pool.submit(inheritable_thread_target(_write_parquet), *w) for w in writes]:
                future.result()
        for name in SPLITS:
            log.info("wrote %d %s rows to %s", stats[name]["rows"], name, getattr(args, f"{name}_out"))
    finally:
        rows.unpersist()
    report = build_report(args, spec, counts, cuts, stats)
    write_text(spark, args.report_out, json.dumps(report, indent=2, sort_keys=True))
    log.info("quarantined: %s", json.dumps(report["quarantined"]))
    return report


def _write_parquet(df: DataFrame, rows: int, out: str) -> None:
    df.coalesce(output_files(rows, df.sparkSession.sparkContext.defaultParallelism)).write.mode(
        "overwrite").parquet(out)


def output_files(rows: int, parallelism: int) -> int:
    """Files sized by rows, not by the shuffle's partition count: a small output is one file, a large one at
    most ``ROWS_PER_FILE`` rows per file and spread over the cores (one task writes each file)."""
    return max(1, -(-rows // ROWS_PER_FILE), min(parallelism, rows // MIN_ROWS_PER_FILE))


def build_report(args: argparse.Namespace, spec: JobSpec, counts: dict[str, Any], cuts: tuple[int, int],
                 stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON report: every count the data-quality report shows, all from aggregates."""
    bad = counts["bad"]
    output_rows = sum(stats[s]["rows"] for s in SPLITS)
    return {
        "input": args.input,
        "input_rows": counts["input_rows"],
        "duplicates_dropped": {"exact": counts["input_rows"] - counts["distinct_rows"],
                               "same_id_timestamp": counts["clean_rows"] - output_rows},
        "quarantined": {
            "rows": counts["distinct_rows"] - counts["clean_rows"],
            "by_reason": _sum_by(bad, lambda r: r[REASON]),
            "by_reason_column": _sum_by(bad, lambda r: f"{r[REASON]}:{r[REASON_COLUMN]}"),
        },
        "output_rows": output_rows,
        "fractions": {"valid": args.valid_fraction, "test": args.test_fraction},
        "cut_points": {"valid_start": _iso(cuts[0]), "test_start": _iso(cuts[1])},
        "splits": {s: {k: v for k, v in stats[s].items() if k not in ("nulls", "clean_rows")} for s in SPLITS},
        "null_rate": {c: sum(stats[s]["nulls"][c] for s in SPLITS) / output_rows
                      for c in spec.numeric + spec.categorical + spec.derived},
        "columns": spec.output_columns,
    }


def _check_splits(stats: dict[str, dict[str, Any]], cuts: tuple[int, int], args: argparse.Namespace) -> None:
    empty = [s for s in SPLITS if stats[s]["rows"] == 0]
    if empty:
        total = sum(stats[s]["rows"] for s in SPLITS)
        raise ValueError(
            f"input {args.input}: the temporal split left {empty} empty ({total} rows, cut points "
            f"{_iso(cuts[0])} and {_iso(cuts[1])}); need more rows or more distinct timestamps for "
            f"valid_fraction={args.valid_fraction}, test_fraction={args.test_fraction}")


def read_input(spark: SparkSession, path: str) -> tuple[DataFrame, bool]:
    """Read the Parquet input; nanosecond timestamps (pandas' default) come back as longs, flagged True."""
    try:
        return _reader(spark).parquet(path), False
    except Exception as e:  # AnalysisException or a wrapped SparkException, depending on where Spark fails
        if "TIMESTAMP(NANOS" not in str(e):
            raise
    spark.conf.set(_NANOS_AS_LONG, "true")
    return _reader(spark).parquet(path), True


def _reader(spark: SparkSession) -> Any:
    # Only the data files: a Dataset directory may also hold metadata or markers.
    return spark.read.option("pathGlobFilter", "*.parquet")


def check_columns(df: DataFrame, spec: JobSpec, path: str) -> None:
    """Fail with the missing columns (expected vs found) before any work is done."""
    missing = [c for c in spec.source_columns if c not in df.columns]
    if missing:
        raise ValueError(f"input {path}: missing column(s) {missing}; expected {spec.source_columns}, "
                         f"found {df.columns}")


def flag_rows(df: DataFrame, spec: JobSpec, non_negative: list[str], nanos_as_long: bool = False,
              label_required: bool = True) -> DataFrame:
    """Source columns plus typed copies (``__typed__<col>``) and the quarantine reason (null = clean).

    ``label_required=False`` (scoring) lets a row without a label through (its outcome is not known yet); a
    label that is there but unreadable or not 0/1 still marks the row malformed, as in training.
    """
    types = {f.name: f.dataType for f in df.schema.fields}
    ident = _col(spec.id_column).cast("string")
    ts = _typed_timestamp(spec.timestamp_column, types[spec.timestamp_column], nanos_as_long)
    label_num = _try_cast(spec.label_column, "double")
    numeric = {c: _typed_numeric(c, types[c]) for c in spec.numeric}

    checks: list[tuple[Column, str, str]] = [
        (ident.isNull() | (F.trim(ident) == ""), "null_id", spec.id_column),
        (_col(spec.timestamp_column).isNull(), "null_timestamp", spec.timestamp_column),
        (ts.isNull(), "unparseable_value", spec.timestamp_column),
    ]
    label_raw = _col(spec.label_column)
    checks.append((label_raw.isNotNull() & label_num.isNull(), "unparseable_value", spec.label_column))
    checks += [(_col(c).isNotNull() & numeric[c].isNull(), "unparseable_value", c) for c in spec.numeric]
    if label_required:
        checks.append((label_raw.isNull(), "null_label", spec.label_column))
    checks.append((~label_num.isin(0.0, 1.0), "invalid_label", spec.label_column))  # null stays unflagged
    checks += [(numeric[c] < 0, "negative_value", c) for c in non_negative]

    reason = reason_column = None
    for cond, name, column in checks:
        reason = F.when(cond, name) if reason is None else reason.when(cond, name)
        reason_column = F.when(cond, column) if reason_column is None else reason_column.when(cond, column)

    typed = [ident.alias(_TYPED + spec.id_column), ts.alias(_TYPED + spec.timestamp_column),
             label_num.cast("int").alias(_TYPED + spec.label_column)]
    # NaN is a missing value, not a number: null it only after the unparseable check has seen the cast.
    typed += [F.when(F.isnan(numeric[c]), None).otherwise(numeric[c]).alias(_TYPED + c) for c in spec.numeric]
    typed += [_col(c).cast("string").alias(_TYPED + c) for c in spec.categorical]
    return df.select("*", *typed, reason.alias(REASON), reason_column.alias(REASON_COLUMN))


def check_and_feature(df: DataFrame, spec: JobSpec) -> DataFrame:
    """Marks ``conflicting_label``, keeps one row per (id, timestamp) and adds the history, in one sort.

    ``df``: distinct rows partitioned by id, with the typed values under the spec's names, the quarantine
    reason (null = well-formed) and ``__copies``. Returns the quarantined rows (malformed or conflicting) and
    the kept clean rows, these with ``__twins`` (the clean rows their (id, timestamp) had) and the history.
    Malformed rows sort apart from the well-formed ones of the same id; a conflict takes every clean row of
    its (id, timestamp), so the windows below see whole groups and the history counts kept clean rows only.
    """
    df = df.withColumn(_WELL_FORMED, F.col(REASON).isNull())
    df = _with_ts_us(df, spec)
    entity = [_col(spec.id_column), F.col(_WELL_FORMED)]
    order = _first_row_order(spec)
    df = df.sortWithinPartitions(*entity, *order)
    same_key = Window.partitionBy(*entity, F.col(_TS_US))
    clean_label = F.when(F.col(_WELL_FORMED), _col(spec.label_column))
    conflict = F.col(_WELL_FORMED) & (F.min(clean_label).over(same_key) != F.max(clean_label).over(same_key))
    df = df.select("*", conflict.alias(_CONFLICT), _first_at_instant(entity, order).alias(_KEEP),
                   F.count(F.lit(1)).over(same_key).alias(_TWINS))
    df = (df.withColumn(REASON_COLUMN, F.when(F.col(_CONFLICT), F.lit(spec.label_column))
                        .otherwise(F.col(REASON_COLUMN)))
          .withColumn(REASON, F.when(F.col(_CONFLICT), F.lit("conflicting_label")).otherwise(F.col(REASON))))
    counted = F.col(REASON).isNull() & F.col(_KEEP)
    df = df.select("*", *history_columns(spec, entity, counted))
    df = df.where(F.col(REASON).isNotNull() | F.col(_KEEP))
    # A quarantined row keeps its source values only, a kept row its typed values and features: the other
    # half is null, which the cache stores as a bit.
    bad = F.col(REASON).isNotNull()
    source = [F.when(bad, F.col(_quote(_SOURCE + c))).alias(_SOURCE + c) for c in spec.source_columns]
    typed = [F.when(~bad, _col(c)).alias(c) for c in spec.output_columns]
    return df.select(*source, *typed, REASON, REASON_COLUMN, _COPIES, _TS_US, _TWINS)


def dedup_id_timestamp(df: DataFrame, spec: JobSpec) -> DataFrame:
    """One row per (id, timestamp): the first by the other output columns, ascending with nulls last.

    Adds ``__ts_us`` (the timestamp in microseconds, which orders rows as the timestamp does) and sorts by
    it, partitioned by id alone: the history window that follows then needs neither a shuffle nor a sort.
    """
    df = _with_ts_us(df, spec)
    # A window value cannot be filtered on directly: materialise it as a column first.
    df = df.withColumn(_KEEP, _first_at_instant([_col(spec.id_column)], _first_row_order(spec)))
    return df.where(F.col(_KEEP)).drop(_KEEP)


def _first_row_order(spec: JobSpec) -> list[Column]:
    """Within an id: by time, then by the other source columns ascending, nulls last (the kept row first)."""
    others = [c for c in spec.source_columns if c not in (spec.id_column, spec.timestamp_column)]
    return [F.col(_TS_US).asc(), *[_col(c).asc_nulls_last() for c in others]]


def _first_at_instant(entity: list[Column], order: list[Column]) -> Column:
    """True for the first row of its (entity, ``__ts_us``) in ``order``: the row an (id, timestamp) keeps."""
    previous_ts = F.lag(F.col(_TS_US)).over(Window.partitionBy(*entity).orderBy(*order))
    return previous_ts.isNull() | (previous_ts != F.col(_TS_US))


def add_history(df: DataFrame, spec: JobSpec) -> DataFrame:
    """Adds ``__ts_us`` (unless there) and the history features from the same entity's strictly earlier rows."""
    df = _with_ts_us(df, spec)
    return df.select("*", *history_columns(spec, [_col(spec.id_column)]))


def history_columns(spec: JobSpec, entity: list[Column], counted: Column | None = None) -> list[Column]:
    """The history features of each row from the strictly earlier rows of its ``entity`` (all of them, or
    those where ``counted`` holds): a range frame over ``__ts_us`` ending 1 µs before the row."""
    if not spec.history_enabled:
        return []
    earlier = Window.partitionBy(*entity).orderBy(F.col(_TS_US)).rangeBetween(Window.unboundedPreceding, -1)

    def only(value: Column) -> Column:
        return value if counted is None else F.when(counted, value)

    prior_ts = F.max(only(F.col(_TS_US))).over(earlier)
    names = spec.names
    derived = [
        F.count(only(F.lit(1))).over(earlier).cast("double").alias(names.prior_events),
        ((F.col(_TS_US) - prior_ts) / _MICROS_PER_DAY).cast("double").alias(names.days_since_prior),
    ]
    derived += [F.avg(only(_col(c))).over(earlier).cast("double").alias(names.prior_mean_prefix + c)
                for c in spec.history_means]
    return derived


def _with_ts_us(df: DataFrame, spec: JobSpec) -> DataFrame:
    if _TS_US in df.columns:
        return df
    return df.withColumn(_TS_US, F.unix_micros(_col(spec.timestamp_column)))


def split_stats(df: DataFrame, spec: JobSpec) -> dict[str, dict[str, Any]]:
    """Rows, positive rate, time range and per-feature null counts of each split, in one aggregation; with a
    ``__twins`` column (``check_and_feature``) also the clean rows before the (id, timestamp) dedup."""
    features = spec.numeric + spec.categorical + spec.derived
    aggs = [F.count(F.lit(1)).alias("rows"), F.sum(_col(spec.label_column)).alias("positives"),
            F.min(_TS_US).alias("ts_min"), F.max(_TS_US).alias("ts_max"),
            (F.sum(_TWINS) if _TWINS in df.columns else F.count(F.lit(1))).alias("clean_rows")]
    aggs += [F.sum(_col(c).isNull().cast("long")).alias(f"null_{i}") for i, c in enumerate(features)]
    rows = {r[_SPLIT]: r for r in df.groupBy(_SPLIT).agg(*aggs).collect()}
    stats: dict[str, dict[str, Any]] = {}
    for name in SPLITS:
        r = rows.get(name)
        n = int(r["rows"]) if r else 0
        stats[name] = {
            "rows": n,
            "positives": int(r["positives"]) if r else 0,
            "positive_rate": (int(r["positives"]) / n) if n else None,
            "ts_min": _iso(r["ts_min"]) if r else None,
            "ts_max": _iso(r["ts_max"]) if r else None,
            "nulls": {c: (int(r[f"null_{i}"]) if r else 0) for i, c in enumerate(features)},
            "clean_rows": int(r["clean_rows"]) if r else 0,
        }
    return stats


def write_text(spark: SparkSession, target: str, text: str) -> None:
    """Write a small file whole: a local path via rename, a URI (gs://, file://) via Hadoop's FileSystem."""
    if not urlsplit(target).scheme:
        directory = os.path.dirname(os.path.abspath(target))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".report-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
        return
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(target)
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    # Object stores publish an object on close, so readers never see a partial report.
    stream = fs.create(path, True)
    try:
        stream.write(bytearray(text.encode()))
    finally:
        stream.close()


def _typed_timestamp(name: str, dtype: T.DataType, nanos_as_long: bool) -> Column:
    if isinstance(dtype, T.TimestampType):
        return _col(name)
    if isinstance(dtype, T.TimestampNTZType | T.DateType):
        return _col(name).cast("timestamp")  # wall-clock values are read as UTC (the session time zone)
    if isinstance(dtype, T.StringType):
        return _try_cast(name, "timestamp")
    if isinstance(dtype, T.LongType) and nanos_as_long:
        return F.timestamp_micros(F.floor(_col(name) / 1000).cast("long"))
    raise ValueError(f"timestamp column {name!r}: expected a timestamp, date or string column, "
                     f"found {dtype.simpleString()}")


def _typed_numeric(name: str, dtype: T.DataType) -> Column:
    if isinstance(dtype, T.NumericType | T.BooleanType | T.StringType):
        return _try_cast(name, "double")
    raise ValueError(f"numeric column {name!r}: expected a number or a string of numbers, "
                     f"found {dtype.simpleString()}")


def _try_cast(name: str, sql_type: str) -> Column:
    # SQL try_cast (Spark >= 3.2): null instead of an error under ANSI mode, so bad values can be quarantined.
    return F.expr(f"try_cast({_quote(name)} AS {sql_type})")


def _col(name: str) -> Column:
    return F.col(_quote(name))


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _iso(micros: int | None) -> str | None:
    if micros is None:
        return None
    return (_EPOCH + timedelta(microseconds=int(micros))).isoformat().replace("+00:00", "Z")


def _sum_by(rows: list[Any], key: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[key(r)] = out.get(key(r), 0) + int(r["count"])
    return dict(sorted(out.items()))


def _reason_text(rows: list[Any]) -> str:
    counts = _sum_by(rows, lambda r: r[REASON])
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "no rows at all"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    main(sys.argv[1:])
