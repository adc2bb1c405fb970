"""How a component body runs inside its step: the one place that decides what is retried and what a failure says.

- Expected errors (``CtloopError``: bad data, bad settings, a rejected precondition) are deterministic: the step
  fails at once, printing one line, ``ctloop error: <reason>``, as the last line of its stderr and exiting 1
  without a traceback. The local runner shows that line per failed step (pipelines/local_run.py). On Vertex the
  task's error message quotes the tail of the container's stderr and, where the container has one, its
  Kubernetes termination log, which gets the same line.
- Transient Google API errors (429, 500, 503, connection resets: ``google.api_core.retry.if_transient_error``)
  retry the whole body with backoff, in the same process. Bodies are idempotent (deterministic job ids, atomic
  moves), so a rerun picks up where the failed attempt stopped. The pipelines set no step-level retry: KFP would
  rerun a step for any failure, deterministic ones included.
- A step's process ends soon after its body: at exit the objects still alive are frozen (``gc.freeze``), so the
  interpreter's final collections do not walk every object the step imported or made. That is 0.3 s of a train
  step's exit with scikit-learn loaded (0.35 -> 0.05 s). Python promises no finalizer for an object alive at exit
  either way; atexit hooks and closing what goes out of scope run as before.
"""

import atexit
import contextlib
import functools
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ctloop.errors import CtloopError

REASON_PREFIX = "ctloop error: "
TERMINATION_LOG = Path("/dev/termination-log")  # Kubernetes' default terminationMessagePath
T = TypeVar("T")

# Backoff for transient errors: 2 s, 4 s, 8 s ... up to 60 s apart, giving up 10 minutes after the first one.
RETRY_INITIAL_S = 2.0
RETRY_MAX_S = 60.0
RETRY_DEADLINE_S = 600.0


def transient_retry(deadline_s: float = RETRY_DEADLINE_S, initial_s: float = RETRY_INITIAL_S,
                    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """The retry policy for a step body: transient Google API errors only (``google.api_core.retry.Retry``).

    The policy is built at the body's first exception: a body that raises none, as every local step, does not
    import google.api_core (0.1 s of a fresh step process).
    """

    def wrap(func: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> T:
            try:
                return func(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the policy below decides: retried or raised as it is
                first: list[Exception] = [exc]
            from google.api_core.retry import Retry, if_transient_error

            def attempt() -> T:
                # The policy's first attempt is the one that already failed: it sees that error, then retries.
                if first:
                    raise first.pop()
                return func(*args, **kwargs)

            policy = Retry(predicate=if_transient_error, initial=initial_s, maximum=RETRY_MAX_S, multiplier=2.0,
                           timeout=deadline_s,
                           on_error=lambda exc: print(f"transient error, retrying: {exc}", flush=True))
            return policy(attempt)()

        return call

    return wrap


def reason_line(exc: BaseException) -> str:
    """The one line a failed step ends its log with."""
    return REASON_PREFIX + " ".join(str(exc).split())


def run_step(body: Callable[..., T], *args: Any, retry: Any = None, termination_log: Path = TERMINATION_LOG,
             **kwargs: Any) -> T:
    """Run a component's body under the step policy (module docstring); ``retry`` overrides the backoff."""
    atexit.unregister(gc.freeze)  # once per process, however many bodies it runs
    atexit.register(gc.freeze)
    try:
        return (retry or transient_retry())(body)(*args, **kwargs)
    except CtloopError as exc:
        line = reason_line(exc)
        print(line, file=sys.stderr, flush=True)
        if termination_log.exists():
            with contextlib.suppress(OSError):  # not writable here: the log line is enough
                termination_log.write_text(line + "\n")
        raise SystemExit(1) from None


def attempt_suffix(attempt: int) -> str:
    """What a job id gets for a later attempt of the same work ('' for the first)."""
    return f"-a{attempt}" if attempt > 1 else ""


def start_or_resume(make_id: Callable[[int], str], start: Callable[[str], Any], existing: Callable[[str], Any],
                    failed: Callable[[Any], bool], max_attempts: int, what: str) -> tuple[str, Any]:
    """Start a cloud job under a deterministic id, the same way for every job a step runs (BigQuery, Dataproc).

    Attempt ``n``'s id is ``make_id(n)``. A free id starts the job; an id that exists means a rerun of the step:
    a job still running or done is waited on, not started twice, while a failed one is not resurrected: the next
    attempt's id is tried. Returns the id to wait on and what ``start`` or ``existing`` returned for it.
    """
    from google.api_core.exceptions import Conflict

    for attempt in range(1, max_attempts + 1):
        job_id = make_id(attempt)
        try:
            return job_id, start(job_id)
        except Conflict:
            job = existing(job_id)
            if not failed(job):
                return job_id, job
            print(f"{what} {job_id} exists and failed; starting attempt {attempt + 1}", flush=True)
    raise CtloopError(f"{what}: {max_attempts} attempts exist and all failed; the last is {make_id(max_attempts)}")
