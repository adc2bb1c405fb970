"""The one typed settings object of ctloop.

Loaded from one YAML file plus dotted overrides (``model.type=hist_gradient_boosting``), validated on load.
It travels into the pipeline as a plain dict parameter (``Settings.to_param()``) and each component rebuilds it
with ``Settings.from_param``: nothing is read from the environment deep inside the code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Backend = Literal["local", "cloud"]
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GCP_ID = re.compile(r"^[a-z][a-z0-9-]{4,61}[a-z0-9]$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GcpSettings(_Strict):
    """Where the cloud backend runs."""

    project: str = "ctloop-dev"
    region: str = "europe-west4"
    landing_bucket: str = "ctloop-dev-landing"
    pipeline_root: str = "gs://ctloop-dev-pipeline-root/runs"
    staging_bucket: str = "ctloop-dev-staging"
    # Registered model versions' files go to gs://<model_bucket>/models/<model>/<version key>/, outside the
    # pipeline root, so cleaning pipeline runs never breaks the champion. "" = staging_bucket.
    model_bucket: str = ""
    service_account: str = "ctloop-pipeline@ctloop-dev.iam.gserviceaccount.com"
    component_image: str = "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/component:latest"
    serving_image: str = "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/serving:latest"
    dataproc_subnetwork: str | None = None
    experiment: str = "ctloop"

    @field_validator("project")
    @classmethod
    def _project_id(cls, v: str) -> str:
        if not _GCP_ID.match(v):
            raise ValueError(f"gcp.project: {v!r} is not a valid GCP project id")
        return v


class SchemaRoles(_Strict):
    """What each column of the source table is for. Nothing here is specific to the sample data."""

    id_column: str = "customer_id"
    timestamp_column: str = "event_ts"
    label_column: str = "churned"
    # None = infer from the extracted data's types (numeric dtypes vs strings/bools), minus the role columns.
    numeric_features: list[str] | None = None
    categorical_features: list[str] | None = None
    exclude_columns: list[str] = Field(default_factory=list)
    # Numeric features that cannot be negative (the transform quarantines rows where they are).
    # None = every numeric feature; [] = none.
    non_negative: list[str] | None = None

    @field_validator("id_column", "timestamp_column", "label_column")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not _IDENT.match(v):
            raise ValueError(f"schema column {v!r} is not a plain identifier")
        return v

    @property
    def role_columns(self) -> list[str]:
        return [self.id_column, self.timestamp_column, self.label_column]


class DataSettings(_Strict):
    """Source table, extract window and split."""

    bq_dataset: str = "ctloop"
    bq_table: str = "events"
    query_file: str = "extract.sql"  # under components/sql unless absolute
    window_days: int = Field(default=730, gt=0)
    window_end: str | None = None  # ISO timestamp; None = the run's snapshot time
    valid_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    min_rows: int = Field(default=100, gt=0)
    history_features: bool = True  # point-in-time per-entity aggregates in the transform

    @field_validator("bq_dataset", "bq_table")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not _IDENT.match(v):
            raise ValueError(f"BigQuery name {v!r} is not a plain identifier")
        return v


class ModelSettings(_Strict):
    """Which classifier and its hyper-parameters."""

    type: Literal["logistic_regression", "hist_gradient_boosting"] = "hist_gradient_boosting"
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 42
    threshold: float = Field(default=0.5, gt=0, lt=1)
    display_name: str = "ctloop-churn"
    # Categories seen in fewer than this fraction of training rows share one "infrequent" one-hot column
    # (unseen categories at prediction time land there too); 0 keeps every category.
    category_min_frequency: float = Field(default=0.01, ge=0, lt=1)


class GateSettings(_Strict):
    """Absolute thresholds, guardrails and the champion comparison."""

    min_roc_auc: float = 0.70
    min_pr_auc: float = 0.30
    min_recall: float = 0.0
    min_precision: float = 0.0
    max_log_loss: float = 0.60
    max_brier: float = 0.20
    # Guardrail: the predicted positive rate must stay within this absolute distance of the test base rate.
    max_positive_rate_gap: float = 0.30
    primary_metric: Literal["roc_auc", "pr_auc", "f1"] = "roc_auc"
    tolerance: float = Field(default=0.005, ge=0)
    min_lift: float = Field(default=0.0, ge=0)


class DeploySettings(_Strict):
    """Endpoints, canary and the smoke test."""

    staging_endpoint: str = "ctloop-staging"
    production_endpoint: str = "ctloop-production"
    canary_percent: int = Field(default=100, ge=1, le=100)
    keep_versions: int = Field(default=2, ge=1)
    smoke_instances: int = Field(default=20, ge=1)
    smoke_max_latency_ms: float = 2000.0
    machine_type: str = "n1-standard-2"
    min_replicas: int = 1
    max_replicas: int = 2


class LocalSettings(_Strict):
    """Where the local backend keeps its state (relative paths are under ``workdir``)."""

    workdir: str = ".ctloop"
    spark_master: str = "local[2]"
    spark_driver_memory: str = "2g"
    spark_shuffle_partitions: int = 8

    def path(self, *parts: str) -> Path:
        return Path(self.workdir).resolve().joinpath(*parts)

    @property
    def landing_dir(self) -> Path:
        return self.path("landing")

    @property
    def registry_db(self) -> Path:
        return self.path("registry.sqlite")

    @property
    def models_dir(self) -> Path:
        """Registered model versions' files (``<model>/<version key>/``), outside the pipeline root."""
        return self.path("models")

    @property
    def pipeline_root(self) -> Path:
        return self.path("pipeline-root")

    @property
    def runs_dir(self) -> Path:
        return self.path("runs")


