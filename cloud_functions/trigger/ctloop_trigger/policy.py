"""Which pipeline a new batch launches: training (``always``) or the monitoring pipeline (``on_drift``,
``on_decay``, ``on_drift_or_decay``), which checks the batch against the champion and launches training only
when the policy's condition holds."""

from __future__ import annotations

from ctloop.launching import Pipeline
from ctloop_trigger.ctloop_config import read_ctloop_config
from ctloop_trigger.settings import TriggerSettings


def retrain_policy(settings: TriggerSettings) -> str:
    """``CTLOOP_TRIGGER_POLICY``, or with ``config`` the ctloop config's ``monitoring.retrain_policy`` (read now,
    so a new config applies to the next batch)."""
    if settings.policy != "config":
        return settings.policy
    return read_ctloop_config(settings.resolve_bundle_path(settings.config)).monitoring.retrain_policy


def pipeline_for_batch(settings: TriggerSettings) -> tuple[Pipeline, str]:
    """The pipeline a new batch launches and the job id prefix of its runs."""
    if retrain_policy(settings) != "always":  # the monitoring pipeline decides (drift and/or decay)
        return "monitoring", settings.monitor_job_prefix
    return "training", settings.job_prefix
