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
# Dataproc Serverless runtime versions and the Spark each runs (Google's published runtime release notes). The
# transform batch pins one whose Spark major equals the local pyspark's, so both run the same defaults (ANSI).
DATAPROC_RUNTIME_SPARK = {"2.2": "3.5", "2.3": "3.5", "3.0": "4.0"}


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
    # The serving container's identity on the endpoints (deployModel's serviceAccount): reads the model files,
    # writes the prediction log. "" = Vertex AI's own account for prediction containers.
    serving_service_account: str = "ctloop-serving@ctloop-dev.iam.gserviceaccount.com"
    component_image: str = "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/component:latest"
    serving_image: str = "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/serving:latest"
    # The scoring batch's Dataproc Serverless custom container (components/spark/Dockerfile): the runtime lock
    # without pyspark (Dataproc mounts its own Spark), plus ctloop, for unpickling and scoring the model.
    scoring_image: str = "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/scoring:latest"
    dataproc_subnetwork: str | None = None
    dataproc_runtime_version: str = "3.0"
    experiment: str = "ctloop"

    @field_validator("project")
    @classmethod
    def _project_id(cls, v: str) -> str:
        if not _GCP_ID.match(v):
            raise ValueError(f"gcp.project: {v!r} is not a valid GCP project id")
        return v

    @field_validator("dataproc_runtime_version", mode="before")
    @classmethod
    def _dataproc_runtime(cls, v: Any) -> str:
        v = str(v)  # YAML reads an unquoted 3.0 as a number
        if v not in DATAPROC_RUNTIME_SPARK:
            raise ValueError(f"gcp.dataproc_runtime_version: expected one of {sorted(DATAPROC_RUNTIME_SPARK)}, "
                             f"found {v!r}")
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
    query_file: str = "extract.sql"  # under ctloop/queries unless absolute
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
    # The decision threshold is chosen on the valid split and stored in the model card: ``f_beta`` maximises
    # F-beta (``threshold_beta``), ``cost`` minimises cost_false_positive * FP + cost_false_negative * FN,
    # ``fixed`` keeps ``threshold``.
    threshold: float = Field(default=0.5, gt=0, lt=1)
    threshold_objective: Literal["f_beta", "cost", "fixed"] = "f_beta"
    threshold_beta: float = Field(default=1.0, gt=0)
    cost_false_positive: float = Field(default=1.0, ge=0)
    cost_false_negative: float = Field(default=1.0, ge=0)
    display_name: str = "ctloop-churn"
    # Categories seen in fewer than this fraction of training rows share one "infrequent" one-hot column
    # (unseen categories at prediction time land there too); 0 keeps every category.
    category_min_frequency: float = Field(default=0.01, ge=0, lt=1)


class GateSettings(_Strict):
    """Floors relative to the no-skill baseline, calibration, and the paired champion comparison.

    The floors compare with the constant predictor that says the base rate for everyone, so one setting means
    the same at any base rate (docs/monitoring.md#the-promotion-gate has the figures behind the defaults).
    """

    min_roc_auc: float = Field(default=0.70, ge=0, le=1)
    min_brier_skill: float = Field(default=0.02, le=1)  # 1 - Brier / (b (1 - b))
    min_log_loss_skill: float = Field(default=0.05, le=1)  # 1 - log loss / H(b)
    min_pr_auc_lift: float = Field(default=1.3, ge=0)  # PR AUC / b
    min_recall: float = Field(default=0.0, ge=0, le=1)
    min_precision: float = Field(default=0.0, ge=0, le=1)
    # Calibration band: |intercept| (slope fixed at 1) and the slope; a check fails when its estimate lies
    # outside the band by more than the sampling error at ``alpha`` (one-sided).
    max_calibration_intercept: float = Field(default=0.2, gt=0)
    min_calibration_slope: float = Field(default=0.8, gt=0)
    max_calibration_slope: float = Field(default=1.25, gt=0)
    primary_metric: Literal["roc_auc", "pr_auc", "f1"] = "roc_auc"
    # Champion comparison, paired on the same test rows (DeLong for roc_auc, a paired bootstrap otherwise): the
    # candidate passes when the one-sided (1 - alpha) lower bound of (candidate - champion) is >= -margin.
    margin: float = Field(default=0.015, ge=0)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    # > 0: the lower bound must also reach +min_lift (the candidate must be shown better by that much).
    min_lift: float = Field(default=0.0, ge=0)
    # A champion that can no longer be loaded (another scikit-learn minor, a pickle that fails): "fail" stops
    # the run; "replace" judges the candidate as a first model and records why.
    unloadable_champion: Literal["fail", "replace"] = "fail"
    bootstrap_samples: int = Field(default=1000, ge=100)
    seed: int = 0  # of the bootstrap resamples

    @model_validator(mode="after")
    def _slope_band(self) -> GateSettings:
        if self.min_calibration_slope >= self.max_calibration_slope:
            raise ValueError(f"gate: min_calibration_slope ({self.min_calibration_slope}) must be below "
                             f"max_calibration_slope ({self.max_calibration_slope})")
        return self


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