_CRON_FIELDS = 5


class MonitoringSettings(_Strict):
    """Drift and skew checks against the champion's training data, prediction logging, the retrain policy.

    What each threshold means, and the false-alarm and detection rates measured with them: docs/monitoring.md.
    """

    # The recent batch: the extract SQL over the last ``recent_days`` (ending at ``window_end``, else the run's
    # snapshot time), or the prediction log of the production endpoint over the same window.
    source: Literal["extract", "prediction_log"] = "extract"
    recent_days: int = Field(default=7, gt=0)
    window_end: str | None = None
    min_rows: int = Field(default=1000, gt=0)
    max_rows: int = Field(default=200_000, gt=0)  # larger inputs are sampled down (deterministically)
    bins: int = Field(default=10, ge=2, le=100)  # quantile bins of the reference, for numeric PSI
    max_categories: int = Field(default=50, ge=1)  # rarer reference categories share the "other" bucket
    epsilon: float = Field(default=1e-4, gt=0, lt=0.01)  # empty bins count as this fraction in PSI
    psi_warn: float = Field(default=0.1, gt=0)
    psi_alert: float = Field(default=0.2, gt=0)
    # Family-wise significance level; each test (2 per feature, 2 for the scores) uses p_value / (tests run).
    p_value: float = Field(default=0.01, gt=0, lt=1)
    min_drifted_features: int = Field(default=1, ge=1)
    # Features left out of the comparison, e.g. cumulative history counts that grow with time by construction.
    exclude_features: list[str] = Field(default_factory=list)
    max_missing_rate_change: float = Field(default=0.05, gt=0, le=1)
    score_psi_alert: float = Field(default=0.2, gt=0)
    max_positive_rate_change: float = Field(default=0.10, gt=0, le=1)
    retrain_policy: Literal["always", "on_drift"] = "always"
    schedule: str = "0 6 * * *"  # cron, UTC: the scheduled check (terraform/monitoring.tf)
    # Cloud: the training template a drift launches (Artifact Registry URI); empty = compile it in the step.
    training_template: str = ""
    # Prediction logging (serving): the share of requests logged, 0 = off.
    sample_rate: float = Field(default=0.0, ge=0, le=1)
    # Where logs go: a directory or gs://bucket/prefix; "" = <workdir>/prediction_log (local backend) or
    # gs://<gcp.staging_bucket>/prediction_log (cloud). Each endpoint writes below <log_uri>/<endpoint>/.
    log_uri: str = ""
    log_flush_rows: int = Field(default=2000, gt=0)
    log_flush_seconds: float = Field(default=30.0, gt=0)
    log_max_pending_rows: int = Field(default=100_000, gt=0)  # beyond this, sampled rows are dropped (counted)

    @model_validator(mode="after")
    def _consistent(self) -> MonitoringSettings:
        if self.psi_warn > self.psi_alert:
            raise ValueError(f"monitoring: psi_warn ({self.psi_warn}) must not exceed psi_alert ({self.psi_alert})")
        if len(self.schedule.split()) != _CRON_FIELDS:
            raise ValueError(f"monitoring.schedule: expected a 5-field cron expression such as '0 6 * * *', "
                             f"found {self.schedule!r}")
        return self


class Settings(_Strict):
    """Everything a run needs. Serialisable, so it can be a pipeline parameter."""

    backend: Backend = "local"
    labels: dict[str, str] = Field(default_factory=lambda: {"app": "ctloop", "env": "dev"})
    gcp: GcpSettings = Field(default_factory=GcpSettings)
    columns: SchemaRoles = Field(default_factory=SchemaRoles)
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)

    @model_validator(mode="after")
    def _roles_distinct(self) -> Settings:
        roles = self.columns.role_columns
        if len(set(roles)) != len(roles):
            raise ValueError(f"columns: id, timestamp and label columns must differ, got {roles}")
        for name in (self.columns.numeric_features or []) + (self.columns.categorical_features or []):
            if name in roles:
                raise ValueError(f"columns: role column {name!r} cannot also be a feature")
        return self

    @property
    def source_table(self) -> str:
        """Fully-qualified BigQuery table, ``project.dataset.table``."""
        return f"{self.gcp.project}.{self.data.bq_dataset}.{self.data.bq_table}"

    def to_param(self) -> dict[str, Any]:
        # KFP rejects None inside a dict parameter; unset optional fields come back as their defaults.
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_param(cls, param: dict[str, Any] | str) -> Settings:
        if isinstance(param, str):
            param = yaml.safe_load(param)
        return cls.model_validate(param)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> Settings:
        data = self.to_param()
        items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
        for key, value in items:
            _set_dotted(data, key, value)
        return Settings.model_validate(data)


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected KEY=VALUE, e.g. model.type=logistic_regression")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw else ""


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ValueError(f"override {key!r}: {part!r} is not a settings section")
        node = node[part]
    node[parts[-1]] = value


def load_settings(path: str | Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Read a YAML settings file (or the defaults) and apply ``KEY=VALUE`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"settings file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"settings file {p}: expected a mapping at the top level, found {type(loaded).__name__}")
        data = loaded
    settings = Settings.model_validate(data)
    return settings.with_overrides(overrides) if overrides else settings
