"""The online lookup's added latency on a local prediction (part of the ``serving`` suite).

The same rows are sent to the product's app (``serving.app.create_app`` under uvicorn on 127.0.0.1, one keep-alive
client, one instance per request) in two forms, alternately so drift hits both alike: with every model
feature (the baseline: nothing looked up) and as a client sends them (entity id, event time, source features),
which makes the server read the entity's state from the SQLite online store and derive the history features.
The same comparison runs in process (no HTTP): validate + score vs validate + lookup + derive + score.
The store holds the test split's states, so each row is its entity's latest event, replayed.

Standalone: ``python -m bench.online_lookup MODEL_DIR TEST_DIR`` (e.g. a ``ctloop run``'s model and test split).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import Figure
from bench.stats import percentile

# The target: the lookup adds under 2 ms to a local prediction's p50.
TARGET_ADDED_MS = ("<", 2.0)


def _instances(test_dir: Path, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(raw instances, the same rows with every model feature)."""
    from ctloop.config import Settings
    from ctloop.smoke import json_records, smoke_instances

    rows = smoke_instances(Settings(), test_dir, n)
    return list(rows), json_records(rows.offline)


def measure(model_dir: Path, test_dir: Path, calls: int = 2000, seconds: float = 10.0) -> list[Figure]:
    import httpx

    from components.materialize import materialize
    from ctloop.model_runtime import load_model
    from ctloop.online_store import SQLiteStore
    from serving.app import ServedModel, create_app
    from serving.background import running_server
    from serving.model import InstanceValidator

    raw, full = _instances(test_dir, 500)
    with tempfile.TemporaryDirectory(prefix="ctloop-bench-online-") as tmp:
        store = SQLiteStore(Path(tmp) / "store.sqlite")
        materialize(store, [str(test_dir)])
        loaded = load_model(model_dir)
        validator = InstanceValidator(loaded.card)

        def baseline_call(i: int) -> None:
            loaded.probabilities(validator.columns([full[i]]))

        def lookup_call(i: int) -> None:
            parsed = validator.parse([raw[i]], now_us=time.time_ns() // 1000)
            _fill_now(parsed, validator, store)
            loaded.probabilities(parsed.columns)

        in_process = _alternate(baseline_call, lookup_call, len(raw), calls, seconds)
        app = create_app([ServedModel("bench", model_dir)], online_store=store)
        bodies_full = [{"instances": [inst]} for inst in full]
        bodies_raw = [{"instances": [inst]} for inst in raw]
        with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            def post(body: dict[str, Any]) -> None:
                r = client.post("/predict", json=body)
                r.raise_for_status()

            over_http = _alternate(lambda i: post(bodies_full[i]), lambda i: post(bodies_raw[i]), len(raw),
                                   calls, seconds)
    figures = []
    for where, (base, looked) in (("HTTP, 1 client", over_http), ("in process, no HTTP", in_process)):
        p50_base, p50_lookup = percentile(base, 50), percentile(looked, 50)
        figures += [
            Figure(f"single-instance p50 with the online lookup ({where}, {loaded.runtime})", p50_lookup, "ms",
                   "the same rows sent with every feature (no lookup)", p50_base),
            Figure(f"online lookup's added p50 ({where})", p50_lookup - p50_base, "ms",
                   target=TARGET_ADDED_MS if where.startswith("HTTP") else None,
                   note=f"{len(looked)} requests of each form, alternating"),
        ]
    return figures


def _fill_now(parsed: Any, validator: Any, store: Any) -> None:
    """``fill_history`` on the SQLite store (which it never awaits), without an event loop per call."""
    from serving.online import fill_history

    coro = fill_history(parsed, 1, validator, store)
    try:
        coro.send(None)
    except StopIteration:
        return
    raise RuntimeError("fill_history awaited on a non-blocking store")


def _alternate(base: Any, lookup: Any, n: int, calls: int, seconds: float) -> tuple[list[float], list[float]]:
    for i in range(min(n, 50)):  # warm-up
        base(i)
        lookup(i)
    base_ms: list[float] = []
    lookup_ms: list[float] = []
    deadline = time.perf_counter() + seconds
    for k in range(calls):
        if time.perf_counter() >= deadline:
            break
        i = k % n
        t0 = time.perf_counter()
        base(i)
        t1 = time.perf_counter()
        lookup(i)
        t2 = time.perf_counter()
        base_ms.append((t1 - t0) * 1000)
        lookup_ms.append((t2 - t1) * 1000)
    return base_ms, lookup_ms


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.online_lookup MODEL_DIR TEST_DIR")
    for fig in measure(Path(sys.argv[1]), Path(sys.argv[2])):
        ratio = f"  (x{fig.ratio:.2f} of {fig.baseline:.3f} ms)" if fig.ratio is not None else ""
        print(f"{fig.name}: {fig.value:.3f} {fig.unit}{ratio}"
              f"{f'  target {fig.target[0]} {fig.target[1]}' if fig.target else ''}")
