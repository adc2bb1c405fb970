"""The transform's features in pandas: the single-process baseline the Spark job is measured against.

Not product code. It follows components/spark/transform_job.py step by step (exact-duplicate drop, casts,
quarantine with the same reasons in the same order, one row per id + timestamp, point-in-time history features,
temporal split at timestamp quantiles, Parquet splits) so both do the same work; ``compare_splits`` checks that
they agree. Everything is held in memory at once: that is the point of the comparison.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ctloop.features import DAYS_SINCE_PRIOR, PRIOR_EVENTS, PRIOR_MEAN_PREFIX, FeatureSpec
from ctloop.parquet_files import parquet_files

SPLITS = ("train", "valid", "test")
ROWS_PER_FILE = 1_000_000
REASON = "_reason"
REASON_COLUMN = "_reason_column"
_TS_US = "__ts_us"
_MICROS_PER_DAY = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def read_input(input_dir: Path, spec: FeatureSpec) -> pd.DataFrame:
    files = [str(p) for p in parquet_files(input_dir)]
    if not files:
        raise FileNotFoundError(f"input {input_dir}: no *.parquet files")
    table = ds.dataset(files, format="parquet").to_table()
    source = source_columns(spec)
    missing = [c for c in source if c not in table.column_names]
    if missing:
        raise ValueError(f"input {input_dir}: missing column(s) {missing}; expected {source}, "
                         f"found {table.column_names}")
    return table.select(source).to_pandas()


def source_columns(spec: FeatureSpec) -> list[str]:
    return [spec.id_column, spec.timestamp_column, spec.label_column, *spec.numeric, *spec.categorical]


def output_columns(spec: FeatureSpec) -> list[str]:
    return source_columns(spec) + spec.derived


def _timestamp(col: pd.Series) -> pd.Series:
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        return col.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_dtype(col):
        return col.dt.tz_localize("UTC")  # wall-clock values read as UTC, as the job's session time zone does
    if pd.api.types.is_string_dtype(col) or col.dtype == object:
        return pd.to_datetime(col, errors="coerce", utc=True)
    raise ValueError(f"timestamp column {col.name!r}: expected a timestamp or string column, found {col.dtype}")


def _as_string(col: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(col):
        return col.map({True: "true", False: "false"}).astype("str")  # Spark's cast of a boolean
    return col.astype("str").where(col.notna(), None)


def flag_rows(df: pd.DataFrame, spec: FeatureSpec, non_negative: list[str]) -> pd.DataFrame:
    """Typed columns (``__typed__<col>``) and the first quarantine reason per row (None = clean)."""
    ident = _as_string(df[spec.id_column])
    ts = _timestamp(df[spec.timestamp_column])
    label_raw = df[spec.label_column]
    label_num = pd.to_numeric(label_raw, errors="coerce").astype("float64")
    numeric = {c: pd.to_numeric(df[c], errors="coerce").astype("float64") for c in spec.numeric}
    checks: list[tuple[pd.Series, str, str]] = [
        (ident.isna() | (ident.str.strip() == ""), "null_id", spec.id_column),
        (df[spec.timestamp_column].isna(), "null_timestamp", spec.timestamp_column),
        (ts.isna(), "unparseable_value", spec.timestamp_column),
        (label_raw.notna() & label_num.isna(), "unparseable_value", spec.label_column),
    ]
    checks += [(df[c].notna() & numeric[c].isna(), "unparseable_value", c) for c in spec.numeric]
    checks.append((label_raw.isna(), "null_label", spec.label_column))
    checks.append((label_num.notna() & ~label_num.isin([0.0, 1.0]), "invalid_label", spec.label_column))
    checks += [(numeric[c] < 0, "negative_value", c) for c in non_negative]
    conditions = [c.fillna(False).to_numpy(dtype=bool) for c, _, _ in checks]
    out = df.copy()
    out[REASON] = np.select(conditions, [name for _, name, _ in checks], default=None)
    out[REASON_COLUMN] = np.select(conditions, [column for _, _, column in checks], default=None)
    out["__typed__" + spec.id_column] = ident
    out["__typed__" + spec.timestamp_column] = ts
    out["__typed__" + spec.label_column] = label_num
    for c in spec.numeric:
        out["__typed__" + c] = numeric[c]
    for c in spec.categorical:
        out["__typed__" + c] = _as_string(df[c])
    return out


def dedup_id_timestamp(df: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """One row per (id, timestamp): the first by the other output columns, ascending, nulls last."""
    others = [c for c in source_columns(spec) if c not in (spec.id_column, spec.timestamp_column)]
    ordered = df.sort_values([spec.id_column, spec.timestamp_column, *others], na_position="last", kind="stable")
    return ordered.drop_duplicates([spec.id_column, spec.timestamp_column], keep="first")


def add_history(df: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """History features from the same entity's strictly earlier rows (input sorted by id, then timestamp).

    After the (id, timestamp) dedup no two rows of an entity share an instant, so "strictly earlier" is
    "earlier in this order".
    """
    df = df.copy()
    df[_TS_US] = _micros(df[spec.timestamp_column])
    if not spec.history_enabled:
        return df
    keys = df[spec.id_column]
    groups = df.groupby(keys, sort=False)
    df[PRIOR_EVENTS] = groups.cumcount().astype("float64")
    df[DAYS_SINCE_PRIOR] = (df[_TS_US] - groups[_TS_US].shift(1)) / _MICROS_PER_DAY
    for c in spec.history_means:
        filled = df[c].fillna(0.0)
        present = df[c].notna().astype("int64")
        prior_sum = filled.groupby(keys, sort=False).cumsum() - filled
        prior_count = present.groupby(keys, sort=False).cumsum() - present
        df[PRIOR_MEAN_PREFIX + c] = (prior_sum / prior_count).where(prior_count > 0)
    return df


def _micros(col: pd.Series) -> pd.Series:
    return col.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[us]").astype("int64")


def cut_points(ts_us: pd.Series, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Where valid and test start: exact timestamp quantiles (an element of the data, as Spark's sketch)."""
    probs = [1.0 - valid_fraction - test_fraction, 1.0 - test_fraction]
    q = np.quantile(ts_us.to_numpy(), probs, method="inverted_cdf")
    return int(q[0]), int(q[1])


