"""Dataproc Serverless batches for the transform job: stage the job file, create the batch, wait for it.

A batch id derives from the run id, so a retried step finds the batch its earlier attempt created.
"""

import hashlib
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ctloop.config import Settings
from ctloop.errors import CtloopError

if TYPE_CHECKING:
    from google.cloud import storage
    from google.cloud.dataproc_v1 import Batch, BatchControllerClient

log = logging.getLogger(__name__)

JOB_FILE = Path(__file__).parent / "spark" / "transform_job.py"
_TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
_MAX_ATTEMPTS = 10


class DataprocBatchError(CtloopError):
    """The Dataproc batch ended FAILED or CANCELLED; the message carries its state message."""


def batch_id_for(run_id: str, attempt: int = 1) -> str:
    """A valid Dataproc batch id (4-63 of [a-z0-9-]) derived from the run id; later attempts get a suffix.

    Readable slug plus a hash of the exact run id, so two run ids that slug alike still get different batches.
    """
    if not run_id:
        raise ValueError("run_id: empty; the transform needs the pipeline run id as its idempotency key")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    suffix = f"-{digest}" + (f"-a{attempt}" if attempt > 1 else "")
    slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    head = "transform-" + slug
    return head[: 63 - len(suffix)].rstrip("-") + suffix


def upload_job_file(client: "storage.Client", bucket: str) -> str:
    """Upload the job file under its content hash unless already there; returns its URI."""
    from google.api_core import exceptions

    data = JOB_FILE.read_bytes()
    name = f"ctloop/spark/{hashlib.sha256(data).hexdigest()[:16]}/{JOB_FILE.name}"
    blob = client.bucket(bucket).blob(name)
    try:
        # if_generation_match=0: create only if absent, in one request; the name is the content, so an
        # existing object already holds these bytes.
        blob.upload_from_string(data, content_type="text/x-python", if_generation_match=0)
        log.info("uploaded the transform job to gs://%s/%s", bucket, name)
    except exceptions.PreconditionFailed:
        log.info("transform job already staged at gs://%s/%s", bucket, name)
    return f"gs://{bucket}/{name}"


def build_batch(settings: Settings, run_id: str, main_uri: str, args: list[str]) -> "Batch":
    """The Dataproc Serverless PySpark batch: the component image carries the job's Python."""
    from google.cloud import dataproc_v1

    gcp = settings.gcp
    execution = dataproc_v1.ExecutionConfig(service_account=gcp.service_account,
                                            staging_bucket=gcp.staging_bucket)
    if gcp.dataproc_subnetwork:
        execution.subnetwork_uri = gcp.dataproc_subnetwork
    return dataproc_v1.Batch(
        pyspark_batch=dataproc_v1.PySparkBatch(main_python_file_uri=main_uri, args=args),
        runtime_config=dataproc_v1.RuntimeConfig(container_image=gcp.component_image),
        environment_config=dataproc_v1.EnvironmentConfig(execution_config=execution),
        labels={**settings.labels, "ctloop-step": "transform", "ctloop-run": _label_value(run_id)},
    )


def submit_batch(client: "BatchControllerClient", parent: str, batch: "Batch", run_id: str,
                 poll_seconds: float, timeout_seconds: float) -> "Batch":
    """Create the run's batch and wait for it; a Conflict means a retried step: wait on the existing batch.

    An existing batch that FAILED or was CANCELLED is not resurrected: the next attempt id is tried instead,
    so retrying a failed step reruns the job while a retry of a running or finished one does not.
    """
    from google.api_core import exceptions

    for attempt in range(1, _MAX_ATTEMPTS + 1):
        batch_id = batch_id_for(run_id, attempt)
        name = f"{parent}/batches/{batch_id}"
        try:
            client.create_batch(request={"parent": parent, "batch": batch, "batch_id": batch_id})
            log.info("created Dataproc batch %s", name)
        except exceptions.Conflict:
            existing = client.get_batch(name=name)
            state = existing.state.name
            log.info("Dataproc batch %s exists already (%s)", name, state)
            if state in ("FAILED", "CANCELLED"):
                continue
        return wait_for_batch(client, name, poll_seconds, timeout_seconds)
    raise DataprocBatchError(f"run {run_id!r}: {_MAX_ATTEMPTS} Dataproc batch attempts exist and all failed; "
                             f"see {parent}/batches/{batch_id_for(run_id, _MAX_ATTEMPTS)}")


def wait_for_batch(client: "BatchControllerClient", name: str, poll_seconds: float,
                   timeout_seconds: float) -> "Batch":
    """Poll until the batch ends, logging state changes; unless it succeeded, raise with its state message."""
    started = time.monotonic()
    last = None
    while True:
        batch = client.get_batch(name=name)
        state = batch.state.name
        if state != last:
            log.info("Dataproc batch %s: %s (%.0f s)", name, state, time.monotonic() - started)
            last = state
        if state in _TERMINAL:
            break
        if time.monotonic() - started > timeout_seconds:
            raise TimeoutError(f"Dataproc batch {name} still {state} after {timeout_seconds:.0f} s")
        time.sleep(poll_seconds)
    if state != "SUCCEEDED":
        output = batch.runtime_info.output_uri if batch.runtime_info else ""
        raise DataprocBatchError(f"Dataproc batch {name} {state}: {batch.state_message or 'no state message'}"
                                 + (f" (driver output: {output})" if output else ""))
    return batch


def _label_value(text: str) -> str:
    """A GCP label value: lowercase letters, digits, - and _, at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower())[:63]
