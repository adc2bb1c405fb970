"""BigQuery SQL templates: render them with validated values, and run them on DuckDB locally.

Templates (``ctloop/queries/*.sql``) name each value with its kind, ``{{ kind:name }}``:

========== ===================================================== ==========================================
kind       accepts                                                written as
========== ===================================================== ==========================================
table      ``project.dataset.table`` (GCP project id, plain names) ```project.dataset.table```
ident      a plain column name ``[A-Za-z_][A-Za-z0-9_]*``          ```name```
timestamp  an aware datetime or ISO string (no offset = UTC)       ``TIMESTAMP 'YYYY-MM-DD HH:MM:SS+00:00'``
int        an int (not a bool)                                     ``730``
========== ===================================================== ==========================================

Values become literals rather than BigQuery query parameters: the rendered text is then the whole query (it is
recorded as lineage and runs unchanged inside ``EXPORT DATA``), and DuckDB runs the same text after
transpiling, where BigQuery's ``@name`` parameters have no DuckDB equivalent that sqlglot rewrites.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, ParseError, UnsupportedError

from ctloop.errors import SqlError

_PLACEHOLDER = re.compile(r"\{\{\s*(?P<kind>[a-z]+)\s*:\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,299}$")
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,61}[a-z0-9]$")


def sql_dir() -> Path:
    """The folder holding the project's SQL templates: ``ctloop/queries``, this package's own data."""
    folder = resources.files("ctloop") / "queries"
    if not folder.is_dir():
        raise SqlError(f"no queries/ folder in the installed ctloop package ({folder})")
    return Path(str(folder))


def load_template(query_file: str) -> tuple[str, str]:
    """``(source name, template text)`` for ``query_file``: absolute, or a name under ``ctloop/queries``."""
    path = Path(query_file)
    if not path.is_absolute():
        path = sql_dir() / query_file
    if not path.is_file():
        raise SqlError(f"data.query_file: SQL template {path} does not exist")
    return str(path), path.read_text()


def render_sql(template: str, params: Mapping[str, Any], *, source: str = "<template>") -> str:
    """Fill every ``{{ kind:name }}`` of ``template`` with ``params[name]``, validated for its kind.

    Raises SqlError naming the template and placeholder for a missing or invalid value, an unknown kind, or
    stray braces that are not a well-formed placeholder.
    """

    def fill(match: re.Match[str]) -> str:
        kind, name = match["kind"], match["name"]
        if kind not in _RENDERERS:
            raise SqlError(f"{source}: placeholder {match[0]!r} has unknown kind {kind!r}; "
                           f"expected one of {sorted(_RENDERERS)}")
        if name not in params:
            raise SqlError(f"{source}: no value for placeholder {name!r} ({kind}); given {sorted(params)}")
        try:
            return _RENDERERS[kind](params[name])
        except (TypeError, ValueError) as exc:
            raise SqlError(f"{source}: placeholder {name!r} ({kind}): {exc}") from exc

    rendered = _PLACEHOLDER.sub(fill, template)
    leftover = re.search(r"\{\{|\}\}", _PLACEHOLDER.sub("", template))
    if leftover:
        line = template[: template.find(leftover[0])].count("\n") + 1
        raise SqlError(f"{source}:{line}: malformed placeholder; expected {{{{ kind:name }}}}, "
                       f"e.g. {{{{ ident:id_column }}}}")
    return rendered


def _render_table(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a 'project.dataset.table' string, found {type(value).__name__}")
    parts = value.split(".")
    if len(parts) != 3:
        raise ValueError(f"expected 'project.dataset.table', found {value!r}")
    project, dataset, table = parts
    if not _PROJECT.match(project):
        raise ValueError(f"expected a GCP project id (lowercase letters, digits, dashes), found {project!r}")
    for label, part in (("dataset", dataset), ("table", table)):
        if not _IDENT.match(part):
            raise ValueError(f"expected a plain {label} name [A-Za-z_][A-Za-z0-9_]*, found {part!r}")
    return f"`{value}`"


def _render_ident(value: Any) -> str:
    if not isinstance(value, str) or not _IDENT.match(value):
        raise ValueError(f"expected a plain column name [A-Za-z_][A-Za-z0-9_]*, found {value!r}")
    return f"`{value}`"


def _render_timestamp(value: Any) -> str:
    ts = parse_timestamp(value)
    text = ts.strftime("%Y-%m-%d %H:%M:%S") + (f".{ts.microsecond:06d}" if ts.microsecond else "")
    return f"TIMESTAMP '{text}+00:00'"


def _render_int(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, found {type(value).__name__} {value!r}")
    return str(value)


_RENDERERS = {
    "table": _render_table, "ident": _render_ident, "timestamp": _render_timestamp, "int": _render_int,
}


def parse_timestamp(value: datetime | str) -> datetime:
    """An aware UTC datetime from a datetime or an ISO 8601 string; no offset means UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError as exc:
            raise ValueError(f"expected an ISO 8601 timestamp, found {value!r}") from exc
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime or ISO 8601 string, found {type(value).__name__}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BigQuery constructs sqlglot 30 turns into DuckDB SQL that runs but means something else (or does not parse).
def _mistranslations(tree: exp.Expression) -> list[str]:
    found = []
    for node in tree.find_all(exp.Extract):
        if node.name.upper() == "DAYOFWEEK":
            found.append("EXTRACT(DAYOFWEEK ...): BigQuery counts Sunday as 1, DuckDB as 0")
    for _ in tree.find_all(exp.DateTrunc):
        found.append("DATE_TRUNC(...): BigQuery returns a DATE, DuckDB a TIMESTAMP; use TIMESTAMP_TRUNC or "
                     "compare against DATE values explicitly cast")
    for node in tree.find_all(exp.ArrayAgg):
        if node.find(exp.Limit):
            found.append("ARRAY_AGG(... LIMIT n): DuckDB has no LIMIT inside ARRAY_AGG")
    return found


