"""The transform step: the PySpark job on local Spark (one shared session) and the Dataproc path over REST."""

import ast
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import transform as tr
from components.spark import transform_job
from ctloop.config import DATAPROC_RUNTIME_SPARK, Settings
from ctloop.errors import DataValidationError
from ctloop.features import DERIVED_NAMES, FeatureSpec, resolve_feature_spec
from tests.spark_fixtures import live_session, spark  # noqa: F401  (spark: a pytest fixture)

NUMERIC = ["tenure_months", "monthly_charges", "total_charges", "support_calls", "data_usage_gb",
           "late_payments", "satisfaction_score"]
CATEGORICAL = ["contract_type", "payment_method", "internet_service", "region"]
SOURCE = ["customer_id", "event_ts", "churned", *NUMERIC, *CATEGORICAL]
T0 = datetime(2024, 1, 1, tzinfo=UTC)
HAND_ID = "HAND-1"


def _settings(**overrides: Any) -> Settings:
    base = {"columns.numeric_features": NUMERIC, "columns.categorical_features": CATEGORICAL}
    return Settings().with_overrides({**base, **overrides})


# ---------------------------------------------------------------- fixture data


@dataclass
class Fixture:
    """A generated input with known defects: every expected count comes from how it was built."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    base_keys: set[tuple[str, datetime]] = field(default_factory=set)
    exact_dupes: int = 0
    twins: list[dict[str, Any]] = field(default_factory=list)  # same id+ts as a base row, other values
    bad: dict[str, int] = field(default_factory=dict)  # "reason:column" -> rows
    hand: list[dict[str, Any]] = field(default_factory=list)  # the hand-built entity's clean events

    def add_bad(self, row: dict[str, Any], key: str) -> None:
        self.rows.append(row)
        self.bad[key] = self.bad.get(key, 0) + 1


def _row(rng: np.random.Generator, cid: str, ts: datetime) -> dict[str, Any]:
    tenure = int(rng.integers(1, 72))
    monthly = round(float(rng.uniform(20, 120)), 2)
    return {
        "customer_id": cid,
        "event_ts": ts,
        "churned": int(rng.random() < 0.3),
        "tenure_months": tenure,
        "monthly_charges": monthly,
        "total_charges": None if rng.random() < 0.05 else round(tenure * monthly, 2),
        "support_calls": int(rng.poisson(1.5)),
        "data_usage_gb": None if rng.random() < 0.04 else round(float(rng.gamma(2.0, 10.0)), 3),
        "late_payments": int(rng.poisson(0.5)),
        "satisfaction_score": int(rng.integers(1, 6)),
        "contract_type": str(rng.choice(["month-to-month", "one-year", "two-year"])),
        "payment_method": None if rng.random() < 0.03 else str(rng.choice(["card", "bank", "check"])),
        "internet_service": str(rng.choice(["fiber", "dsl", "none"])),
        "region": str(rng.choice(["north", "south", "east", "west"])),
    }


def build_fixture(entities: int = 300, seed: int = 7) -> Fixture:
    rng = np.random.default_rng(seed)
    fx = Fixture()
    base: list[dict[str, Any]] = []
    for e in range(entities):
        n = int(rng.integers(1, 16))
        minutes = rng.choice(730 * 24 * 60, size=n, replace=False)
        for m in sorted(minutes):
            base.append(_row(rng, f"C{e:05d}", T0 + timedelta(minutes=int(m))))
    # The hand-built entity: a twin at the same instant, a malformed event in between, uneven gaps.
    hand_days = [0.0, 1.0, 3.5, 10.0]
    for i, d in enumerate(hand_days):
        r = _row(rng, HAND_ID, T0 + timedelta(days=400 + d))
        r.update(churned=0, tenure_months=10 + i, monthly_charges=50.0 + 10 * i,
                 total_charges=100.0 * (i + 1))
        base.append(r)
        fx.hand.append(r)
    fx.rows += base
    fx.base_keys = {(r["customer_id"], r["event_ts"]) for r in base}

    picks = rng.choice(len(base), size=60, replace=False)
    for i in picks[:40]:  # exact duplicates
        fx.rows.append(dict(base[i]))
        fx.exact_dupes += 1
    # Same id + timestamp, different values: half of them sort before their base row.
    for k, i in enumerate(picks[40:]):
        twin = dict(base[i])
        twin["tenure_months"] = base[i]["tenure_months"] + (1 if k % 2 else -1)
        fx.rows.append(twin)
        fx.twins.append(twin)
    hand_twin = dict(fx.hand[2])
    hand_twin["tenure_months"] = 999  # sorts after the original: the original (in fx.hand) is kept
    fx.rows.append(hand_twin)
    fx.twins.append(hand_twin)

    def fresh(i: int, cid: str | None = None) -> dict[str, Any]:
        return _row(rng, f"BAD{i:04d}" if cid is None else cid, T0 + timedelta(days=900, minutes=i))

    i = 0
    for cid in [None] * 6 + ["", "   "] * 2:
        fx.add_bad({**fresh(i), "customer_id": cid}, "null_id:customer_id")
        i += 1
    for _ in range(8):
        fx.add_bad({**fresh(i), "event_ts": None}, "null_timestamp:event_ts")
        i += 1
    for label in [2, -1, 2, 5, 3, 2, 7]:
        fx.add_bad({**fresh(i), "churned": label}, "invalid_label:churned")
        i += 1
    for _ in range(5):
        fx.add_bad({**fresh(i), "churned": None}, "null_label:churned")
        i += 1
    for col in ["support_calls"] * 6 + ["monthly_charges"] * 6:
        fx.add_bad({**fresh(i), col: -3}, f"negative_value:{col}")
        i += 1
    # Two defects: the first reason in the documented order wins.
    fx.add_bad({**fresh(i), "customer_id": None, "support_calls": -1}, "null_id:customer_id")
    i += 1
    # A malformed event of the hand-built entity: quarantined, so it must not reach its history.
    fx.add_bad({**fresh(i, HAND_ID), "event_ts": T0 + timedelta(days=402), "monthly_charges": -5.0},
               "negative_value:monthly_charges")
    i += 1
    # An exact duplicate of a malformed row: dropped as a duplicate, quarantined once.
    fx.rows.append(dict(fx.rows[-3]))
    fx.exact_dupes += 1
    order = rng.permutation(len(fx.rows))
    fx.rows = [fx.rows[j] for j in order]
    return fx


def write_fixture(fx: Fixture, directory: Path, files: int = 3, ts_unit: str = "us") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(fx.rows, columns=SOURCE)
    table = pa.Table.from_pandas(df, preserve_index=False, schema=pa.schema([
        ("customer_id", pa.string()), ("event_ts", pa.timestamp(ts_unit, tz="UTC")), ("churned", pa.int64()),
        *[(c, pa.float64() if c in ("monthly_charges", "total_charges", "data_usage_gb") else pa.int64())
          for c in NUMERIC],
        *[(c, pa.string()) for c in CATEGORICAL],
    ]))
    step = -(-table.num_rows // files)
    for k in range(files):
        pq.write_table(table.slice(k * step, step), directory / f"part-{k}.parquet")
    return directory


# ---------------------------------------------------------------- local runs


@dataclass
class LocalRun:
    fixture: Fixture
    out: Path
    result: tr.TransformResult
    splits: dict[str, pd.DataFrame]


def _outputs(out: Path) -> dict[str, str]:
    return {f"{s}_path": str(out / "task" / s) for s in tr.SPLITS} | {
        f"{s}_uri": f"file://{out / 'task' / s}" for s in tr.SPLITS}


def _run_local(settings: Settings, input_dir: Path, out: Path, spark_session: Any) -> tr.TransformResult:
    return tr.run_transform(settings, run_id="run-1", input_path=str(input_dir), input_uri=str(input_dir),
                            report_path=str(out / "task" / "report"), spark=spark_session, **_outputs(out))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> LocalRun:
    fx = build_fixture()
    root = tmp_path_factory.mktemp("transform")
    input_dir = write_fixture(fx, root / "input")
    result = _run_local(_settings(), input_dir, root, live_session())
    splits = {s: pd.read_parquet(root / "task" / s) for s in tr.SPLITS}
    return LocalRun(fx, root, result, splits)


def _all(run: LocalRun) -> pd.DataFrame:
    return pd.concat([run.splits[s].assign(_split=s) for s in tr.SPLITS], ignore_index=True)


@pytest.mark.spark
def test_dedup_and_quarantine_counts(local_run: LocalRun) -> None:
    fx, report = local_run.fixture, local_run.result.report
    assert report["input_rows"] == len(fx.rows)
    assert report["duplicates_dropped"] == {"exact": fx.exact_dupes, "same_id_timestamp": len(fx.twins)}
    assert report["quarantined"]["by_reason_column"] == dict(sorted(fx.bad.items()))
    by_reason: dict[str, int] = {}
    for key, n in fx.bad.items():
        by_reason[key.split(":")[0]] = by_reason.get(key.split(":")[0], 0) + n
    assert report["quarantined"]["by_reason"] == by_reason
    assert report["output_rows"] == len(fx.base_keys)
    kept = _all(local_run)
    assert len(kept) == len(fx.base_keys)
    assert set(zip(kept["customer_id"], kept["event_ts"], strict=True)) == fx.base_keys

    quarantine = pd.read_parquet(local_run.out / "task" / tr.QUARANTINE_DIR)
    assert len(quarantine) == sum(fx.bad.values())
    counted = (quarantine["_reason"] + ":" + quarantine["_reason_column"]).value_counts().to_dict()
    assert counted == fx.bad
    # Quarantined rows keep their source values: the negative values are still there to be inspected.
    neg = quarantine[quarantine["_reason"] == "negative_value"]
    assert (neg.apply(lambda r: r[r["_reason_column"]], axis=1) < 0).all()


@pytest.mark.spark
def test_same_key_duplicates_keep_the_first_row_by_the_other_columns(local_run: LocalRun) -> None:
    kept = _all(local_run).set_index(["customer_id", "event_ts"])
    originals = {(r["customer_id"], r["event_ts"]): r for r in local_run.fixture.rows
                 if r not in local_run.fixture.twins}
    for twin in local_run.fixture.twins:
        key = (twin["customer_id"], twin["event_ts"])
        orig = originals[key]
        # Same label, so the next column in output order (tenure_months) decides: the smaller one stays.
        assert twin["churned"] == orig["churned"]
        expected = min(twin["tenure_months"], orig["tenure_months"])
        assert kept.loc[key, "tenure_months"] == expected


@pytest.mark.spark
def test_temporal_split_is_ordered_and_sized(local_run: LocalRun) -> None:
    s = local_run.splits
    assert s["train"]["event_ts"].max() < s["valid"]["event_ts"].min()
    assert s["valid"]["event_ts"].max() < s["test"]["event_ts"].min()
    total = sum(len(df) for df in s.values())
    assert abs(len(s["valid"]) / total - 0.15) < 0.01
    assert abs(len(s["test"]) / total - 0.15) < 0.01
    report = local_run.result.report
    for name, df in s.items():
        r = report["splits"][name]
        assert r["rows"] == len(df)
        assert r["positive_rate"] == pytest.approx(df["churned"].mean())
        assert r["ts_min"] == df["event_ts"].min().isoformat().replace("+00:00", "Z")
        assert r["ts_max"] == df["event_ts"].max().isoformat().replace("+00:00", "Z")
    assert report["cut_points"]["valid_start"] == report["splits"]["valid"]["ts_min"]


@pytest.mark.spark
def test_history_of_the_hand_built_entity(local_run: LocalRun) -> None:
    df = _all(local_run)
    hand = df[df["customer_id"] == HAND_ID].sort_values("event_ts").reset_index(drop=True)
    events = local_run.fixture.hand
    assert list(hand["event_ts"]) == [pd.Timestamp(e["event_ts"]) for e in events]
    for i, e in enumerate(events):
        earlier = events[:i]
        row = hand.iloc[i]
        assert row["hist_prior_events"] == len(earlier)
        if earlier:
            gap = (e["event_ts"] - earlier[-1]["event_ts"]).total_seconds() / 86400
            assert row["hist_days_since_prior"] == pytest.approx(gap)
            for col in ("tenure_months", "monthly_charges", "total_charges"):
                mean = sum(x[col] for x in earlier) / len(earlier)
                assert row[f"hist_prior_mean_{col}"] == pytest.approx(mean)
        else:
            assert pd.isna(row["hist_days_since_prior"])
            assert pd.isna(row["hist_prior_mean_monthly_charges"])


@pytest.mark.spark
def test_history_uses_only_strictly_earlier_rows_everywhere(local_run: LocalRun) -> None:
    """An independent pandas computation of the same features over the kept rows."""
    df = _all(local_run).sort_values(["customer_id", "event_ts"]).reset_index(drop=True)
    g = df.groupby("customer_id", sort=False)
    assert (df["hist_prior_events"] == g.cumcount()).all()
    gap = (df["event_ts"] - g["event_ts"].shift()).dt.total_seconds() / 86400
    pd.testing.assert_series_equal(df["hist_days_since_prior"], gap, check_names=False)
    for col in ("tenure_months", "monthly_charges", "total_charges"):
        prior_sum = g[col].transform(lambda s: s.fillna(0).cumsum().shift())
        prior_n = g[col].transform(lambda s: s.notna().cumsum().shift())
        expected = (prior_sum / prior_n.where(prior_n > 0)).astype("float64")
        pd.testing.assert_series_equal(df[f"hist_prior_mean_{col}"], expected, check_names=False)


@pytest.mark.spark
def test_split_files_columns_types_and_spec(local_run: LocalRun) -> None:
    spec = local_run.result.spec
    expected_cols = [spec.id_column, spec.timestamp_column, spec.label_column, *spec.numeric,
                     *spec.categorical, *spec.derived]
    for split in tr.SPLITS:
        d = local_run.out / "task" / split
        schema = pq.read_schema(next(d.glob("*.parquet")))
        assert schema.names == expected_cols
        types = {f.name: f.type for f in schema}
        assert types["customer_id"] == pa.string()
        assert types["event_ts"] == pa.timestamp("us", tz="UTC")
        assert types["churned"] == pa.int32()
        for c in spec.model_numeric:
            assert types[c] == pa.float64(), c
        for c in spec.categorical:
            assert types[c] == pa.string(), c
        assert FeatureSpec.read(d) == spec
    assert spec.derived == ["hist_prior_events", "hist_days_since_prior", "hist_prior_mean_tenure_months",
                            "hist_prior_mean_monthly_charges", "hist_prior_mean_total_charges"]
    assert set(local_run.splits["train"]["churned"].unique()) <= {0, 1}


@pytest.mark.spark
def test_report_null_rates_and_markdown(local_run: LocalRun) -> None:
    df = _all(local_run)
    report = local_run.result.report
    for col, rate in report["null_rate"].items():
        assert rate == pytest.approx(df[col].isna().mean()), col
    assert report["null_rate"]["total_charges"] > 0
    md = (local_run.out / "task" / "report").read_text()
    assert md == local_run.result.markdown
    assert f"| exact duplicates dropped | {report['duplicates_dropped']['exact']} |" in md
    negatives = local_run.fixture.bad["negative_value:support_calls"]
    assert f"| negative_value | `support_calls` | {negatives} |" in md
    # The columns' roles, and where each came from (here: configured, not inferred).
    assert "| `churned` | label | configured (columns.label_column) |" in md
    assert "| `tenure_months` | numeric feature | configured (columns.numeric_features) |" in md
    saved = json.loads((local_run.out / "task" / tr.REPORT_JSON).read_text())
    assert saved == report
    meta = local_run.result.split_metadata("test")
    assert meta["row_count"] == len(local_run.splits["test"])
    assert meta["feature_spec"]["numeric"] == NUMERIC
    # Staging is cleaned up: only the published outputs remain in the task dir.
    assert sorted(p.name for p in (local_run.out / "task").iterdir()) == sorted(
        [*tr.SPLITS, tr.QUARANTINE_DIR, tr.REPORT_JSON, "report"])


def _small_rows(n: int = 40) -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    return [_row(rng, f"S{i % 7}", T0 + timedelta(hours=i)) for i in range(n)]


@pytest.mark.spark
def test_casts_strings_and_quarantines_unparseable_values(spark, tmp_path: Path) -> None:  # noqa: F811
    rows = _small_rows()
    df = pd.DataFrame(rows, columns=SOURCE)
    # The source stored these as text: the cast must read them, and quarantine what it cannot.
    df["tenure_months"] = df["tenure_months"].astype(str)
    df.loc[3, "tenure_months"] = "n/a"
    df["event_ts"] = df["event_ts"].dt.strftime("%Y-%m-%d %H:%M:%S")
    df.loc[5, "event_ts"] = "yesterday"
    df["churned"] = df["churned"].astype(str)
    df.loc[8, "churned"] = "yes"
    df.loc[9, "churned"] = "0.5"
    df.loc[11, "data_usage_gb"] = float("nan")
    (tmp_path / "in").mkdir()
    df.to_parquet(tmp_path / "in" / "a.parquet", index=False)
    result = _run_local(_settings(), tmp_path / "in", tmp_path, spark)
    assert result.report["quarantined"]["by_reason_column"] == {
        "invalid_label:churned": 1,
        "unparseable_value:churned": 1,
        "unparseable_value:event_ts": 1,
        "unparseable_value:tenure_months": 1,
    }
    out = pd.concat([pd.read_parquet(tmp_path / "task" / s) for s in tr.SPLITS])
    assert len(out) == len(rows) - 4
    kept = out.set_index("event_ts").sort_index()
    first = rows[0]
    assert kept.loc[pd.Timestamp(first["event_ts"]), "tenure_months"] == float(first["tenure_months"])
    assert kept["tenure_months"].dtype == "float64"
    # NaN is a missing value: null in the output, not a number.
    assert kept.loc[pd.Timestamp(rows[11]["event_ts"]), "data_usage_gb"] is None or pd.isna(
        kept.loc[pd.Timestamp(rows[11]["event_ts"]), "data_usage_gb"])
    assert result.report["null_rate"]["data_usage_gb"] == pytest.approx(out["data_usage_gb"].isna().mean())


@pytest.mark.spark
def test_conflicting_labels_for_one_key_are_quarantined(spark, tmp_path: Path) -> None:  # noqa: F811
    rows = _small_rows()
    flipped = {**rows[4], "churned": 1 - rows[4]["churned"], "tenure_months": rows[4]["tenure_months"] + 1}
    agreeing = {**rows[6], "tenure_months": rows[6]["tenure_months"] + 1}  # same label: deduplicated, kept
    invalid = {**rows[9], "churned": 7}  # a malformed twin does not make a conflict
    fx = Fixture(rows=[*rows, flipped, agreeing, invalid])
    write_fixture(fx, tmp_path / "in", files=1)
    result = _run_local(_settings(), tmp_path / "in", tmp_path, spark)
    assert result.report["quarantined"]["by_reason_column"] == {"conflicting_label:churned": 2,
                                                                "invalid_label:churned": 1}
    quarantine = pd.read_parquet(tmp_path / "task" / tr.QUARANTINE_DIR)
    conflicting = quarantine[quarantine[transform_job.REASON] == "conflicting_label"]
    assert sorted(conflicting["churned"]) == [0, 1]
    assert set(conflicting["event_ts"]) == {pd.Timestamp(rows[4]["event_ts"])}
    out = pd.concat([pd.read_parquet(tmp_path / "task" / s) for s in tr.SPLITS])
    assert pd.Timestamp(rows[4]["event_ts"]) not in set(out["event_ts"])
    assert len(out) == len(rows) - 1


@pytest.mark.spark
def test_nanosecond_timestamps_are_read(spark, tmp_path: Path) -> None:  # noqa: F811
    fx = Fixture(rows=_small_rows())
    write_fixture(fx, tmp_path / "in", files=1, ts_unit="ns")
    assert pq.read_schema(tmp_path / "in" / "part-0.parquet").field("event_ts").type.unit == "ns"
    result = _run_local(_settings(), tmp_path / "in", tmp_path, spark)
    out = pd.concat([pd.read_parquet(tmp_path / "task" / s) for s in tr.SPLITS])
    assert sorted(out["event_ts"]) == sorted(pd.Timestamp(r["event_ts"]) for r in fx.rows)
    assert result.report["output_rows"] == len(fx.rows)
    # The job left the shared session's settings as it found them.
    assert spark.conf.get("spark.sql.legacy.parquet.nanosAsLong", None) in (None, "false")


@pytest.mark.spark
def test_missing_feature_column_is_a_clear_error_and_writes_nothing(spark, tmp_path: Path) -> None:  # noqa: F811
    df = pd.DataFrame(_small_rows(), columns=SOURCE).drop(columns=["region"])
    (tmp_path / "in").mkdir()
    df.to_parquet(tmp_path / "in" / "a.parquet", index=False)
    with pytest.raises(DataValidationError, match=r"^input .*/in: .*\['region'\] not found in the data"):
        _run_local(_settings(), tmp_path / "in", tmp_path, spark)
    assert not (tmp_path / "task" / "train").exists()


def test_missing_role_column_is_a_clear_error(tmp_path: Path) -> None:
    df = pd.DataFrame(_small_rows(), columns=SOURCE).drop(columns=["churned"])
    (tmp_path / "in").mkdir()
    df.to_parquet(tmp_path / "in" / "a.parquet", index=False)
    with pytest.raises(DataValidationError,
                       match=r"missing column\(s\) \['churned'\] \(columns.label_column='churned'\)"):
        _run_local(_settings(), tmp_path / "in", tmp_path, None)


def test_empty_input_dir_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(DataValidationError, match="no \\*.parquet files"):
        _run_local(_settings(), tmp_path / "in", tmp_path, None)


@pytest.mark.spark
def test_job_checks_columns_itself(spark, tmp_path: Path) -> None:  # noqa: F811
    """The job runs alone on Dataproc: it names missing columns (expected vs found) without the component."""
    (tmp_path / "in").mkdir()
    pd.DataFrame(_small_rows(), columns=SOURCE).to_parquet(tmp_path / "in" / "a.parquet", index=False)
    spec = FeatureSpec("customer_id", "event_ts", "churned", ["tenure_months", "age"], ["region"])
    argv = tr.job_args(spec, ["tenure_months"], _settings(), input_uri=str(tmp_path / "in"),
                       outputs={s: str(tmp_path / s) for s in tr.SPLITS}, quarantine=str(tmp_path / "q"),
                       report=str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['age'\]; expected .*found"):
        transform_job.main(argv, spark=spark)


@pytest.mark.spark
def test_too_few_timestamps_for_a_split_is_an_error(spark, tmp_path: Path) -> None:  # noqa: F811
    rows = _small_rows(6)
    for r in rows:
        r["event_ts"] = T0  # one instant: everything lands in test
    (tmp_path / "in").mkdir()
    pd.DataFrame(rows, columns=SOURCE).to_parquet(tmp_path / "in" / "a.parquet", index=False)
    with pytest.raises(ValueError, match=r"left \['train', 'valid'\] empty"):
        _run_local(_settings(), tmp_path / "in", tmp_path, spark)
    assert not (tmp_path / "task" / "test").exists()


@pytest.mark.spark
def test_rerun_replaces_outputs_with_identical_rows(spark, local_run: LocalRun, tmp_path: Path) -> None:  # noqa: F811
    (local_run.out / "task" / "valid" / "stale.parquet").write_bytes(b"left by an earlier attempt")
    again = _run_local(_settings(), local_run.out / "input", local_run.out, spark)
    assert again.report == local_run.result.report
    assert not (local_run.out / "task" / "valid" / "stale.parquet").exists()
    for s in tr.SPLITS:
        new = pd.read_parquet(local_run.out / "task" / s).sort_values(["customer_id", "event_ts"])
        old = local_run.splits[s].sort_values(["customer_id", "event_ts"])
        pd.testing.assert_frame_equal(new.reset_index(drop=True), old.reset_index(drop=True))


@pytest.mark.spark
def test_report_to_a_uri_goes_through_hadoop_filesystem(spark, tmp_path: Path) -> None:  # noqa: F811
    fx = Fixture(rows=_small_rows())
    write_fixture(fx, tmp_path / "in", files=1)
    spec = resolve_feature_spec(_settings(), tr.read_column_types(str(tmp_path / "in")))
    argv = tr.job_args(spec, NUMERIC, _settings(), input_uri=f"file://{tmp_path / 'in'}",
                       outputs={s: f"file://{tmp_path / s}" for s in tr.SPLITS},
                       quarantine=f"file://{tmp_path / 'q'}", report=f"file://{tmp_path / 'r.json'}")
    report = transform_job.main(argv, spark=spark)
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert sorted(p.name for p in (tmp_path / "train").glob("*.parquet")) != []


@pytest.mark.spark
def test_rows_at_a_cut_point_go_to_the_later_split(spark, tmp_path: Path) -> None:  # noqa: F811
    rng = np.random.default_rng(5)
    tie = T0 + timedelta(hours=50)
    rows = [_row(rng, f"A{i}", T0 + timedelta(hours=i)) for i in range(50)]
    rows += [_row(rng, f"B{i}", tie) for i in range(30)]  # ranks 50-79: the 70% quantile falls in here
    rows += [_row(rng, f"C{i}", T0 + timedelta(hours=51 + i)) for i in range(20)]
    write_fixture(Fixture(rows=rows), tmp_path / "in", files=2)
    result = _run_local(_settings(), tmp_path / "in", tmp_path, spark)
    splits = {s: pd.read_parquet(tmp_path / "task" / s) for s in tr.SPLITS}
    assert result.report["cut_points"]["valid_start"] == tie.isoformat().replace("+00:00", "Z")
    assert sorted(splits["train"]["customer_id"]) == sorted(f"A{i}" for i in range(50))
    assert (splits["valid"]["event_ts"] == pd.Timestamp(tie)).sum() == 30
    assert len(splits["valid"]) + len(splits["test"]) == 50


@pytest.mark.spark
def test_history_never_sees_rows_at_the_same_instant(spark) -> None:  # noqa: F811
    """Even without the dedup in front of it, the history frame ends strictly before the row's own time."""
    spec = transform_job.JobSpec("id", "ts", "y", ["x"], [], transform_job.FeatureNames(**DERIVED_NAMES),
                                 history_means=["x"])
    t = T0
    df = spark.createDataFrame(
        [("a", t, 0, 1.0), ("a", t, 0, 3.0), ("a", t + timedelta(days=2), 1, 10.0), ("b", t, 0, 7.0)],
        "id string, ts timestamp, y int, x double")
    got = {(r["id"], r["x"]): r for r in transform_job.add_history(df, spec).collect()}
    for first in [("a", 1.0), ("a", 3.0), ("b", 7.0)]:
        assert got[first]["hist_prior_events"] == 0
        assert got[first]["hist_prior_mean_x"] is None
        assert got[first]["hist_days_since_prior"] is None
    third = got[("a", 10.0)]
    assert third["hist_prior_events"] == 2
    assert third["hist_prior_mean_x"] == pytest.approx(2.0)
    assert third["hist_days_since_prior"] == pytest.approx(2.0)


