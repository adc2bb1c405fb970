"""The retry policy of pipeline steps that call external services, shared by every pipeline."""

from kfp import dsl


def retry_transient(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Retry transient failures with backoff: 2 retries, 5 s doubling up to 60 s."""
    return task.set_retry(num_retries=2, backoff_duration="5s", backoff_factor=2.0, backoff_max_duration="60s")
