"""One delivery in, one decision out: launch, already launched, ignored or rejected; transient errors raise.

Returning normally acknowledges the Pub/Sub message (HTTP 2xx); raising makes functions-framework answer 500
so Pub/Sub redelivers it. Only failures that a later attempt can fix raise.

A new batch launches the training pipeline, or under the ``on_drift`` retrain policy the monitoring pipeline
(ctloop_trigger/policy.py); a batch under the score prefix launches the scoring pipeline over it; a schedule tick
(ctloop_trigger/schedule.py) launches the pipeline it names (monitoring or scoring).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ctloop_trigger.jobs import LaunchRequest, launch_request
from ctloop_trigger.logs import log
from ctloop_trigger.names import decide
from ctloop_trigger.notification import MalformedMessage, parse_event
from ctloop_trigger.policy import pipeline_for_batch
from ctloop_trigger.schedule import parse_tick, tick_request
from ctloop_trigger.settings import TriggerSettings


class Launcher(Protocol):
    def launch(self, request: LaunchRequest) -> bool:
        """True = started now, False = had been started already; raise for a retryable failure."""


@dataclass(frozen=True)
class Outcome:
    action: Literal["launched", "already_launched", "ignored", "rejected"]
    reason: str
    job_id: str | None = None
    trigger_uri: str | None = None


def handle_event(event: Any, settings: TriggerSettings, launcher: Launcher) -> Outcome:
    """Parse, filter and launch; every path writes exactly one outcome log line."""
    started = time.monotonic()
    event_id = _event_id(event)
    try:
        tick = parse_tick(event)
    except MalformedMessage as exc:
        log("WARNING", "rejected: malformed schedule tick", outcome="rejected", reason=str(exc), event_id=event_id)
        return Outcome("rejected", str(exc))
    if tick is not None:
        where = {"event_id": event_id, "schedule": tick.schedule, "publish_time": tick.publish_time}
        return _launch(tick_request(tick, settings.target(tick.schedule).job_prefix), "schedule tick", settings,
                       launcher, started, where)
    try:
        note = parse_event(event)
    except MalformedMessage as exc:
        log("WARNING", "rejected: malformed message", outcome="rejected", reason=str(exc), event_id=event_id)
        return Outcome("rejected", str(exc))
    where = {"event_id": note.event_id or event_id, "bucket": note.bucket, "object": note.name,
             "generation": note.generation}
    decision = decide(note, settings)
    if decision.action == "reject":
        log("WARNING", f"rejected: {decision.reason}", outcome="rejected", reason=decision.reason, **where)
        return Outcome("rejected", decision.reason)
    if decision.action == "ignore":
        log("INFO", f"ignored: {decision.reason}", outcome="ignored", reason=decision.reason, **where)
        return Outcome("ignored", decision.reason)
    try:
        # may read the ctloop config: a failure is retried
        pipeline, prefix = ("scoring", settings.score_job_prefix) if decision.score else pipeline_for_batch(settings)
    except Exception as exc:
        log("ERROR", "retrain policy unavailable; the delivery will be retried", outcome="retry",
            error=f"{type(exc).__name__}: {exc}", **where)
        raise
    request = launch_request(note.bucket, note.name, note.generation, decision.batch, prefix, pipeline,
                             batch_mode=settings.batch_mode, snapshot_time=note.resource.get("timeCreated"))
    return _launch(request, decision.reason, settings, launcher, started, where)


def _launch(request: LaunchRequest, reason: str, settings: TriggerSettings, launcher: Launcher, started: float,
            where: dict[str, Any]) -> Outcome:
    try:
        created = launcher.launch(request)
    except Exception as exc:
        log("ERROR", "launch failed; the delivery will be retried", outcome="retry",
            error=f"{type(exc).__name__}: {exc}", job_id=request.job_id, trigger_uri=request.trigger_uri,
            pipeline=request.pipeline, **where)
        raise
    action: Literal["launched", "already_launched"] = "launched" if created else "already_launched"
    log("NOTICE", f"launched {request.pipeline} run" if created else
        "already launched: duplicate delivery acknowledged",
        outcome=action, reason=reason, job_id=request.job_id, trigger_uri=request.trigger_uri,
        batch=request.batch, pipeline=request.pipeline, backend=settings.backend,
        seconds=round(time.monotonic() - started, 4), **where)
    return Outcome(action, reason, request.job_id, request.trigger_uri)


def _event_id(event: Any) -> str | None:
    try:
        value = event["id"]
    except (KeyError, TypeError):
        value = getattr(event, "id", None)
    return str(value) if value else None