# ---------------------------------------------------------------- cloud backend (Dataproc over REST)

PARENT = "projects/ctloop-dev/locations/europe-west4"
BATCHES = f"/v1/{PARENT}/batches"
OPERATIONS = "projects/ctloop-dev/regions/europe-west4/operations"


def _cloud_clients(server: Any) -> tuple[Any, Any]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import dataproc_v1, storage

    batch = dataproc_v1.BatchControllerClient(transport="rest", credentials=AnonymousCredentials(),
                                              client_options={"api_endpoint": server.url})
    gcs = storage.Client(project="ctloop-dev", credentials=AnonymousCredentials(),
                         client_options={"api_endpoint": server.url})
    return batch, gcs


def _fake_report(spec: FeatureSpec) -> dict[str, Any]:
    """What a finished batch leaves at --report-out (shape of transform_job.build_report)."""
    split = {"rows": 10, "positives": 3, "positive_rate": 0.3, "ts_min": "2024-01-01T00:00:00Z",
             "ts_max": "2024-02-01T00:00:00Z"}
    return {
        "input": "gs://in", "input_rows": 35, "output_rows": 30,
        "duplicates_dropped": {"exact": 2, "same_id_timestamp": 1},
        "quarantined": {"rows": 2, "by_reason": {"null_id": 2},
                        "by_reason_column": {"null_id:customer_id": 2}},
        "fractions": {"valid": 0.15, "test": 0.15},
        "cut_points": {"valid_start": "2024-02-01T00:00:00Z", "test_start": "2024-03-01T00:00:00Z"},
        "splits": {s: dict(split) for s in tr.SPLITS},
        "null_rate": {c: 0.0 for c in spec.numeric + spec.categorical + spec.derived},
        "columns": [spec.id_column, spec.timestamp_column, spec.label_column, *spec.model_features],
    }


