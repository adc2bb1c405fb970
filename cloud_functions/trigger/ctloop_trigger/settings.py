"""The function's own settings: environment variables read once, validated into a frozen dataclass.

Every error names the variable, what was expected and what was found, so a bad deployment fails on its first
event with a readable log line instead of a stack trace deep in a launcher.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ctloop.launching import Pipeline
from ctloop.local_launch import cli_argv

ENV_PREFIX = "CTLOOP_TRIGGER_"
BUNDLE_DIR = Path(__file__).resolve().parent.parent

# The ctloop CLI (``ctloop --config C run|monitor --run-id R --trigger-uri U --snapshot-time S``), as templates.
_PLACEHOLDERS = ("{python}", "{config}", "{run_id}", "{trigger_uri}", "{snapshot_time}")
DEFAULT_LAUNCH_COMMAND = tuple(cli_argv(*_PLACEHOLDERS[:2], "training", *_PLACEHOLDERS[2:]))
# The monitoring pipeline (retrain policy on_drift, and schedule ticks): ``ctloop monitor``.
DEFAULT_MONITOR_COMMAND = tuple(cli_argv(*_PLACEHOLDERS[:2], "monitoring", *_PLACEHOLDERS[2:]))
# The scoring pipeline (scoring ticks, and batches under the score prefix): ``ctloop score``; ``{input}`` is the
# mirrored batch folder ("" for a tick: the scoring window of the settings).
DEFAULT_SCORE_COMMAND = tuple(cli_argv(*_PLACEHOLDERS[:2], "scoring", *_PLACEHOLDERS[2:], "{input}"))
LAUNCH_PLACEHOLDERS = frozenset(p.strip("{}") for p in (*_PLACEHOLDERS, "{input}"))
# Batch mode by default: a batch of many files starts one run when its marker lands (the Spark/Hadoop
# convention); CTLOOP_TRIGGER_MARKERS="" switches to one run per data file.
DEFAULT_MARKERS = ("_SUCCESS",)
# always: every new batch launches training; on_drift / on_decay / on_drift_or_decay: it launches the monitoring
# pipeline, which retrains only when that condition holds (drift of the batch, decay of the champion);
# config: the ctloop config's monitoring.retrain_policy, read at each launch.
POLICIES = ("always", "on_drift", "on_decay", "on_drift_or_decay", "config")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_JOB_PREFIX = re.compile(r"^[a-z][a-z0-9-]{0,90}[a-z0-9]$")
_PLACEHOLDER = re.compile(r"\{([a-z_]*)\}")


class SettingsError(ValueError):
    """The function is misconfigured (a deployment problem, not a message problem)."""


@dataclass(frozen=True)
class LaunchTarget:
    template: str
    display_name: str
    job_prefix: str
    command: tuple[str, ...]
    template_variable: str  # the setting that names the template, for error messages


@dataclass(frozen=True)
class TriggerSettings:
    """What to react to and how to launch. Env var names are ``CTLOOP_TRIGGER_<FIELD>`` (upper case)."""

    bucket: str
    backend: Literal["cloud", "local"] = "cloud"
    prefix: str = ""
    suffixes: tuple[str, ...] = (".parquet",)
    ignore_suffixes: tuple[str, ...] = (".tmp", "_COPYING_", ".crc", ".partial")
    name_pattern: re.Pattern[str] | None = None
    markers: tuple[str, ...] = DEFAULT_MARKERS  # non-empty = batch mode: these base names launch their folder
    max_name_bytes: int = 1024  # the Cloud Storage limit
    job_prefix: str = "ctloop-train"
    # The ctloop settings YAML: a path (relative = inside this bundle) or gs://bucket/object.
    config: str = "ctloop.yaml"
    # cloud
    template: str = ""  # compiled pipeline YAML (path, gs://) or Artifact Registry URI (https://...-kfp.pkg.dev/...)
    display_name: str = "ctloop-training"
    api_endpoint: str = ""  # override the Vertex endpoint (plain http:// = a local test server, anonymous)
    # local
    state_dir: str = ""  # ledger.sqlite and logs/ live here
    launch_command: tuple[str, ...] = DEFAULT_LAUNCH_COMMAND
    launch_cwd: str = ""
    ledger_timeout: float = 5.0  # seconds to wait on a locked ledger before failing the delivery (retried)
    claim_seconds: float = 120.0  # a launch claimed longer ago than this without finishing may be taken over
    mirror_dir: str = ""  # when set, the triggering object(s) are copied here before a local launch
    # retrain policy and the monitoring pipeline it (and every schedule tick) launches
    policy: Literal["always", "on_drift", "on_decay", "on_drift_or_decay", "config"] = "always"
    monitor_template: str = ""  # cloud: the compiled monitoring pipeline (path, gs:// or Artifact Registry URI)
    monitor_display_name: str = "ctloop-monitoring"
    monitor_job_prefix: str = "ctloop-monitor"
    monitor_command: tuple[str, ...] = DEFAULT_MONITOR_COMMAND
    # batch scoring: scoring ticks, and new batches under score_prefix ("" = no "score this" prefix)
    score_prefix: str = ""
    score_template: str = ""  # cloud: the compiled scoring pipeline (path, gs:// or Artifact Registry URI)
    score_display_name: str = "ctloop-scoring"
    score_job_prefix: str = "ctloop-score"
    score_command: tuple[str, ...] = DEFAULT_SCORE_COMMAND

    @property
    def batch_mode(self) -> bool:
        return bool(self.markers)

    def target(self, pipeline: Pipeline) -> LaunchTarget:
        """What launching ``pipeline`` takes: its template, display name, job id prefix and local command."""
        if pipeline == "monitoring":
            return LaunchTarget(self.monitor_template, self.monitor_display_name, self.monitor_job_prefix,
                                self.monitor_command, "MONITOR_TEMPLATE")
        if pipeline == "scoring":
            return LaunchTarget(self.score_template, self.score_display_name, self.score_job_prefix,
                                self.score_command, "SCORE_TEMPLATE")
        return LaunchTarget(self.template, self.display_name, self.job_prefix, self.launch_command, "TEMPLATE")

    def resolve_bundle_path(self, value: str) -> str:
        """Relative paths are relative to the function bundle, not to the server's working directory."""
        if not value or "://" in value or Path(value).is_absolute():
            return value
        return str(BUNDLE_DIR / value)


