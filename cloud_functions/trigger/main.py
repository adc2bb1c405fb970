"""Cloud Function entry point: Cloud Storage notification (Pub/Sub CloudEvent) -> one training pipeline run.

Deploy the bundle of this directory and the runtime modules it imports (``make trigger-bundle``), e.g.::

    gcloud functions deploy ctloop-trigger --gen2 --runtime=python311 --source=build/trigger-function \\
        --entry-point=on_object_finalized --trigger-topic=<notification topic> \\
        --set-env-vars=CTLOOP_TRIGGER_BUCKET=...,CTLOOP_TRIGGER_TEMPLATE=...,CTLOOP_TRIGGER_CONFIG=gs://...

Settings come from ``CTLOOP_TRIGGER_*`` environment variables (see ctloop_trigger/settings.py), read once per
instance. Locally the same file runs under ``functions-framework --signature-type cloudevent``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import functions_framework
from ctloop_trigger.handler import Launcher, Outcome, handle_event
from ctloop_trigger.logs import log
from ctloop_trigger.settings import SettingsError, TriggerSettings, load_settings

_lock = threading.Lock()
_runtime: tuple[TriggerSettings, Launcher] | None = None


def build_launcher(settings: TriggerSettings) -> Launcher:
    if settings.backend == "local":
        from ctloop_trigger.local_launcher import LocalLauncher

        return LocalLauncher(settings)
    from ctloop_trigger.vertex_launcher import VertexLauncher

    return VertexLauncher(settings)


def runtime() -> tuple[TriggerSettings, Launcher]:
    """Settings and launcher, built on the first event and reused by every later one in this instance."""
    global _runtime
    with _lock:
        if _runtime is None:
            try:
                settings = load_settings(os.environ)
                launcher = build_launcher(settings)
            except SettingsError as exc:
                # A deployment error: fail the delivery (it is retried) so no notification is lost meanwhile.
                log("ERROR", f"function misconfigured: {exc}", outcome="retry")
                raise
            except Exception as exc:  # e.g. the ledger is locked right now
                log("ERROR", f"function could not start: {type(exc).__name__}: {exc}", outcome="retry")
                raise
            _runtime = (settings, launcher)
        return _runtime


def _warm_up() -> None:
    """Build the runtime at cold start (heavy client imports happen before the first event, not during it).

    A misconfiguration is logged here and raised again on every event, so deliveries are retried until the
    settings are fixed instead of being acknowledged and lost.
    """
    with contextlib.suppress(Exception):
        runtime()


_warm_up()


@functions_framework.cloud_event
def on_object_finalized(cloud_event: Any) -> Outcome:
    settings, launcher = runtime()
    return handle_event(cloud_event, settings, launcher)
