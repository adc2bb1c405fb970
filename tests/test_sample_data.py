"""The sample data: layout, schema, the dirt it carries, determinism, learnability and drift."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from ctloop.config import Settings, load_settings
from devtools.sample_data import SampleDataResult, generate_part, write_sample_data

REPO = Path(__file__).resolve().parents[1]
START, END = "2024-01-01T00:00:00Z", "2025-07-01T00:00:00Z"
PART_ROWS = 25_000
CATEGORICAL = ["contract_type", "payment_method", "internet_service", "region"]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(REPO / "ctloop.yaml")


@pytest.fixture(scope="module")
def base(tmp_path_factory: Any, settings: Settings) -> tuple[SampleDataResult, pd.DataFrame]:
    landing = tmp_path_factory.mktemp("landing")
    result = write_sample_data(landing, settings, rows=60_000, start=START, end=END, rows_per_file=PART_ROWS)
    return result, pq.read_table(result.batch_dir).to_pandas()


@pytest.fixture(scope="module")
def base_model(base: tuple[SampleDataResult, pd.DataFrame], settings: Settings) -> tuple[Any, float]:
    """Gradient boosting fitted on the first 70% (by time) of the base batch, and its AUC on the rest."""
    ok = _labelled(base[1]).sort_values("event_ts")
    split = int(len(ok) * 0.7)
    train, test = ok.iloc[:split], ok.iloc[split:]
    model = HistGradientBoostingClassifier(categorical_features="from_dtype", max_iter=80, random_state=0)
    # One OpenMP thread: on a busy 2-core machine more threads make this ~20x slower, not faster.
    with threadpool_limits(1):
        model.fit(_features(train, settings), train["churned"])
    return model, _auc(model, test, settings)


def _auc(model: Any, df: pd.DataFrame, settings: Settings) -> float:
    with threadpool_limits(1):
        return float(roc_auc_score(df["churned"], model.predict_proba(_features(df, settings))[:, 1]))


def _features(df: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    x = df[settings.columns.numeric_features + settings.columns.categorical_features].copy()
    for c in settings.columns.categorical_features:
        x[c] = x[c].astype("category")
    return x


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["churned"].isin([0, 1]) & df["customer_id"].notna() & df["event_ts"].notna()
              & (df["monthly_charges"] >= 0)]


def test_layout_and_schema_follow_the_settings(base: tuple[SampleDataResult, pd.DataFrame],
                                               settings: Settings):
    result, _ = base
    table_dir = result.batch_dir.parent
    assert result.batch_dir == table_dir / "base"
    assert table_dir.parts[-2:] == (settings.data.bq_dataset, settings.data.bq_table)
    assert [p.name for p in sorted(result.batch_dir.iterdir())] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(p).num_rows for p in result.paths] == [25_000, 25_000, 10_000]
    schema = pq.read_schema(result.paths[0])
    cols = settings.columns
    expected = [cols.id_column, cols.timestamp_column, *cols.numeric_features, *cols.categorical_features,
                cols.label_column]
    assert sorted(schema.names) == sorted(expected)
    # Time zone aware: Spark reads it as TIMESTAMP (UTC), not TIMESTAMP_NTZ.
    assert schema.field("event_ts").type == pa.timestamp("us", tz="UTC")
    assert schema.field("customer_id").type == pa.string()
    for name in ("tenure_months", "support_calls", "late_payments", "churned"):
        assert schema.field(name).type == pa.int64(), name
    for name in ("monthly_charges", "total_charges", "data_usage_gb", "satisfaction_score"):
        assert schema.field(name).type == pa.float64(), name
    for name in CATEGORICAL:
        assert schema.field(name).type == pa.string(), name


def test_values_look_like_the_churn_feed(base: tuple[SampleDataResult, pd.DataFrame]):
    result, df = base
    assert len(df) == result.rows == 60_000
    ok = _labelled(df)
    assert df["customer_id"].dropna().str.fullmatch(r"C\d{7}").all()
    assert ok["event_ts"].min() >= pd.Timestamp(START) and ok["event_ts"].max() < pd.Timestamp(END)
    assert (ok["event_ts"].max() - ok["event_ts"].min()).days > 500  # spread over the ~18 months
    assert set(df["contract_type"].dropna()) == {"month-to-month", "one-year", "two-year"}
    assert df["satisfaction_score"].dropna().between(1, 5).all()
    assert (ok["tenure_months"].dropna() >= 0).all()
    # Several features have missing values, the label never does.
    missing = df.isna().mean()
    assert (missing[["tenure_months", "total_charges", "data_usage_gb", "satisfaction_score",
                     "payment_method"]] > 0.005).all()
    assert missing["churned"] == 0
    # Customers recur, and a customer's contract stays the same across their events (no drift here).
    events = ok.groupby("customer_id").size()
    assert events.median() >= 5 and result.customers == 60_000 // 8
    assert (ok.groupby("customer_id")["contract_type"].nunique() == 1).all()


def test_counts_match_the_dirt_in_the_files(base: tuple[SampleDataResult, pd.DataFrame]):
    result, df = base
    duplicates = int(df.duplicated(keep="first").sum())
    assert duplicates == result.duplicate_rows == round(25_000 * 0.005) * 2 + round(10_000 * 0.005)
    unique = df.drop_duplicates()
    kinds = {
        "null id": unique["customer_id"].isna(),
        "null timestamp": unique["event_ts"].isna(),
        "label outside {0, 1}": ~unique["churned"].isin([0, 1]),
        "negative monthly_charges": unique["monthly_charges"] < 0,
    }
    for name, mask in kinds.items():
        assert mask.sum() > 0, name
    assert sum(int(m.sum()) for m in kinds.values()) == result.malformed_rows
    assert 0.0015 < result.malformed_rows / len(df) < 0.0025
    assert set(unique.loc[kinds["label outside {0, 1}"], "churned"]) <= {2, -1}
    labels = df["churned"][df["churned"].isin([0, 1])]
    assert result.positives == int(labels.sum())
    assert result.positive_rate == pytest.approx(labels.mean())
    assert 0.15 <= result.positive_rate <= 0.25


def test_same_arguments_same_files_and_any_part_alone(tmp_path: Path, settings: Settings,
                                                      base: tuple[SampleDataResult, pd.DataFrame]):
    result, _ = base
    again = write_sample_data(tmp_path, settings, rows=60_000, start=START, end=END, rows_per_file=PART_ROWS)
    for a, b in zip(result.paths, again.paths, strict=True):
        assert a.read_bytes() == b.read_bytes()
    # Parts do not depend on the loop: the last part generated on its own equals the written file.
    alone = generate_part(settings, 2, rows=60_000, start=START, end=END, rows_per_file=PART_ROWS)
    assert alone.equals(pq.read_table(result.paths[2]))
    other = write_sample_data(tmp_path, settings, rows=60_000, seed=8, start=START, end=END, batch="seed8",
                              rows_per_file=PART_ROWS)
    assert not pq.read_table(other.paths[0]).equals(pq.read_table(result.paths[0]))


def test_rewrite_removes_stale_parts_and_leaves_no_temp_files(tmp_path: Path, settings: Settings):
    big = write_sample_data(tmp_path, settings, rows=3_000, start=START, end=END, rows_per_file=1_000)
    assert big.files == 3
    small = write_sample_data(tmp_path, settings, rows=1_500, start=START, end=END, rows_per_file=1_000)
    assert sorted(p.name for p in small.batch_dir.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert pq.read_table(small.batch_dir).num_rows == 1_500


def test_a_model_learns_the_label(base_model: tuple[Any, float]):
    _, auc = base_model
    assert auc >= 0.75


def test_drift_shifts_features_and_the_label_relation(tmp_path: Path, settings: Settings,
                                                      base: tuple[SampleDataResult, pd.DataFrame],
                                                      base_model: tuple[Any, float]):
    _, before = base
    drifted = write_sample_data(tmp_path, settings, rows=30_000, drift=1.0, batch="drift",
                                start="2025-07-01T00:00:00Z", end="2026-01-01T00:00:00Z")
    assert 0.15 <= drifted.positive_rate <= 0.25
    after = pq.read_table(drifted.batch_dir).to_pandas()
    b, a = _labelled(before), _labelled(after)
    assert a["monthly_charges"].mean() > b["monthly_charges"].mean() * 1.15
    share = (a["contract_type"] == "month-to-month").mean() - (b["contract_type"] == "month-to-month").mean()
    assert share > 0.15
    # Which features drive churn changes: support calls matter less, region more.
    def gap(df: pd.DataFrame, mask: pd.Series) -> float:
        return df.loc[mask, "churned"].mean() - df.loc[~mask, "churned"].mean()
    assert gap(b, b["support_calls"] >= 3) > gap(a, a["support_calls"] >= 3) + 0.1
    assert gap(a, a["region"] == "south") > gap(b, b["region"] == "south") + 0.1
    # A model fitted before the drift does worse after it than on its own period.
    model, same = base_model
    assert _auc(model, a, settings) < same - 0.03


def test_concept_drift_changes_the_label_relation_only(tmp_path: Path, settings: Settings,
                                                       base_model: tuple[Any, float]):
    window = {"rows": 30_000, "start": "2025-07-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}
    plain = write_sample_data(tmp_path / "plain", settings, **window)
    concept = write_sample_data(tmp_path / "concept", settings, concept_drift=1.0, **window)
    b, a = (_labelled(pq.read_table(r.batch_dir).to_pandas()) for r in (plain, concept))
    inputs = [c for c in b.columns if c != settings.columns.label_column]
    # The same seed, batch and size: every input is identical row for row, only labels differ.
    pd.testing.assert_frame_equal(b[inputs].reset_index(drop=True), a[inputs].reset_index(drop=True))
    assert concept.concept_drift == 1.0 and (b["churned"] != a["churned"]).mean() > 0.1

    def gap(df: pd.DataFrame, mask: pd.Series) -> float:
        return df.loc[mask, "churned"].mean() - df.loc[~mask, "churned"].mean()
    assert gap(b, b["support_calls"] >= 3) > gap(a, a["support_calls"] >= 3) + 0.1
    assert gap(a, a["region"] == "south") > gap(b, b["region"] == "south") + 0.1
    model, same = base_model
    assert _auc(model, a, settings) < same - 0.05


def test_tenure_is_stationary_over_the_window(base: tuple[SampleDataResult, pd.DataFrame]):
    _, frame = base
    ok = _labelled(frame).sort_values("event_ts")
    early, late = ok.iloc[: len(ok) // 4], ok.iloc[-len(ok) // 4:]
    # Customers age, but they leave and are replaced: the tenure distribution stays put.
    assert abs(early["tenure_months"].mean() - late["tenure_months"].mean()) < 1.5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rows": 0}, "rows must be >= 1, found 0"),
    ({"concept_drift": -0.1}, "concept_drift must be within [0, 1], found -0.1"),
    ({"drift": 1.5}, "drift must be within [0, 1], found 1.5"),
    ({"seed": -1}, "seed must be >= 0, found -1"),
    ({"batch": "../x"}, "batch must be a plain folder name"),
    ({"start": "2025-01-01", "end": "2024-01-01"}, "must be after start"),
    ({"start": "last tuesday"}, "start 'last tuesday' is not an ISO timestamp"),
])
def test_bad_arguments_are_named(tmp_path: Path, settings: Settings, kwargs: dict, message: str):
    with pytest.raises(ValueError) as err:
        write_sample_data(tmp_path, settings, **{"rows": 100, **kwargs})
    assert message in str(err.value)
    assert not any(tmp_path.rglob("*.parquet"))


def test_default_window_covers_the_last_18_months(tmp_path: Path, settings: Settings):
    result = write_sample_data(tmp_path, settings, rows=500)
    now = datetime.now(UTC)
    assert result.end == datetime(now.year, now.month, 1, tzinfo=UTC)
    assert 540 <= (result.end - result.start).days <= 550
    ts = pq.read_table(result.batch_dir).column("event_ts").drop_null().to_numpy()
    assert ts.min() >= np.datetime64(result.start.replace(tzinfo=None))


def test_100k_rows_land_as_one_file(tmp_path: Path, settings: Settings):
    result = write_sample_data(tmp_path, settings, rows=100_000, start=START, end=END)
    assert result.rows == 100_000 and result.files == 1
    assert pq.read_table(result.batch_dir).num_rows == 100_000
