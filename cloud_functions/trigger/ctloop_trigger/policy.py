"""Which pipeline a new batch launches: training (``always``) or the monitoring pipeline (``on_drift``), which
checks the batch for drift against the champion and launches training only when it drifted."""

from __future__ import annotations

from typing import Literal

from ctloop_trigger.ctloop_config import ConfigError, read_ctloop_config
from ctloop_trigger.settings import TriggerSettings

Pipeline = Literal["training", "monitoring"]
RETRAIN_POLICIES = ("always", "on_drift", "on_decay", "on_drift_or_decay")


def retrain_policy(settings: TriggerSettings) -> str:
    """``CTLOOP_TRIGGER_POLICY``, or with ``config`` the ctloop config's ``monitoring.retrain_policy`` (read now,
    so a new config applies to the next batch; unset there means ``always``)."""
    if settings.policy != "config":
        return settings.policy
    location = settings.resolve_bundle_path(settings.config)
    config = read_ctloop_config(location)
    monitoring = config.get("monitoring") or {}
    if not isinstance(monitoring, dict):
        raise ConfigError(f"ctloop config {location}: monitoring must be a mapping, found {type(monitoring).__name__}")
    policy = monitoring.get("retrain_policy", "always")
    if policy not in RETRAIN_POLICIES:
        raise ConfigError(f"ctloop config {location}: monitoring.retrain_policy must be one of "
                          f"{list(RETRAIN_POLICIES)}, found {policy!r}")
    return str(policy)


def pipeline_for_batch(settings: TriggerSettings) -> tuple[Pipeline, str]:
    """The pipeline a new batch launches and the job id prefix of its runs."""
    if retrain_policy(settings) != "always":  # the monitoring pipeline decides (drift and/or decay)
        return "monitoring", settings.monitor_job_prefix
    return "training", settings.job_prefix
