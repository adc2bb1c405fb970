"""Dataproc Serverless batches (the transform and scoring jobs): stage the job file, create the batch, wait for it.

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
from ctloop.launching import label_value
from ctloop.steps import attempt_suffix, start_or_resume

if TYPE_CHECKING:
    from google.cloud import storage
    from google.cloud.dataproc_v1 import Batch, BatchControllerClient

log = logging.getLogger(__name__)

JOB_FILE = Path(__file__).parent / "spark" / "transform_job.py"
_TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
_MAX_ATTEMPTS = 10


class DataprocBatchError(CtloopError):
    """The Dataproc batch ended FAILED or CANCELLED; the message carries its state message."""


def batch_id_for(run_id: str, attempt: int = 1, step: str = "transform") -> str:
    """A valid Dataproc batch id (4-63 of [a-z0-9-]) derived from the run id; later attempts get a suffix.

    Readable slug plus a hash of the exact run id, so two run ids that slug alike still get different batches.
    """
    if not run_id:
        raise ValueError("run_id: empty; the transform needs the pipeline run id as its idempotency key")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    suffix = f"-{digest}" + attempt_suffix(attempt)
    slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    head = f"{step}-" + slug
    return head[: 63 - len(suffix)].rstrip("-") + suffix


def upload_job_file(client: "storage.Client", bucket: str, job_file: Path = JOB_FILE) -> str:
    """Upload the job file under its content hash unless already there; returns its URI."""
    from google.api_core import exceptions

    data = job_file.read_bytes()
    name = f"ctloop/spark/{hashlib.sha256(data).hexdigest()[:16]}/{job_file.name}"
    blob = client.bucket(bucket).blob(name)
    try:
        # if_generation_match=0: create only if absent, in one request; the name is the content, so an
        # existing object already holds these bytes.
        blob.upload_from_string(data, content_type="text/x-python", if_generation_match=0)
        log.info("uploaded %s to gs://%s/%s", job_file.name, bucket, name)
    except exceptions.PreconditionFailed:
        log.info("%s already staged at gs://%s/%s", job_file.name, bucket, name)
    return f"gs://{bucket}/{name}"


def build_batch(settings: Settings, run_id: str, main_uri: str, args: list[str], step: str = "transform",
                container_image: str = "") -> "Batch":
    """The Dataproc Serverless PySpark batch on the pinned runtime.

    The transform job needs only pyspark and the standard library, which the runtime provides: no custom
    container. A job that needs more names its ``container_image``: the scoring job unpickles the model, so it
    runs in ``gcp.scoring_image`` (components/spark/Dockerfile, a Dataproc custom container without Spark).
    """
    from google.cloud import dataproc_v1

    gcp = settings.gcp
    execution = dataproc_v1.ExecutionConfig(service_account=gcp.service_account,
                                            staging_bucket=gcp.staging_bucket)
    if gcp.dataproc_subnetwork:
        execution.subnetwork_uri = gcp.dataproc_subnetwork
    return dataproc_v1.Batch(
        pyspark_batch=dataproc_v1.PySparkBatch(main_python_file_uri=main_uri, args=args),
        runtime_config=dataproc_v1.RuntimeConfig(version=gcp.dataproc_runtime_version,
                                                 container_image=container_image or None),
        environment_config=dataproc_v1.EnvironmentConfig(execution_config=execution),
        labels={**settings.labels, "ctloop-step": step, "ctloop-run": label_value(run_id)},
    )


def submit_batch(client: "BatchControllerClient", parent: str, batch: "Batch", run_id: str,
                 poll_seconds: float, timeout_seconds: float, step: str = "transform") -> "Batch":
    """Create the run's batch and wait for it; a Conflict means a rerun step: wait on the existing batch.

    An existing batch that FAILED or was CANCELLED is not resurrected: the next attempt id is tried instead,
    so rerunning a failed step reruns the job while a rerun of a running or finished one does not.
    """

    def create(batch_id: str) -> None:
        client.create_batch(request={"parent": parent, "batch": batch, "batch_id": batch_id})
        log.info("created Dataproc batch %s/batches/%s", parent, batch_id)

    def failed(existing: "Batch") -> bool:
        log.info("Dataproc batch %s exists already (%s)", existing.name, existing.state.name)
        return existing.state.name in ("FAILED", "CANCELLED")

    try:
        batch_id, _ = start_or_resume(lambda attempt: batch_id_for(run_id, attempt, step), create,
                                   lambda batch_id: client.get_batch(name=f"{parent}/batches/{batch_id}"), failed,
                                   _MAX_ATTEMPTS, f"run {run_id!r}: Dataproc batch")
    except CtloopError as exc:
        raise DataprocBatchError(str(exc)) from exc
    return wait_for_batch(client, f"{parent}/batches/{batch_id}", poll_seconds, timeout_seconds)


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
