"""Train under CPU contention: the same train step alone, and with one busy process on the machine.

scikit-learn's HistGradientBoosting runs OpenMP parallel regions with one thread per CPU. OpenMP threads
spin at each barrier before sleeping, so when another process holds one of the CPUs, every barrier waits for a
descheduled thread and the fit slows down by far more than the lost CPU share. The train step runs with the
shipped thread settings (ctloop/threads.py: ``OMP_WAIT_POLICY=PASSIVE``); the contention ratio is its time with
one busy process competing over its time alone. Two variants show the alternatives: threads that spin
(``ACTIVE``, what the runtimes do at worst without the setting) and one thread.

``python -m bench.contention SPLIT_DIR`` measures this part alone on a folder holding train/ and valid/ splits.
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

SHIPPED = "one busy process competing"
VARIANTS = (
    ("alone", {}, False),
    (SHIPPED, {}, True),
    ("competing, OMP_WAIT_POLICY=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}, True),
    ("competing, OMP_NUM_THREADS=1", {"OMP_NUM_THREADS": "1"}, True),
)
TARGET_RATIO = 1.3


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


def run_variants(split_dir: Path, work: Path, echo: Any, labels: tuple[str, ...] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Each variant (or those in ``labels``) in a fresh train process; 'alone' always runs first."""
    from bench.scaling import measure

    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for i, (label, env, busy) in enumerate(VARIANTS):
        if labels is not None and label != "alone" and label not in labels:
            continue
        echo(f"  loop: train {label} ...")
        with busy_process(busy):
            results[label] = measure("train", split_dir, work / f"model-{i}", work, timeout=600.0, env=env,
                                     tag=f"-{i}")
    return results


def contention_ratio(results: dict[str, dict[str, Any]]) -> float | None:
    """Train time with one busy process competing over train time alone, shipped settings."""
    alone, busy = results["alone"].get("seconds"), results.get(SHIPPED, {}).get("seconds")
    return busy / alone if alone and busy else None


def add_to(section: Section, results: dict[str, dict[str, Any]]) -> None:
    alone = results["alone"]
    base = alone.get("seconds")
    for label, r in results.items():
        if label == SHIPPED:  # the contention ratio of the shipped settings, against its target
            section.figures.append(Figure(f"train, {label} (contention ratio)", r.get("seconds"), "s",
                                          "train alone", base, target=("<=", TARGET_RATIO), target_on_ratio=True))
        elif label != "alone":
            section.figures.append(Figure(f"train, {label}", r.get("seconds"), "s", "train alone", base))
    rows = [[label, fmt_number(r.get("seconds")) if "error" not in r else "failed", fmt_number(r.get("cpu")),
             fmt_number(r.get("wall"))] for label, r in results.items()]
    section.tables.append(Table("Train step under CPU contention (fresh process each; seconds)",
                                ["variant", "train work", "CPU of the process", "process wall"], rows))
    section.notes.append(
        "HistGradientBoosting uses one OpenMP thread per CPU; its threads spin at every barrier, so one other "
        "busy process on a 2-CPU machine stalls each barrier on a descheduled thread (see the contention table).")


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import tempfile

    p = argparse.ArgumentParser(prog="python -m bench.contention", description=__doc__.splitlines()[0])
    p.add_argument("split_dir", type=Path, help="folder with train/ and valid/ splits (a transform's output)")
    p.add_argument("--variant", action="append", choices=[label for label, _, _ in VARIANTS[1:]],
                   help="run only these besides 'alone' (default: all)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ctloop-contention-") as tmp:
        results = run_variants(args.split_dir, Path(tmp), print, tuple(args.variant) if args.variant else None)
    for label, r in results.items():
        print(f"{label:<40} {fmt_number(r.get('seconds'))} s" + (f"  ({r['error']})" if "error" in r else ""))
    ratio = contention_ratio(results)
    print(json.dumps({"contention_ratio_shipped": ratio, "target": TARGET_RATIO}))


if __name__ == "__main__":
    main()