@dataclass
class CloudCase:
    settings: Settings
    kwargs: dict[str, Any]
    task: Path  # the task dir as the component sees it through /gcs/
    task_uri: str
    spec: FeatureSpec


@pytest.fixture
def cloud_case(tmp_path: Path) -> CloudCase:
    write_fixture(Fixture(rows=_small_rows(10)), tmp_path / "in", files=1)
    settings = _settings(backend="cloud", labels={"app": "ctloop", "env": "test"})
    task_uri = "gs://ctloop-dev-pipeline-root/runs/123/transform-456"
    task = tmp_path / "gcs" / "transform-456"
    kwargs = {
        "run_id": "ctloop-train-20240101-ABC", "input_path": str(tmp_path / "in"),
        "input_uri": "gs://ctloop-dev-pipeline-root/runs/123/extract-1/dataset",
        "report_path": str(task / "report"), "poll_seconds": 0.01, "timeout_seconds": 30,
        **{f"{s}_path": str(task / s) for s in tr.SPLITS},
        **{f"{s}_uri": f"{task_uri}/{s}" for s in tr.SPLITS},
    }
    spec = resolve_feature_spec(settings, tr.read_column_types(str(tmp_path / "in")))
    return CloudCase(settings, kwargs, task, task_uri, spec)


