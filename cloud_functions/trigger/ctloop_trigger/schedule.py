"""Schedule ticks: Pub/Sub messages Cloud Scheduler publishes to launch a pipeline: the monitoring pipeline
(terraform/monitoring.tf, ``ctloopSchedule=monitoring``) or the scoring pipeline (terraform/scoring.tf,
``ctloopSchedule=scoring``). A tick carries no Cloud Storage fields; its message id keys the run, so a redelivered
tick launches nothing new and every tick launches once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ctloop.launching import Pipeline
from ctloop_trigger.jobs import LaunchRequest, event_time, job_id_for
from ctloop_trigger.notification import MESSAGE_PUBLISHED, MalformedMessage, _get, _message

SCHEDULE_ATTRIBUTE = "ctloopSchedule"
SCHEDULES: tuple[Pipeline, ...] = ("monitoring", "scoring")  # the attribute's value is the pipeline
_MESSAGE_ID = re.compile(r"^[0-9A-Za-z_-]{1,100}$")


@dataclass(frozen=True)
class Tick:
    schedule: Pipeline
    message_id: str
    publish_time: str


def parse_tick(event: Any) -> Tick | None:
    """The tick in ``event``; None when the event is not a schedule tick (e.g. a storage notification).

    Raises MalformedMessage for a message that claims to be a tick but names an unknown schedule or has no id.
    """
    if _get(event, "type") != MESSAGE_PUBLISHED:
        return None
    try:
        message = _message(event)
    except MalformedMessage:
        return None
    attributes = message.get("attributes")
    if not isinstance(attributes, dict) or SCHEDULE_ATTRIBUTE not in attributes:
        return None
    schedule = attributes[SCHEDULE_ATTRIBUTE]
    if schedule not in SCHEDULES:
        raise MalformedMessage(f"attribute {SCHEDULE_ATTRIBUTE}: expected one of {list(SCHEDULES)}, "
                               f"found {schedule!r:.60}")
    message_id = str(message.get("messageId") or message.get("message_id") or _get(event, "id") or "")
    if not _MESSAGE_ID.match(message_id):
        raise MalformedMessage(f"schedule tick: expected a Pub/Sub message id, found {message_id!r:.60}")
    publish_time = str(message.get("publishTime") or message.get("publish_time") or "")
    return Tick(schedule=schedule, message_id=message_id, publish_time=publish_time)


def tick_request(tick: Tick, prefix: str) -> LaunchRequest:
    """One run of the tick's pipeline per tick: the job id hashes the schedule and the tick's message id; the
    run's window (recent data, rows to score) ends at the tick's publish time."""
    uri = f"schedule://{tick.schedule}#{tick.message_id}"
    return LaunchRequest(job_id=job_id_for("schedule", tick.schedule, tick.message_id, prefix), trigger_uri=uri,
                         batch=uri, bucket="", name=tick.schedule, generation=tick.message_id,
                         pipeline=tick.schedule, snapshot_time=event_time(tick.publish_time))