def _env(environ: Mapping[str, str], name: str, default: str = "") -> str:
    return environ.get(ENV_PREFIX + name, default).strip()


def _list(environ: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = environ.get(ENV_PREFIX + name)
    if raw is None:
        return default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _number(environ: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = _env(environ, name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{ENV_PREFIX}{name}: expected a number, found {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{ENV_PREFIX}{name}: expected at least {minimum}, found {raw!r}")
    return value


def _launch_command(environ: Mapping[str, str], var: str = "LAUNCH_COMMAND",
                    default: tuple[str, ...] = DEFAULT_LAUNCH_COMMAND) -> tuple[str, ...]:
    name = ENV_PREFIX + var
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        argv = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{name}: expected a JSON list of arguments, found {raw!r} ({exc})") from None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise SettingsError(f"{name}: expected a non-empty JSON list of strings, found {raw!r}")
    for arg in argv:
        unknown = set(_PLACEHOLDER.findall(arg)) - LAUNCH_PLACEHOLDERS
        if unknown:
            raise SettingsError(f"{name}: unknown placeholder(s) {sorted(unknown)} in {arg!r}; "
                                f"expected only {sorted(LAUNCH_PLACEHOLDERS)}")
    if not any("{run_id}" in a for a in argv):
        raise SettingsError(f"{name}: the command must pass {{run_id}} (the idempotency key) to the pipeline")
    return tuple(argv)


def _job_prefix(environ: Mapping[str, str], var: str, default: str) -> str:
    prefix = _env(environ, var, default)
    if not _JOB_PREFIX.match(prefix):
        raise SettingsError(f"{ENV_PREFIX}{var}: expected [a-z][a-z0-9-]* (at most 92 chars, "
                            f"no trailing '-'), found {prefix!r}")
    return prefix


def _object_prefix(var: str, prefix: str) -> str:
    if prefix.startswith("/") or "\\" in prefix or ".." in prefix.split("/"):
        raise SettingsError(f"{ENV_PREFIX}{var}: expected an object name prefix such as 'ctloop/events/', "
                            f"found {prefix!r}")
    return prefix


def load_settings(environ: Mapping[str, str]) -> TriggerSettings:
    """Build and validate the settings from ``environ`` (normally ``os.environ``)."""
    bucket = _env(environ, "BUCKET")
    if not _BUCKET.match(bucket):
        raise SettingsError(f"{ENV_PREFIX}BUCKET: expected a Cloud Storage bucket name, found {bucket!r}")
    backend = _env(environ, "BACKEND", "cloud")
    if backend not in ("cloud", "local"):
        raise SettingsError(f"{ENV_PREFIX}BACKEND: expected 'cloud' or 'local', found {backend!r}")
    prefix = _object_prefix("PREFIX", _env(environ, "PREFIX"))
    pattern_raw = _env(environ, "NAME_PATTERN")
    try:
        pattern = re.compile(pattern_raw) if pattern_raw else None
    except re.error as exc:
        raise SettingsError(f"{ENV_PREFIX}NAME_PATTERN: not a valid regular expression "
                            f"{pattern_raw!r}: {exc}") from None
    markers = _list(environ, "MARKERS", DEFAULT_MARKERS)
    for marker in markers:
        if "/" in marker:
            raise SettingsError(f"{ENV_PREFIX}MARKERS: expected base names such as '_SUCCESS', "
                                f"found {marker!r}")
    job_prefix = _job_prefix(environ, "JOB_PREFIX", "ctloop-train")
    monitor_prefix = _job_prefix(environ, "MONITOR_JOB_PREFIX", "ctloop-monitor")
    if monitor_prefix == job_prefix:
        raise SettingsError(f"{ENV_PREFIX}MONITOR_JOB_PREFIX: must differ from {ENV_PREFIX}JOB_PREFIX "
                            f"({job_prefix!r}), or a batch's monitoring and training runs would share a job id")
    score_job_prefix = _job_prefix(environ, "SCORE_JOB_PREFIX", "ctloop-score")
    if score_job_prefix in (job_prefix, monitor_prefix):
        raise SettingsError(f"{ENV_PREFIX}SCORE_JOB_PREFIX: must differ from {ENV_PREFIX}JOB_PREFIX and "
                            f"{ENV_PREFIX}MONITOR_JOB_PREFIX ({score_job_prefix!r}), or runs would share job ids")
    score_prefix = _object_prefix("SCORE_PREFIX", _env(environ, "SCORE_PREFIX"))
    if score_prefix and (score_prefix.startswith(prefix) if prefix else True):
        raise SettingsError(f"{ENV_PREFIX}SCORE_PREFIX: {score_prefix!r} lies inside the training prefix "
                            f"{ENV_PREFIX}PREFIX={prefix!r}; batches to score must land outside it")
    if score_prefix and prefix.startswith(score_prefix):
        raise SettingsError(f"{ENV_PREFIX}SCORE_PREFIX: {score_prefix!r} contains the training prefix "
                            f"{ENV_PREFIX}PREFIX={prefix!r}; batches to score must land outside it")
    policy = _env(environ, "POLICY", "always")
    if policy not in POLICIES:
        raise SettingsError(f"{ENV_PREFIX}POLICY: expected one of {list(POLICIES)}, found {policy!r}")
    config = _env(environ, "CONFIG", "ctloop.yaml")
    settings = TriggerSettings(
        bucket=bucket,
        backend=backend,  # type: ignore[arg-type]
        prefix=prefix,
        suffixes=_list(environ, "SUFFIXES", (".parquet",)),
        ignore_suffixes=_list(environ, "IGNORE_SUFFIXES", TriggerSettings.ignore_suffixes),
        name_pattern=pattern,
        markers=markers,
        max_name_bytes=int(_number(environ, "MAX_NAME_BYTES", 1024, 1)),
        job_prefix=job_prefix,
        config=config,
        template=_env(environ, "TEMPLATE"),
        display_name=_env(environ, "DISPLAY_NAME", "ctloop-training"),
        api_endpoint=_env(environ, "API_ENDPOINT"),
        state_dir=_env(environ, "STATE_DIR"),
        launch_command=_launch_command(environ),
        launch_cwd=_env(environ, "LAUNCH_CWD"),
        ledger_timeout=_number(environ, "LEDGER_TIMEOUT", 5.0, 0.0),
        claim_seconds=_number(environ, "CLAIM_SECONDS", 120.0, 1.0),
        mirror_dir=_env(environ, "MIRROR_DIR"),
        policy=policy,  # type: ignore[arg-type]
        monitor_template=_env(environ, "MONITOR_TEMPLATE"),
        monitor_display_name=_env(environ, "MONITOR_DISPLAY_NAME", "ctloop-monitoring"),
        monitor_job_prefix=monitor_prefix,
        monitor_command=_launch_command(environ, "MONITOR_COMMAND", DEFAULT_MONITOR_COMMAND),
        score_prefix=score_prefix,
        score_template=_env(environ, "SCORE_TEMPLATE"),
        score_display_name=_env(environ, "SCORE_DISPLAY_NAME", "ctloop-scoring"),
        score_job_prefix=score_job_prefix,
        score_command=_launch_command(environ, "SCORE_COMMAND", DEFAULT_SCORE_COMMAND),
    )
    if backend == "cloud" and not settings.template:
        raise SettingsError(f"{ENV_PREFIX}TEMPLATE: required when {ENV_PREFIX}BACKEND=cloud (a compiled "
                            "pipeline YAML in the bundle, a gs:// URI or an Artifact Registry https:// URI)")
    if backend == "cloud" and policy != "always" and not settings.monitor_template:
        raise SettingsError(f"{ENV_PREFIX}MONITOR_TEMPLATE: required when {ENV_PREFIX}BACKEND=cloud and "
                            f"{ENV_PREFIX}POLICY={policy} (the compiled monitoring pipeline)")
    if backend == "cloud" and score_prefix and not settings.score_template:
        raise SettingsError(f"{ENV_PREFIX}SCORE_TEMPLATE: required when {ENV_PREFIX}BACKEND=cloud and "
                            f"{ENV_PREFIX}SCORE_PREFIX is set (the compiled scoring pipeline)")
    if backend == "local" and score_prefix and not settings.mirror_dir:
        raise SettingsError(f"{ENV_PREFIX}MIRROR_DIR: required when {ENV_PREFIX}BACKEND=local and "
                            f"{ENV_PREFIX}SCORE_PREFIX is set (local scoring runs read the mirrored batch)")
    if backend == "local" and not settings.state_dir:
        raise SettingsError(f"{ENV_PREFIX}STATE_DIR: required when {ENV_PREFIX}BACKEND=local "
                            "(a directory for the launch ledger and run logs)")
    return settings