def _batch_states(server: Any, name_prefix: str, states: list[str], message: str = "",
                  on_success: Any = None) -> None:
    """GET batch answers each state in turn (the last repeats); ``on_success`` plays the batch's writes."""
    seen: list[str] = []

    def answer(req: Any) -> tuple[int, Any]:
        state = states[min(len(seen), len(states) - 1)]
        seen.append(state)
        if state == "SUCCEEDED" and on_success is not None:
            on_success()
        body = {"name": req.path.removeprefix("/v1/"), "state": state, "stateMessage": message,
                "runtimeInfo": {"outputUri": "gs://ctloop-dev-staging/driver-output"}}
        return 200, body

    server.route("GET", rf"{BATCHES}/{name_prefix}.*", answer)


def _route_gcs(server: Any, upload_status: int = 200) -> None:
    server.route("GET", r"/storage/v1/b/[^/]+", {"name": "ctloop-dev-staging"})
    server.route("POST", r"/upload/storage/v1/b/ctloop-dev-staging/o", (upload_status, {
        "name": "x", "bucket": "ctloop-dev-staging", "generation": "1"} if upload_status == 200 else {
        "error": {"code": upload_status, "message": "conditionNotMet"}}))


def _arg_pairs(args: list[str]) -> dict[str, str]:
    assert len(args) % 2 == 0
    return dict(zip(args[::2], args[1::2], strict=True))


