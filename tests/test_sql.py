"""SQL templates: rendering with validated values, and each BigQuery-ism of extract.sql run on DuckDB."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot

from ctloop.errors import SqlError
from ctloop.sql import (
    duckdb_connect,
    load_template,
    register_parquet_table,
    render_sql,
    transpile_for_duckdb,
)

WINDOW_END = datetime(2025, 7, 1, tzinfo=UTC)
PARAMS = {
    "source_table": "ctloop-dev.ctloop.events",
    "id_column": "customer_id",
    "timestamp_column": "event_ts",
    "window_end": "2025-07-01T00:00:00Z",
    "window_days": 30,
}

GOLDEN_DUCKDB = """\
WITH windowed AS (
  SELECT
    source_row.*,
    CAST(TO_JSON(source_row) AS TEXT) AS _ctloop_row_key
  FROM "ctloop"."events" AS source_row
  WHERE
    source_row."event_ts" IS NULL
    OR (
      source_row."event_ts" >= (
        CAST('2025-07-01 00:00:00+00:00' AS TIMESTAMPTZ) - INTERVAL '30' DAY
      )
      AND source_row."event_ts" < CAST('2025-07-01 00:00:00+00:00' AS TIMESTAMPTZ)
    )
)
SELECT
  *
  EXCLUDE (_ctloop_row_key)
FROM windowed
WHERE
  TRUE
