"""The idempotency key: one object generation = one job id, however often its notification is delivered."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

_VERTEX_JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")


@dataclass(frozen=True)
class LaunchRequest:
    job_id: str
    trigger_uri: str  # gs://bucket/object#generation: the exact object version that caused the run
    batch: str  # gs://bucket/object, or gs://bucket/folder/ for a batch marker
    bucket: str
    name: str
    generation: str
    pipeline: Literal["training", "monitoring"] = "training"


def job_id_for(bucket: str, name: str, generation: str, prefix: str = "ctloop-train") -> str:
    """``<prefix>-<sha256(bucket/name#generation)[:16]>``: a valid Vertex PipelineJob id ([a-z0-9-])."""
    key = f"{bucket}/{name}#{generation}".encode("utf-8", errors="surrogatepass")
    digest = hashlib.sha256(key).hexdigest()
    job_id = f"{prefix}-{digest[:16]}"
    if not _VERTEX_JOB_ID.match(job_id):
        raise ValueError(f"job id prefix {prefix!r} does not make a valid PipelineJob id ({job_id!r})")
    return job_id


def launch_request(bucket: str, name: str, generation: str, batch: str, prefix: str,
                   pipeline: Literal["training", "monitoring"] = "training") -> LaunchRequest:
    return LaunchRequest(
        job_id=job_id_for(bucket, name, generation, prefix),
        trigger_uri=f"gs://{bucket}/{name}#{generation}",
        batch=batch,
        bucket=bucket,
        name=name,
        generation=generation,
        pipeline=pipeline,
    )
