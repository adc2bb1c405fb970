"""Train under CPU contention: the same train step alone, and with one busy process on the machine.

scikit-learn's HistGradientBoosting runs OpenMP parallel regions with one thread per CPU. OpenMP threads
spin at each barrier before sleeping, so when another process holds one of the CPUs, every barrier waits for a
descheduled thread and the fit slows down by far more than the lost CPU share. This measures it, and the two
usual remedies: ``OMP_WAIT_POLICY=PASSIVE`` (sleep at barriers) and ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.report import Figure, Section, Table, fmt_number
from bench.workspace import PYTHON

VARIANTS = (
    ("alone", {}, False),
    ("one busy process competing", {}, True),
    ("competing, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, True),
    ("competing, OMP_NUM_THREADS=1", {"OMP_NUM_THREADS": "1"}, True),
)


@contextlib.contextmanager
def busy_process(active: bool) -> Iterator[None]:
    """A process spinning on one CPU for the duration of the block (ended by its pid afterwards)."""
    if not active:
        yield
        return
    proc = subprocess.Popen([PYTHON, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def run_variants(split_dir: Path, work: Path, echo: Any) -> dict[str, dict[str, Any]]:
    from bench.scaling import measure

    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for i, (label, env, busy) in enumerate(VARIANTS):
        echo(f"  loop: train {label} ...")
        with busy_process(busy):
            results[label] = measure("train", split_dir, work / f"model-{i}", work, timeout=600.0, env=env,
                                     tag=f"-{i}")
    return results


def add_to(section: Section, results: dict[str, dict[str, Any]]) -> None:
    alone = results["alone"]
    base = alone.get("seconds")
    for label, r in results.items():
        if label != "alone":
            section.figures.append(Figure(f"train, {label}", r.get("seconds"), "s", "train alone", base))
    rows = [[label, fmt_number(r.get("seconds")) if "error" not in r else "failed", fmt_number(r.get("cpu")),
             fmt_number(r.get("wall"))] for label, r in results.items()]
    section.tables.append(Table("Train step under CPU contention (fresh process each; seconds)",
                                ["variant", "train work", "CPU of the process", "process wall"], rows))
    section.notes.append(
        "HistGradientBoosting uses one OpenMP thread per CPU; its threads spin at every barrier, so one other "
        "busy process on a 2-CPU machine stalls each barrier on a descheduled thread (see the contention table).")