QUALIFY
  ROW_NUMBER() OVER (PARTITION BY "customer_id", "event_ts", _ctloop_row_key) = 1"""


def _extract_sql(**overrides: object) -> str:
    source, template = load_template("extract.sql")
    return render_sql(template, {**PARAMS, **overrides}, source=source)


def test_extract_sql_renders_bigquery_isms_with_literals():
    sql = _extract_sql()
    assert "FROM `ctloop-dev.ctloop.events` AS source_row" in sql
    assert ("TIMESTAMP_SUB(TIMESTAMP '2025-07-01 00:00:00+00:00', INTERVAL 30 DAY)") in sql
    assert "SELECT * EXCEPT (_ctloop_row_key)" in sql
    assert "QUALIFY ROW_NUMBER() OVER (PARTITION BY `customer_id`, `event_ts`, _ctloop_row_key) = 1" in sql
    assert "{{" not in sql and "}}" not in sql


def test_extract_sql_transpiles_to_the_pinned_duckdb_text():
    assert transpile_for_duckdb(_extract_sql()) == GOLDEN_DUCKDB


@pytest.mark.parametrize(("value", "literal"), [
    ("2025-07-01T02:30:00+02:00", "TIMESTAMP '2025-07-01 00:30:00+00:00'"),
    ("2025-07-01T00:00:00", "TIMESTAMP '2025-07-01 00:00:00+00:00'"),  # no offset: UTC
    (datetime(2025, 7, 1, 0, 0, 0, 250, tzinfo=UTC), "TIMESTAMP '2025-07-01 00:00:00.000250+00:00'"),
    (datetime(2025, 6, 30, 20, 0, tzinfo=timezone(timedelta(hours=-5))),
     "TIMESTAMP '2025-07-01 01:00:00+00:00'"),
])
def test_timestamps_render_as_utc_literals(value: object, literal: str):
    assert render_sql("SELECT {{ timestamp:t }}", {"t": value}) == f"SELECT {literal}"


@pytest.mark.parametrize(("template", "params", "message"), [
    ("SELECT 1 FROM {{ table:t }}", {"t": "ctloop-dev.ctloop.events`; DROP TABLE x; --"},
     "placeholder 't' (table): expected a plain table name"),
    ("SELECT 1 FROM {{ table:t }}", {"t": "ctloop.events"},
     "expected 'project.dataset.table', found 'ctloop.events'"),
    ("SELECT 1 FROM {{ table:t }}", {"t": "Bad_Project.d.t"}, "expected a GCP project id"),
    ("SELECT {{ ident:c }}", {"c": "a b"}, "placeholder 'c' (ident): expected a plain column name"),
    ("SELECT {{ ident:c }}", {"c": "x`y"},
     "expected a plain column name [A-Za-z_][A-Za-z0-9_]*, found 'x`y'"),
    ("SELECT {{ int:n }}", {"n": True}, "placeholder 'n' (int): expected an int, found bool True"),
    ("SELECT {{ int:n }}", {"n": "30"}, "expected an int, found str '30'"),
    ("SELECT {{ timestamp:t }}", {"t": "yesterday"}, "expected an ISO 8601 timestamp, found 'yesterday'"),
    ("SELECT {{ timestamp:t }}", {"t": 1751328000}, "expected a datetime or ISO 8601 string, found int"),
    ("SELECT {{ ident:c }}", {}, "no value for placeholder 'c' (ident); given []"),
    ("SELECT {{ column:c }}", {"c": "x"}, "unknown kind 'column'; expected one of ['ident', 'int', 'table'"),
    ("SELECT 1\nFROM {{ ident:c }", {"c": "x"}, "q.sql:2: malformed placeholder"),
    ("SELECT {{c}}", {"c": "x"}, "q.sql:1: malformed placeholder"),
])
def test_bad_values_and_templates_are_named(template: str, params: dict, message: str):
    with pytest.raises(SqlError) as err:
        render_sql(template, params, source="q.sql")
    assert message in str(err.value)
    assert str(err.value).startswith("q.sql")


def test_templates_load_by_name_or_absolute_path(tmp_path: Path):
    source, text = load_template("extract.sql")
    assert source.endswith("ctloop/queries/extract.sql") and "QUALIFY" in text
    mine = tmp_path / "mine.sql"
    mine.write_text("SELECT 1")
    assert load_template(str(mine)) == (str(mine), "SELECT 1")
    with pytest.raises(SqlError, match=r"data.query_file: SQL template .*nope.sql does not exist"):
        load_template("nope.sql")


# ---- transpiling: what is refused, and why --------------------------------------------------------------

@pytest.mark.parametrize(("sql", "construct"), [
    ("SELECT EXTRACT(DAYOFWEEK FROM d) AS dow FROM t", "EXTRACT(DAYOFWEEK ...): BigQuery counts Sunday as 1"),
    ("SELECT DATE_TRUNC(d, MONTH) AS m FROM t",
     "DATE_TRUNC(...): BigQuery returns a DATE, DuckDB a TIMESTAMP"),
    ("SELECT ARRAY_AGG(x LIMIT 2) AS xs FROM t", "ARRAY_AGG(... LIMIT n)"),
    ("SELECT ARRAY_AGG(x ORDER BY y LIMIT 2) AS xs FROM t", "ARRAY_AGG(... LIMIT n)"),
])
def test_mistranslating_constructs_are_refused_by_name(sql: str, construct: str):
    with pytest.raises(SqlError) as err:
        transpile_for_duckdb(sql)
    assert construct in str(err.value)


def test_the_refusals_are_real_differences_on_duckdb():
    """Plain sqlglot output runs on DuckDB with another meaning (or not at all): why the guard exists."""
    con = duckdb_connect()
    sunday = "SELECT EXTRACT(DAYOFWEEK FROM DATE '2024-06-02') AS dow"  # BigQuery: 1
    assert con.execute(sqlglot.transpile(sunday, read="bigquery", write="duckdb")[0]).fetchone() == (0,)
    trunc = "SELECT DATE_TRUNC(DATE '2024-06-15', MONTH) AS m"  # BigQuery: DATE 2024-06-01
    duck = sqlglot.transpile(trunc, read="bigquery", write="duckdb")[0]
    assert con.execute(f"SELECT typeof(m) FROM ({duck})").fetchone() == ("TIMESTAMP",)
    agg = "SELECT ARRAY_AGG(x LIMIT 2) AS xs FROM UNNEST([1, 2, 3]) AS x"
    with pytest.raises(Exception, match="syntax error"):
        con.execute(sqlglot.transpile(agg, read="bigquery", write="duckdb")[0])


@pytest.mark.parametrize(("sql", "message"), [
    ("SELECT 1; SELECT 2", "expected exactly one SELECT query, found 2 statement(s)"),
    ("DELETE FROM `ctloop-dev.ctloop.events` WHERE TRUE", "found 1 statement(s) ['Delete']"),
    ("SELECT (", "BigQuery SQL does not parse at line 1, column 8"),
])
def test_only_one_parsable_query_is_accepted(sql: str, message: str):
    with pytest.raises(SqlError) as err:
        transpile_for_duckdb(sql)
    assert message in str(err.value)


def test_the_project_is_dropped_from_every_table_reference():
    duck = transpile_for_duckdb(
        "SELECT a FROM `ctloop-dev.ctloop.events` AS e JOIN `ctloop-dev.ctloop.more` USING (a)")
    assert '"ctloop"."events" AS e' in duck and 'JOIN "ctloop"."more"' in duck and "ctloop-dev" not in duck


# ---- each BigQuery-ism of extract.sql, run on DuckDB over real Parquet ----------------------------------

def _write_table(root: Path, rows: list[dict], batch: str = "b1") -> None:
    schema = pa.schema([("customer_id", pa.string()), ("event_ts", pa.timestamp("us", tz="UTC")),
                        ("amount", pa.float64()), ("churned", pa.int64())])
    folder = root / "ctloop" / "events" / batch
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-00000.parquet")


def _run(root: Path, sql: str) -> list[tuple]:
    con = duckdb_connect()
    register_parquet_table(con, "ctloop", "events", str(root / "ctloop" / "events" / "**" / "*.parquet"))
    return con.execute(transpile_for_duckdb(sql)).fetchall()


def _row(cid: str | None, ts: datetime | None, amount: float = 1.0, churned: int = 0) -> dict:
    return {"customer_id": cid, "event_ts": ts, "amount": amount, "churned": churned}


def test_backticked_table_reads_every_batch_of_the_landing_table(tmp_path: Path):
    _write_table(tmp_path, [_row("a", WINDOW_END)], batch="b1")
    _write_table(tmp_path, [_row("b", WINDOW_END), _row("c", WINDOW_END)], batch="b2")
    assert _run(tmp_path, "SELECT COUNT(*) FROM `ctloop-dev.ctloop.events`") == [(3,)]


def test_timestamp_sub_window_is_half_open_in_utc(tmp_path: Path):
    start = WINDOW_END - timedelta(days=30)
    us = timedelta(microseconds=1)
    cases = {"before start": start - us, "at start": start, "inside": start + timedelta(days=3),
             "just before end": WINDOW_END - us, "at end": WINDOW_END,
             "after end": WINDOW_END + timedelta(days=1)}
    _write_table(tmp_path, [_row(name, ts) for name, ts in cases.items()] + [_row("no timestamp", None)])
    rows = _run(tmp_path, _extract_sql())
    assert sorted(r[0] for r in rows) == ["at start", "inside", "just before end", "no timestamp"]
    # Timestamps come back as UTC instants, unchanged.
    assert {r[0]: r[1] for r in rows}["at start"] == start


def test_timestamp_sub_counts_days_of_24_hours_across_a_dst_change(tmp_path: Path):
    # Europe's clocks went forward on 2025-03-30. BigQuery's day interval is 24 h; so is DuckDB's in a UTC
    # session, while a Europe/Amsterdam session would make that day 23 h and drop the row exactly 72 h back.
    end = datetime(2025, 4, 2, tzinfo=UTC)
    _write_table(tmp_path, [_row("72h back", end - timedelta(hours=72)),
                            _row("72h+1s back", end - timedelta(hours=72, seconds=1))])
    sql = transpile_for_duckdb(_extract_sql(window_end=end, window_days=3))
    glob = str(tmp_path / "ctloop" / "events" / "**" / "*.parquet")
    utc = duckdb_connect()
    register_parquet_table(utc, "ctloop", "events", glob)
    assert [r[0] for r in utc.execute(sql).fetchall()] == ["72h back"]
    local = duckdb_connect()
    local.execute("SET TimeZone='Europe/Amsterdam'")
    register_parquet_table(local, "ctloop", "events", glob)
    assert local.execute(sql).fetchall() == []


def test_qualify_drops_exact_duplicates_only(tmp_path: Path):
    ts = WINDOW_END - timedelta(days=1)
    rows = [
        _row("a", ts, 1.0), _row("a", ts, 1.0), _row("a", ts, 1.0),  # exact triplicate -> one
        _row("a", ts, 2.0),  # same id and time, other values: kept (the transform decides)
        _row("b", ts, 1.0, churned=1), _row("b", ts, 1.0, churned=0),  # label differs: both kept
        _row(None, None, 5.0), _row(None, None, 5.0),  # malformed duplicates -> one
        _row(None, None, 6.0),  # another malformed row: kept
    ]
    _write_table(tmp_path, rows)
    got = sorted(_run(tmp_path, _extract_sql()), key=lambda r: (r[0] or "", r[2], r[3]))
    assert [(r[0], r[2], r[3]) for r in got] == [
        (None, 5.0, 0), (None, 6.0, 0), ("a", 1.0, 0), ("a", 2.0, 0), ("b", 1.0, 0), ("b", 1.0, 1)]


def test_select_except_drops_only_the_helper_column(tmp_path: Path):
    _write_table(tmp_path, [_row("a", WINDOW_END - timedelta(hours=1))])
    con = duckdb_connect()
    register_parquet_table(con, "ctloop", "events", str(tmp_path / "ctloop" / "events" / "**" / "*.parquet"))
    names = [r[0] for r in con.execute(f"DESCRIBE {transpile_for_duckdb(_extract_sql())}").fetchall()]
    assert names == ["customer_id", "event_ts", "amount", "churned"]


def test_duckdb_sessions_run_in_utc():
    assert duckdb_connect().execute("SELECT current_setting('TimeZone')").fetchone() == ("UTC",)


def test_register_refuses_names_that_are_not_identifiers():
    with pytest.raises(SqlError, match="table name 'ev\"ents' is not a plain identifier"):
        register_parquet_table(duckdb_connect(), "ctloop", 'ev"ents', "/nowhere/*.parquet")
