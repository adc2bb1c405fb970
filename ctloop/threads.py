"""Thread settings for the OpenMP/BLAS work of local steps (train, evaluate, serving, tests).

scikit-learn's HistGradientBoosting and the BLAS behind NumPy run one thread per CPU, and by default OpenMP threads
spin at every barrier. On a machine shared with another busy process (a laptop with a browser open) one of them is
regularly descheduled and the others spin waiting for it: a fit slowed by far more than the CPU share it lost.
With ``OMP_WAIT_POLICY=PASSIVE`` a waiting thread sleeps instead, so the fit keeps every core on a quiet machine
and degrades with the CPU it actually loses on a busy one. The bench's contention section measures it.

The variables are read when the OpenMP/BLAS runtimes load, so they are set in the process environment before
any step, server or test imports NumPy or scikit-learn; step processes inherit them. Vertex steps, which have
their VM to themselves, do not go through here and keep the runtimes' defaults.

A local fit (``fit_threads``) also takes only the CPUs other processes leave idle when it starts: even sleeping
waiters leave the fit's barriers waiting on a thread that shares a CPU with another busy process, while one
thread per idle CPU never waits on a descheduled peer. A quiet machine keeps every core.
"""

import contextlib
import os
import time
from collections.abc import Iterator

from ctloop.config import Settings


def thread_env(settings: Settings) -> dict[str, str]:
    """The environment variables the local thread settings translate to."""
    local = settings.local
    env = {"OMP_WAIT_POLICY": local.omp_wait_policy}
    if local.threads:
        env |= dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), str(local.threads))
    return env


def use_local_threads(settings: Settings) -> dict[str, str]:
    """Put the local thread settings into this process's environment (before the runtimes load); returns them.

    A variable the user already set wins, so a one-off ``OMP_NUM_THREADS=1 ctloop run`` still works.
    """
    env = thread_env(settings)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in env}


def _cpu_times() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]  # user..steal; guest time is inside user
    return values[3] + values[4], sum(values)


def idle_cpus(sample_seconds: float = 0.1) -> float | None:
    """How many of this process's CPUs sat idle over ``sample_seconds``; None where /proc/stat is missing."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(sample_seconds)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    machine = os.cpu_count() or 1
    return min(float(len(os.sched_getaffinity(0))), (idle1 - idle0) / (total1 - total0) * machine)


@contextlib.contextmanager
def fit_threads(settings: Settings) -> Iterator[int | None]:
    """OpenMP threads for a fit: on the local backend without ``local.threads``, one per CPU idle at the start
    (at least one; every CPU on a quiet machine); elsewhere unchanged. Yields the limit set, or None."""
    if settings.backend != "local" or settings.local.threads:
        yield None
        return
    cpus = len(os.sched_getaffinity(0))
    idle = idle_cpus()
    threads = cpus if idle is None else max(1, min(cpus, round(idle)))
    if threads >= cpus:
        yield None
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="openmp"):
        yield threads