def test_cloud_uploads_the_job_creates_the_batch_and_waits(recording_server, cloud_case: CloudCase) -> None:
    c = cloud_case
    batch_id = tr.batch_id_for(c.kwargs["run_id"])
    _route_gcs(recording_server)
    recording_server.route("POST", BATCHES, {"name": f"{OPERATIONS}/op-1"})
    report = _fake_report(c.spec)

    def batch_wrote_outputs() -> None:
        c.task.mkdir(parents=True, exist_ok=True)
        (c.task / tr.REPORT_JSON).write_text(json.dumps(report))

    _batch_states(recording_server, batch_id, ["PENDING", "RUNNING", "SUCCEEDED"],
                  on_success=batch_wrote_outputs)
    batch_client, gcs = _cloud_clients(recording_server)
    result = tr.run_transform(c.settings, batch_client=batch_client, storage_client=gcs, **c.kwargs)

    job = tr.JOB_FILE.read_bytes()
    object_name = f"ctloop/spark/{hashlib.sha256(job).hexdigest()[:16]}/transform_job.py"
    (upload,) = recording_server.find("POST", r"/upload/storage/v1/b/ctloop-dev-staging/o")
    assert upload.query["ifGenerationMatch"] == ["0"]
    assert f'"name": "{object_name}"'.encode() in upload.body
    assert job in upload.body

    (create,) = recording_server.find("POST", BATCHES)
    assert create.query["batchId"] == [batch_id]
    body = create.json
    assert body["pysparkBatch"]["mainPythonFileUri"] == f"gs://ctloop-dev-staging/{object_name}"
    args = _arg_pairs(body["pysparkBatch"]["args"])
    assert args["--input"] == c.kwargs["input_uri"]
    for s in tr.SPLITS:
        assert args[f"--{s}-out"] == f"{c.task_uri}/{s}"
    assert args["--quarantine-out"] == f"{c.task_uri}/quarantine"
    assert args["--report-out"] == f"{c.task_uri}/transform_report.json"
    assert FeatureSpec.from_json(args["--spec"]) == c.spec
    assert float(args["--valid-fraction"]) == c.settings.data.valid_fraction
    assert json.loads(args["--non-negative"]) == NUMERIC
    assert body["labels"] == {"app": "ctloop", "env": "test", "ctloop-step": "transform",
                              "ctloop-run": "ctloop-train-20240101-abc"}
    # The pinned runtime's own image: no custom container (it would have to leave Spark out).
    assert body["runtimeConfig"] == {"version": c.settings.gcp.dataproc_runtime_version}
    assert body["environmentConfig"]["executionConfig"]["serviceAccount"] == c.settings.gcp.service_account
    # The job parses the exact argument list it is given.
    parsed = transform_job.parse_args(body["pysparkBatch"]["args"])
    assert parsed.train_out == f"{c.task_uri}/train"

    assert len(recording_server.find("GET", rf"{BATCHES}/{batch_id}")) == 3
    assert result.batch_name == f"{PARENT}/batches/{batch_id}"
    assert result.report == report
    for s in tr.SPLITS:
        assert FeatureSpec.read(c.task / s) == c.spec
    assert (c.task / "report").read_text() == result.markdown
    assert "| null_id | `customer_id` | 2 |" in result.markdown