def transpile_for_duckdb(sql: str) -> str:
    """One BigQuery query as DuckDB SQL.

    Fully-qualified tables ``project.dataset.table`` become ``dataset.table``: a DuckDB schema and view, made
    by ``register_parquet_table``. Raises SqlError for anything but a single query, for parse errors, for
    constructs known to mistranslate (naming them), and for anything sqlglot cannot express in DuckDB.
    """
    try:
        statements = [s for s in sqlglot.parse(sql, read="bigquery", error_level=ErrorLevel.RAISE) if s]
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        where = f" at line {first.get('line')}, column {first.get('col')}" if first else ""
        raise SqlError(f"BigQuery SQL does not parse{where}: {first.get('description', exc)}") from exc
    if len(statements) != 1 or not isinstance(statements[0], exp.Query):
        kinds = [type(s).__name__ for s in statements]
        raise SqlError(f"expected exactly one SELECT query, found {len(statements)} statement(s) {kinds}")
    tree = statements[0]
    problems = _mistranslations(tree)
    if problems:
        raise SqlError("BigQuery SQL uses construct(s) that DuckDB would run with a different meaning: "
                       + "; ".join(problems))
    for table in tree.find_all(exp.Table):
        if table.args.get("catalog") is not None:
            table.set("catalog", None)  # the project: DuckDB has one catalog, the schema is the dataset
    try:
        return tree.sql(dialect="duckdb", pretty=True, comments=False, unsupported_level=ErrorLevel.RAISE)
    except UnsupportedError as exc:
        raise SqlError(f"BigQuery SQL has no faithful DuckDB form: {exc}") from exc


def duckdb_connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB whose session time zone is UTC, as BigQuery's is (day intervals are then 24 h)."""
    con = duckdb.connect()
    # SET, not connect(config={"TimeZone": ...}): the config form tries to download ICU, which fails offline.
    con.execute("SET TimeZone='UTC'")
    return con


def register_parquet_table(con: duckdb.DuckDBPyConnection, dataset: str, table: str, files_glob: str) -> None:
    """Expose the Parquet files matching ``files_glob`` as the DuckDB view ``dataset.table``."""
    for label, name in (("dataset", dataset), ("table", table)):
        if not _IDENT.match(name):
            raise SqlError(f"{label} name {name!r} is not a plain identifier")
    glob = files_glob.replace("'", "''")
    con.execute(f'CREATE SCHEMA IF NOT EXISTS "{dataset}"')
    # union_by_name: batches written at different times may add columns; hive_partitioning off: batch folders
    # are names, not key=value partitions.
    con.execute(f"CREATE OR REPLACE VIEW \"{dataset}\".\"{table}\" AS SELECT * FROM read_parquet('{glob}', "
                f"union_by_name = true, hive_partitioning = false)")