def _iso(micros: int | None) -> str | None:
    if micros is None:
        return None
    return (_EPOCH + timedelta(microseconds=int(micros))).isoformat().replace("+00:00", "Z")


def _write_parquet_dir(frame: pd.DataFrame, target: Path) -> None:
    """Part files of at most ROWS_PER_FILE rows, timestamps as UTC microseconds, written then renamed."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        fields = [pa.field(f.name, pa.timestamp("us", tz="UTC")) if pa.types.is_timestamp(f.type) else f
                  for f in table.schema]
        table = table.cast(pa.schema(fields))
        for i, start in enumerate(range(0, max(1, table.num_rows), ROWS_PER_FILE)):
            pq.write_table(table.slice(start, ROWS_PER_FILE), staging / f"part-{i:05d}.parquet")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def transform(input_dir: Path, out: Path, spec: FeatureSpec, valid_fraction: float, test_fraction: float,
              non_negative: list[str] | None = None) -> dict[str, Any]:
    """Run every step; writes ``out/{train,valid,test,quarantine}`` and returns a report like the job's."""
    non_negative = list(spec.numeric) if non_negative is None else non_negative
    out.mkdir(parents=True, exist_ok=True)
    raw = read_input(input_dir, spec)
    input_rows = len(raw)
    distinct = raw.drop_duplicates()
    flagged = flag_rows(distinct, spec, non_negative)
    del raw, distinct
    bad = flagged[REASON].notna()
    source = source_columns(spec)
    _write_parquet_dir(flagged.loc[bad, [*source, REASON, REASON_COLUMN]], out / "quarantine")
    by_reason = flagged.loc[bad, REASON].value_counts().sort_index()
    clean = flagged.loc[~bad, ["__typed__" + c for c in source]]
    clean.columns = source
    clean[spec.label_column] = clean[spec.label_column].astype("int64")
    distinct_rows, clean_rows = len(flagged), len(clean)
    del flagged
    featured = add_history(dedup_id_timestamp(clean, spec), spec)
    del clean
    cuts = cut_points(featured[_TS_US], valid_fraction, test_fraction)
    split = np.where(featured[_TS_US] < cuts[0], "train", np.where(featured[_TS_US] < cuts[1], "valid", "test"))
    splits: dict[str, Any] = {}
    for name in SPLITS:
        rows = featured.loc[split == name, output_columns(spec)]
        _write_parquet_dir(rows, out / name)
        spec.write(out / name)
        splits[name] = {"rows": len(rows), "positives": int(rows[spec.label_column].sum()),
                        "ts_min": _iso(featured.loc[split == name, _TS_US].min()) if len(rows) else None,
                        "ts_max": _iso(featured.loc[split == name, _TS_US].max()) if len(rows) else None}
    output_rows = sum(s["rows"] for s in splits.values())
    return {
        "input_rows": input_rows,
        "duplicates_dropped": {"exact": input_rows - distinct_rows, "same_id_timestamp": clean_rows - output_rows},
        "quarantined": {"rows": distinct_rows - clean_rows, "by_reason": {k: int(v) for k, v in by_reason.items()}},
        "output_rows": output_rows,
        "cut_points": {"valid_start": _iso(cuts[0]), "test_start": _iso(cuts[1])},
        "splits": splits,
    }


def compare_splits(spark_dir: Path, pandas_dir: Path, spec: FeatureSpec, tolerance: float = 1e-9,
                   ) -> dict[str, Any]:
    """How the two outputs differ: rows per split, rows only one side has, rows put in different splits, and
    the largest relative difference of each derived feature over the rows both have."""
    def read(root: Path) -> pd.DataFrame:
        parts = []
        for name in SPLITS:
            frame = pd.read_parquet(root / name, columns=[spec.id_column, spec.timestamp_column, *spec.derived])
            frame["__split"] = name
            parts.append(frame)
        return pd.concat(parts, ignore_index=True)

    a, b = read(spark_dir), read(pandas_dir)
    keys = [spec.id_column, spec.timestamp_column]
    joined = a.merge(b, on=keys, how="outer", suffixes=("_spark", "_pandas"), indicator=True)
    both = joined[joined["_merge"] == "both"]
    diffs: dict[str, float] = {}
    for c in spec.derived:
        x, y = both[f"{c}_spark"], both[f"{c}_pandas"]
        null_mismatch = int((x.isna() != y.isna()).sum())
        scale = np.maximum(np.abs(x), np.abs(y)).where(lambda s: s > 0, 1.0)
        rel = (np.abs(x - y) / scale).max(skipna=True)
        diffs[c] = float("inf") if null_mismatch else float(0.0 if pd.isna(rel) else rel)
    return {
        "rows": {"spark": {s: int((a["__split"] == s).sum()) for s in SPLITS},
                 "pandas": {s: int((b["__split"] == s).sum()) for s in SPLITS}},
        "only_spark": int((joined["_merge"] == "left_only").sum()),
        "only_pandas": int((joined["_merge"] == "right_only").sum()),
        "split_disagreements": int((both["__split_spark"] != both["__split_pandas"]).sum()),
        "max_relative_difference": diffs,
        "features_agree": all(v <= tolerance for v in diffs.values()),
    }
