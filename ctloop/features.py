"""The feature contract shared by transform, train, evaluate and serve.

A ``FeatureSpec`` is resolved once (in the transform, from the settings and the extracted column types), written
next to every split as ``_feature_spec.json`` and into the model card, so every later step reads the same lists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctloop.config import Settings

SPEC_FILE = "_feature_spec.json"

# Point-in-time history aggregates per entity, computed only from that entity's earlier rows.
PRIOR_EVENTS = "hist_prior_events"
DAYS_SINCE_PRIOR = "hist_days_since_prior"
PRIOR_MEAN_PREFIX = "hist_prior_mean_"
MAX_HISTORY_MEANS = 3
# The transform job runs standalone on Dataproc: it gets these names as its ``--feature-names`` argument.
DERIVED_NAMES = {"prior_events": PRIOR_EVENTS, "days_since_prior": DAYS_SINCE_PRIOR,
                 "prior_mean_prefix": PRIOR_MEAN_PREFIX}

_NUMERIC_TYPES = ("int", "float", "double", "decimal", "numeric", "bigint", "smallint", "tinyint", "real")
_CATEGORICAL_TYPES = ("string", "varchar", "str", "bool", "object", "large_string", "category")


@dataclass(frozen=True)
class FeatureSpec:
    id_column: str
    timestamp_column: str
    label_column: str
    numeric: list[str]
    categorical: list[str]
    history_means: list[str] = field(default_factory=list)
    history_enabled: bool = True

    @property
    def derived(self) -> list[str]:
        if not self.history_enabled:
            return []
        return [PRIOR_EVENTS, DAYS_SINCE_PRIOR] + [PRIOR_MEAN_PREFIX + c for c in self.history_means]

    @property
    def model_numeric(self) -> list[str]:
        """Numeric model inputs: the source numerics plus the derived history features."""
        return self.numeric + self.derived

    @property
    def model_features(self) -> list[str]:
        return self.model_numeric + self.categorical

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        return cls(**json.loads(text))

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / SPEC_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, directory: str | Path) -> FeatureSpec:
        path = Path(directory) / SPEC_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no feature spec; was this directory written by the transform step?")
        return cls.from_json(path.read_text())


def _kind(type_name: str) -> str | None:
    t = type_name.lower()
    if t.startswith(("timestamp", "date", "time")):
        return None
    if t.startswith(_NUMERIC_TYPES):
        return "numeric"
    if t.startswith(_CATEGORICAL_TYPES):
        return "categorical"
    return None


def resolve_feature_spec(settings: Settings, column_types: dict[str, str]) -> FeatureSpec:
    """Feature lists from the settings, or inferred from ``column_types`` (name -> type name) where unset.

    Raises ValueError naming any configured feature that the data does not have.
    """
    cols = settings.columns
    excluded = set(cols.role_columns) | set(cols.exclude_columns)
    available = [c for c in column_types if c not in excluded]
    numeric = cols.numeric_features
    categorical = cols.categorical_features
    if numeric is None:
        numeric = [c for c in available if _kind(column_types[c]) == "numeric" and c not in (categorical or [])]
    if categorical is None:
        categorical = [c for c in available if _kind(column_types[c]) == "categorical" and c not in numeric]
    missing = [c for c in numeric + categorical if c not in column_types]
    if missing:
        raise ValueError(
            f"configured feature column(s) {missing} not found in the data; found columns {sorted(column_types)}"
        )
    if not numeric and not categorical:
        raise ValueError(f"no feature columns: configure columns.numeric_features/categorical_features "
                         f"or provide typed columns besides {sorted(excluded)}")
    return FeatureSpec(
        id_column=cols.id_column,
        timestamp_column=cols.timestamp_column,
        label_column=cols.label_column,
        numeric=list(numeric),
        categorical=list(categorical),
        history_means=list(numeric[:MAX_HISTORY_MEANS]) if settings.data.history_features else [],
        history_enabled=settings.data.history_features,
    )


def feature_roles(spec: FeatureSpec, settings: Settings) -> list[tuple[str, str, str]]:
    """(column, role, where the role came from) for every column the model sees or the pipeline keys on."""
    cols = settings.columns

    def origin(configured: list[str] | None, setting: str) -> str:
        return f"configured ({setting})" if configured is not None else "inferred from the column type"

    rows = [(spec.id_column, "id", "configured (columns.id_column)"),
            (spec.timestamp_column, "timestamp", "configured (columns.timestamp_column)"),
            (spec.label_column, "label", "configured (columns.label_column)")]
    rows += [(c, "numeric feature", origin(cols.numeric_features, "columns.numeric_features")) for c in spec.numeric]
    rows += [(c, "categorical feature", origin(cols.categorical_features, "columns.categorical_features"))
             for c in spec.categorical]
    rows += [(c, "numeric feature", "derived (per-entity history, data.history_features)") for c in spec.derived]
    return rows