def test_cloud_job_upload_skips_an_existing_object(recording_server) -> None:
    _route_gcs(recording_server, upload_status=412)
    _, gcs = _cloud_clients(recording_server)
    uri = tr.upload_job_file(gcs, "ctloop-dev-staging")
    assert uri.startswith("gs://ctloop-dev-staging/ctloop/spark/") and uri.endswith("/transform_job.py")
    assert len(recording_server.find("POST", r"/upload/storage/v1/b/ctloop-dev-staging/o")) == 1


def test_cloud_conflict_waits_on_the_existing_batch(recording_server, cloud_case: CloudCase) -> None:
    c = cloud_case
    batch_id = tr.batch_id_for(c.kwargs["run_id"])
    _route_gcs(recording_server)
    recording_server.route("POST", BATCHES, (409, {"error": {"code": 409, "message": "Batch already exists",
                                                             "status": "ALREADY_EXISTS"}}))
    c.task.mkdir(parents=True)
    (c.task / tr.REPORT_JSON).write_text(json.dumps(_fake_report(c.spec)))
    _batch_states(recording_server, batch_id, ["RUNNING", "SUCCEEDED"])
    batch_client, gcs = _cloud_clients(recording_server)
    result = tr.run_transform(c.settings, batch_client=batch_client, storage_client=gcs, **c.kwargs)
    assert [r.query["batchId"] for r in recording_server.find("POST", BATCHES)] == [[batch_id]]
    assert result.batch_name.endswith(f"/batches/{batch_id}")
    assert FeatureSpec.read(c.task / "test") == c.spec