class CanarySettings(_Strict):
    """Judging a canary (``deploy.canary_percent`` < 100, or ``shadow``) on the prediction log, then promoting it
    through ``steps``, rolling it back or holding it. Tests, levels and measured rates: docs/monitoring.md."""

    steps: list[int] = Field(default_factory=lambda: [10, 50, 100])  # the shares a good canary moves through
    # The candidate gets a copy of live requests at 0% of the traffic: its answers are logged, never returned.
    shadow: bool = False
    window_hours: float = Field(default=24.0, gt=0)  # the prediction-log window judged, ending now
    min_requests: int = Field(default=200, ge=10)  # logged requests each side needs before anything is decided
    p_value: float = Field(default=0.01, gt=0, lt=1)  # level of each one-sided test
    max_error_rate_increase: float = Field(default=0.01, ge=0, le=1)  # canary minus champion error rate
    max_latency_median_ratio: float = Field(default=1.5, ge=1)  # canary median / champion median
    max_latency_p99_ratio: float = Field(default=1.5, ge=1)  # canary p99 / champion p99
    max_score_ks: float = Field(default=0.1, gt=0, le=1)  # KS distance of the two score distributions
    min_auc_drop: float = Field(default=0.02, ge=0, le=1)  # champion AUC minus canary AUC, on labelled rows
    # Cloud: the production endpoint logs requests and responses to <gcp.project>.<data.bq_dataset>.<this>
    # (set when the endpoint is created; "" = off).
    request_log_table: str = "endpoint_requests"
    # The local traffic generator (``ctloop canary --requests N``): loopback only, at most this many per second.
    max_requests_per_second: float = Field(default=200.0, gt=0)

    @field_validator("request_log_table")
    @classmethod
    def _table(cls, v: str) -> str:
        if v and not _IDENT.match(v):
            raise ValueError(f"canary.request_log_table: BigQuery name {v!r} is not a plain identifier")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or v[-1] != 100 or any(not 0 < s <= 100 for s in v) or v != sorted(set(v)):
            raise ValueError(f"canary.steps: expected increasing percentages in 1..100 ending at 100, found {v}")
        return v


