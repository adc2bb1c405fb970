"""Thread settings for the OpenMP/BLAS work of local steps (train, evaluate, serving, tests).

scikit-learn's HistGradientBoosting and the BLAS behind NumPy run one thread per CPU, and by default OpenMP threads
spin at every barrier. On a machine shared with another busy process (a laptop with a browser open) one of them is
regularly descheduled and the others spin waiting for it: a fit slowed by far more than the CPU share it lost.
With ``OMP_WAIT_POLICY=PASSIVE`` a waiting thread sleeps instead, so the fit keeps every core on a quiet machine
and degrades with the CPU it actually loses on a busy one. The bench's contention section measures it.

The variables are read when the OpenMP/BLAS runtimes load, so they are set in the process environment before
any step, server or test imports NumPy or scikit-learn; step processes inherit them. Vertex steps, which have
their VM to themselves, do not go through here and keep the runtimes' defaults.
"""

import os

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
