"""What one launch is: the job id (the idempotency key), the trigger URI and the snapshot time of the run.

Per-object mode: one object generation = one run. Batch mode (markers): one batch folder = one run, whichever
marker, generation or delivery arrives first; the others find the job existing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctloop.launching import LaunchError, Pipeline, batch_job_id, fixed_snapshot_time
from ctloop.launching import object_job_id as job_id_for


@dataclass(frozen=True)
class LaunchRequest:
    job_id: str
    trigger_uri: str  # gs://bucket/object#generation: the exact object version that caused the run
    batch: str  # gs://bucket/object, or gs://bucket/folder/ for a batch marker
    bucket: str
    name: str
    generation: str
    pipeline: Pipeline = "training"
    snapshot_time: str = ""  # the data window's end, fixed from the event so a redelivery sends the same


def event_time(value: object) -> str:
    """An event's timestamp as the run's snapshot time: ``value`` when it is ISO 8601 text, else now."""
    try:
        return fixed_snapshot_time(value) if isinstance(value, str) else fixed_snapshot_time()
    except LaunchError:
        return fixed_snapshot_time()


def launch_request(bucket: str, name: str, generation: str, batch: str, prefix: str,
                   pipeline: Pipeline = "training", *, batch_mode: bool = False,
                   snapshot_time: object = None) -> LaunchRequest:
    """The request for one object (``batch_mode``: for its batch folder ``batch``); ``snapshot_time`` is the
    event's time when known (e.g. the object's ``timeCreated``), else now."""
    job_id = batch_job_id(batch, prefix) if batch_mode else job_id_for(bucket, name, generation, prefix)
    return LaunchRequest(
        job_id=job_id,
        trigger_uri=f"gs://{bucket}/{name}#{generation}",
        batch=batch,
        bucket=bucket,
        name=name,
        generation=generation,
        pipeline=pipeline,
        snapshot_time=event_time(snapshot_time),
    )


__all__ = ["LaunchRequest", "event_time", "job_id_for", "launch_request"]