class LocalSettings(_Strict):
    """Where the local backend keeps its state (relative paths are under ``workdir``)."""

    workdir: str = ".ctloop"
    spark_master: str = "local[2]"
    spark_driver_memory: str = "2g"
    # One shuffle partition per core of local[2]: more only add tasks (bench/: 1M rows, 8 -> 2 saves ~10%).
    spark_shuffle_partitions: int = 2
    # Input rows from which a JVM started for one job also runs its optimising compiler (ctloop/spark_session.py).
    spark_full_jit_rows: int = Field(default=500_000, ge=0)
    # Local Spark jobs run on one long-lived JVM (ctloop/spark_service.py), which stops after this many idle
    # seconds; 0 = none: each job starts a JVM of its own and stops it.
    spark_service_idle_seconds: float = Field(default=900.0, ge=0)
    # Local pipeline steps fork from one interpreter that imported their modules already (ctloop/step_server.py),
    # which stops after this many idle seconds; 0 = none: each step starts an interpreter of its own.
    step_server_idle_seconds: float = Field(default=900.0, ge=0)
    # OpenMP/BLAS in local steps, the local server and tests (ctloop/threads.py): waiting threads sleep
    # (PASSIVE) instead of spinning, so another busy process costs CPU share, not a stalled barrier each time.
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] = "PASSIVE"
    # OpenMP/BLAS threads per local process; 0 = one per CPU, and a local fit takes the CPUs left idle.
    threads: int = Field(default=0, ge=0)

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


