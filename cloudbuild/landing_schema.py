"""Write the landing table's BigQuery schema (terraform/landing_schema.json) from the settings' column roles.

    python cloudbuild/landing_schema.py [--config ctloop.yaml] [--parquet FILE] [--out terraform/landing_schema.json]

Which columns: the id, timestamp and label columns and the listed features (``columns.*`` of the settings).
Their types: those of a Parquet file the producer writes (``--parquet``), or by default of the bundled sample
data, so the declared schema matches what lands. Terraform declares the table with it instead of autodetecting
over a bucket that is empty when the table is created.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ctloop.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "terraform" / "landing_schema.json"


def bigquery_type(arrow_type: pa.DataType) -> str:
    """The BigQuery type an external Parquet table reads ``arrow_type`` as."""
    if pa.types.is_boolean(arrow_type):
        return "BOOL"
    if pa.types.is_integer(arrow_type):
        return "INT64"
    if pa.types.is_floating(arrow_type):
        return "FLOAT64"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "STRING"
    if pa.types.is_timestamp(arrow_type):
        return "TIMESTAMP"
    if pa.types.is_date(arrow_type):
        return "DATE"
    if pa.types.is_decimal(arrow_type):
        return "NUMERIC"
    raise ValueError(f"no BigQuery type for Parquet type {arrow_type}")


def landing_columns(settings: Settings, schema: pa.Schema) -> list[str]:
    """The role columns, then the features: listed ones, or every other column when the lists are left out."""
    cols = settings.columns
    roles = cols.role_columns
    if cols.numeric_features is None or cols.categorical_features is None:
        features = [n for n in schema.names if n not in roles and n not in cols.exclude_columns]
    else:
        features = [*cols.numeric_features, *cols.categorical_features]
    return [*roles, *features]


def landing_schema(settings: Settings, schema: pa.Schema) -> list[dict[str, str]]:
    """BigQuery schema fields (name, type, mode, description) for the landing table."""
    role_of = {settings.columns.id_column: "id", settings.columns.timestamp_column: "timestamp",
               settings.columns.label_column: "label"}
    fields = []
    for name in landing_columns(settings, schema):
        if name not in schema.names:
            raise ValueError(f"column {name!r} (settings columns.*) is not in the Parquet schema "
                             f"(found {schema.names})")
        role = role_of.get(name) or ("numeric feature" if name in (settings.columns.numeric_features or [])
                                     else "feature")
        fields.append({"name": name, "type": bigquery_type(schema.field(name).type), "mode": "NULLABLE",
                       "description": f"ctloop {role}"})
    return fields


def sample_schema(settings: Settings) -> pa.Schema:
    """The Parquet schema of the bundled sample data for ``settings``."""
    from ctloop.sample_data import generate_part

    return generate_part(settings, 0, rows=50).schema


def render(settings: Settings, parquet: Path | None = None) -> str:
    schema = pq.read_schema(parquet) if parquet else sample_schema(settings)
    return json.dumps(landing_schema(settings, schema), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "ctloop.yaml")
    parser.add_argument("--parquet", type=Path, help="a landing file whose column types to declare")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    try:
        text = render(load_settings(args.config, []), args.parquet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"landing_schema: {exc}", file=sys.stderr)
        return 1
    args.out.write_text(text)
    print(f"landing_schema: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