def test_cloud_conflict_with_a_failed_batch_starts_the_next_attempt(recording_server,
                                                                    cloud_case: CloudCase) -> None:
    c = cloud_case
    first, second = tr.batch_id_for(c.kwargs["run_id"]), tr.batch_id_for(c.kwargs["run_id"], attempt=2)

    def create(req: Any) -> tuple[int, Any]:
        if req.query["batchId"] == [first]:
            return 409, {"error": {"code": 409, "message": "exists", "status": "ALREADY_EXISTS"}}
        return 200, {"name": f"{OPERATIONS}/op-2"}

    _route_gcs(recording_server)
    recording_server.route("POST", BATCHES, create)
    _batch_states(recording_server, first, ["FAILED"], message="earlier attempt failed")
    _batch_states(recording_server, second, ["SUCCEEDED"])
    c.task.mkdir(parents=True)
    (c.task / tr.REPORT_JSON).write_text(json.dumps(_fake_report(c.spec)))
    batch_client, gcs = _cloud_clients(recording_server)
    result = tr.run_transform(c.settings, batch_client=batch_client, storage_client=gcs, **c.kwargs)
    assert [r.query["batchId"] for r in recording_server.find("POST", BATCHES)] == [[first], [second]]
    assert result.batch_name.endswith(f"/batches/{second}")


def test_cloud_failed_batch_raises_its_state_message(recording_server, cloud_case: CloudCase) -> None:
    c = cloud_case
    batch_id = tr.batch_id_for(c.kwargs["run_id"])
    _route_gcs(recording_server)
    recording_server.route("POST", BATCHES, {"name": f"{OPERATIONS}/op-3"})
    message = "Job failed with message [ValueError: input gs://x: missing column(s) ['region']]"
    _batch_states(recording_server, batch_id, ["RUNNING", "FAILED"], message=message)
    batch_client, gcs = _cloud_clients(recording_server)
    with pytest.raises(tr.DataprocBatchError) as err:
        tr.run_transform(c.settings, batch_client=batch_client, storage_client=gcs, **c.kwargs)
    assert message in str(err.value)
    assert f"batches/{batch_id} FAILED" in str(err.value)
    assert "gs://ctloop-dev-staging/driver-output" in str(err.value)
    assert not (c.task / "report").exists()
    assert not (c.task / "train").exists()


def test_wait_for_batch_times_out(recording_server) -> None:
    _batch_states(recording_server, "slow", ["RUNNING"])
    batch_client, _ = _cloud_clients(recording_server)
    with pytest.raises(TimeoutError, match="still RUNNING"):
        tr.wait_for_batch(batch_client, f"{PARENT}/batches/slow", poll_seconds=0.01, timeout_seconds=0.05)