class StepResources(_Strict):
    """CPU and memory limits of one step's container (Kubernetes quantities, as kfp's set_cpu_limit takes them)."""

    cpu: str = Field(pattern=r"^([0-9]*[.])?[0-9]+m?$")  # cores, or millicores with "m"
    memory: str = Field(pattern=r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")

    @field_validator("cpu", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        # YAML and --set give `cpu: 4` as a number (and a KFP dict parameter turns ints into floats).
        return (str(int(v)) if float(v).is_integer() else str(v)) if isinstance(v, int | float) else v


# Per step (component) CPU and memory on Vertex AI Pipelines, written into the compiled YAML
# (pipelines/compile.py); the local runner ignores them. Sized for the README's scale (tens of millions of rows):
# train and the drift check hold whole splits in pandas (the row ceiling per GB: docs/architecture.md), extract
# and transform only drive BigQuery and Dataproc. Settings override single steps; the others keep these.
DEFAULT_RESOURCES: dict[str, tuple[str, str]] = {
    "extract": ("2", "8G"),
    "transform": ("1", "4G"),
    "train": ("8", "32G"),
    "lookup_champion": ("1", "2G"),
    "evaluate_gate": ("4", "16G"),
    "register": ("1", "4G"),
    "deploy": ("2", "8G"),
    "report_rejection": ("1", "2G"),
    "collect_recent": ("2", "8G"),
    "check_drift": ("4", "16G"),
    "launch_training": ("1", "4G"),
    "collect_scoring_rows": ("2", "8G"),
    "score_batch": ("1", "4G"),  # submits and waits on the Dataproc batch that does the scoring
    "materialize_features": ("2", "8G"),  # folds the splits' rows into one history state per entity
    "judge_canary": ("2", "8G"),
}


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
    # Sizes (PSI) a significant shift must reach to count; significance is what bounds the false alarms. Both
    # sides are compared one row per entity (rows of one entity are not independent).
    psi_warn: float = Field(default=0.02, gt=0)
    psi_alert: float = Field(default=0.02, gt=0)
    # Family-wise significance level; each test (2 per feature, 2 for the scores) uses p_value / (tests run).
    p_value: float = Field(default=0.02, gt=0, lt=1)
    min_drifted_features: int = Field(default=1, ge=1)
    # Features left out of the comparison, e.g. cumulative history counts that grow with time by construction.
    exclude_features: list[str] = Field(default_factory=list)
    max_missing_rate_change: float = Field(default=0.05, gt=0, le=1)
    score_psi_alert: float = Field(default=0.02, gt=0)
    max_positive_rate_change: float = Field(default=0.10, gt=0, le=1)
    # always: every new batch retrains. on_drift: a new batch retrains only when its features or the champion's
    # scores drifted; on_decay: only when the champion's ROC AUC on the batch's labelled rows dropped (ctloop.decay);
    # on_drift_or_decay: either.
    retrain_policy: Literal["always", "on_drift", "on_decay", "on_drift_or_decay"] = "always"
    # Performance decay counts when the one-sided lower bound (level p_value) of the AUC drop exceeds this.
    min_auc_drop: float = Field(default=0.0, ge=0, le=1)
    schedule: str = "0 6 * * *"  # cron, UTC: the scheduled check (terraform/monitoring.tf)
    # Cloud: the training template a drift launches (Artifact Registry URI); empty = compile it in the step.
    training_template: str = ""
    # Prediction logging (serving): the share of requests logged, 0 = off. The canary and drift checks read it.
    sample_rate: float = Field(default=0.1, ge=0, le=1)
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


class ScoringSettings(_Strict):
    """Batch scoring: which rows, which model, where the scores go (docs/architecture.md, "Batch scoring")."""

    # The rows: the extract SQL over ``source_table`` (default data.bq_table) for the last ``window_days``
    # (default data.window_days, so history features see the same span as in training) before the scoring time.
    source_table: str | None = None
    query_file: str | None = None
    window_days: int | None = Field(default=None, gt=0)
    model_version: str = "champion"  # a registry alias or a version number
    # Cloud: the destination BigQuery table in data.bq_dataset. Local: Parquet under ``output_dir``
    # ("" = <workdir>/scores), one folder per run id and model version.
    bq_table: str = "scores"
    output_dir: str = ""
    schedule: str = "0 7 * * *"  # cron, UTC: the scheduled scoring run (terraform/scoring.tf)
    # "Score this": a batch landing under this prefix of gcp.landing_bucket (outside the training data's prefix)
    # launches a scoring run over that batch (terraform/scoring.tf, the trigger function). "" = off.
    landing_prefix: str = ""

    @field_validator("landing_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and (not v.endswith("/") or v.startswith("/") or "\\" in v or ".." in v.split("/")):
            raise ValueError(f"scoring.landing_prefix: expected a relative object prefix ending in '/' such as "
                             f"'scoring/', found {v!r}")
        return v

    @field_validator("source_table", "bq_table")
    @classmethod
    def _ident(cls, v: str | None) -> str | None:
        if v is not None and not _IDENT.match(v):
            raise ValueError(f"BigQuery name {v!r} is not a plain identifier")
        return v

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) != _CRON_FIELDS:
            raise ValueError(f"scoring.schedule: expected a 5-field cron expression such as '0 7 * * *', found {v!r}")
        return v


class OnlineFeatureSettings(_Strict):
    """The online store of per-entity history states (ctloop/online_store.py). Local: SQLite under
    ``local.workdir``. Cloud: the BigQuery table ``data.bq_dataset.bq_table``, read by the Vertex AI Feature
    Store view ``feature_view`` of the online store ``feature_online_store`` (both made by Terraform)."""

    bq_table: str = "entity_history"
    feature_online_store: str = "ctloop"
    feature_view: str = "entity_history"
    sync_timeout_seconds: float = Field(default=1800.0, gt=0)
    sync_poll_seconds: float = Field(default=10.0, gt=0)


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
    canary: CanarySettings = Field(default_factory=CanarySettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    online_features: OnlineFeatureSettings = Field(default_factory=OnlineFeatureSettings)
    resources: dict[str, StepResources] = Field(default_factory=dict, validate_default=True)  # DEFAULT_RESOURCES

    @field_validator("resources", mode="before")
    @classmethod
    def _resources(cls, v: dict[str, Any] | None) -> dict[str, Any]:
        unknown = sorted(set(v or {}) - set(DEFAULT_RESOURCES))
        if unknown:
            raise ValueError(f"resources: unknown step(s) {unknown}; expected some of {sorted(DEFAULT_RESOURCES)}")
        defaults = {step: {"cpu": cpu, "memory": memory} for step, (cpu, memory) in DEFAULT_RESOURCES.items()}
        return {step: {**defaults[step], **dict((v or {}).get(step) or {})} for step in defaults}

    @model_validator(mode="after")
    def _shadow_local(self) -> Settings:
        if self.canary.shadow and self.backend == "cloud":
            raise ValueError("canary.shadow: the local backend only; Vertex AI endpoints do not copy requests to a "
                             "deployment with 0% of the traffic (use deploy.canary_percent instead)")
        return self

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