@pytest.mark.parametrize("run_id", ["r", "ctloop-train-1", "Run_ID With Spaces/and:colons", "x" * 200,
                                    "-leading-and-trailing-", "ÜNICODE-run"])
def test_batch_ids_are_valid_and_deterministic(run_id: str) -> None:
    ids = [tr.batch_id_for(run_id, attempt) for attempt in (1, 2, 10)]
    for batch_id in ids:
        assert re.fullmatch(r"[a-z][a-z0-9-]{2,61}[a-z0-9]", batch_id), batch_id
        assert "--" not in batch_id
    assert len(set(ids)) == 3
    assert tr.batch_id_for(run_id) == ids[0]
    assert tr.batch_id_for(run_id + "!") != ids[0]  # same slug, different run: different batch


def test_cloud_rejects_non_gcs_artifact_uris(cloud_case: CloudCase) -> None:
    kwargs = {**cloud_case.kwargs, "train_uri": "/local/train"}
    with pytest.raises(ValueError, match=r"train artifact URI must be gs://"):
        tr.run_transform(cloud_case.settings, batch_client=object(), storage_client=object(), **kwargs)


# ---------------------------------------------------------------- the KFP component under the local runner


@pytest.mark.spark
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_component_runs_under_the_kfp_local_runner(tmp_path: Path) -> None:
    from kfp import dsl, local
    from kfp.dsl import Dataset

    input_dir = write_fixture(build_fixture(entities=60), tmp_path / "input")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))

    @dsl.pipeline(name="transform-only")
    def only_transform(config: dict, run_id: str, uri: str):
        data = dsl.importer(artifact_uri=uri, artifact_class=Dataset, reimport=False,
                            metadata={"checksum": "sha256:abc", "source_table": "p.ctloop.events"})
        tr.transform(config=config, run_id=run_id, dataset=data.output)

    only_transform(config=_settings().to_param(), run_id="kfp-run-1", uri=str(input_dir))
    (task,) = list((tmp_path / "root").glob("transform-only-*/transform"))
    report = json.loads((task / tr.REPORT_JSON).read_text())
    executor = json.loads((task / "executor_output.json").read_text())
    artifacts = executor["artifacts"]
    for s in tr.SPLITS:
        (meta,) = [a["metadata"] for a in artifacts[s]["artifacts"]]
        assert meta["row_count"] == report["splits"][s]["rows"] == len(pd.read_parquet(task / s))
        assert meta["run_id"] == "kfp-run-1"
        assert meta["source"] == str(input_dir)
        assert (meta["source_checksum"], meta["source_table"]) == ("sha256:abc", "p.ctloop.events")
        assert meta["feature_spec"] == json.loads(FeatureSpec.read(task / s).to_json())
    (report_meta,) = [a["metadata"] for a in artifacts["report"]["artifacts"]]
    assert report_meta["quarantined"] == report["quarantined"]["rows"]
    assert (task / "report").read_text().startswith("# Transform data quality (run `kfp-run-1`)")


@pytest.mark.spark
def test_non_negative_columns_come_from_settings(spark, tmp_path: Path) -> None:  # noqa: F811
    rows = _small_rows()
    rows[4]["monthly_charges"] = -5.0  # a refund: allowed once the setting says so
    rows[6]["support_calls"] = -1
    write_fixture(Fixture(rows=rows), tmp_path / "in", files=1)
    settings = _settings(**{"columns.non_negative": ["support_calls"]})
    result = _run_local(settings, tmp_path / "in", tmp_path, spark)
    assert result.report["quarantined"]["by_reason_column"] == {"negative_value:support_calls": 1}
    out = pd.concat([pd.read_parquet(tmp_path / "task" / s) for s in tr.SPLITS])
    assert (out["monthly_charges"] == -5.0).sum() == 1


def test_non_negative_must_name_numeric_features(tmp_path: Path) -> None:
    write_fixture(Fixture(rows=_small_rows(5)), tmp_path / "in", files=1)
    with pytest.raises(ValueError, match=r"columns.non_negative: \['region'\] are not numeric features"):
        _run_local(_settings(**{"columns.non_negative": ["region"]}), tmp_path / "in", tmp_path, None)


# ---- the Spark Dataproc runs is the Spark the local tests run ------------------------------------------------


def test_pinned_dataproc_runtime_runs_the_local_spark_major(spark) -> None:  # noqa: F811
    import pyspark

    runtime = Settings().gcp.dataproc_runtime_version
    cloud_major = DATAPROC_RUNTIME_SPARK[runtime].split(".")[0]
    assert pyspark.__version__.split(".")[0] == cloud_major, (
        f"Dataproc runtime {runtime} runs Spark {DATAPROC_RUNTIME_SPARK[runtime]}, pyspark is {pyspark.__version__}")
    assert spark.version.split(".")[0] == cloud_major
    # Spark 4 turns ANSI mode on by default, on both sides; the job is tested under it.
    assert spark.conf.get("spark.sql.ansi.enabled") == "true"


def test_unknown_dataproc_runtime_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match=r"gcp.dataproc_runtime_version: expected one of .*found '9.9'"):
        Settings().with_overrides(["gcp.dataproc_runtime_version=9.9"])
    # Unquoted in YAML, a version reads as a number: still the same setting.
    assert Settings().with_overrides(["gcp.dataproc_runtime_version=2.2"]).gcp.dataproc_runtime_version == "2.2"


def test_the_job_needs_only_pyspark_and_the_standard_library() -> None:
    """What lets the batch run on Dataproc's runtime image without a custom container."""
    tree = ast.parse(tr.JOB_FILE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported, "no imports found: the check would pass vacuously"
    assert sorted(imported - sys.stdlib_module_names - {"pyspark"}) == []
