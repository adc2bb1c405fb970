"""Suite ``serving``: the prediction server's throughput and latency vs the raw in-process model call.

The model is a real one trained on sample data (the loop suite's, or trained here the same way, gate included,
so its ONNX export is checked). Side by side, in the same run and under the same load: the product's app
(serving.app.create_app) under uvicorn on 127.0.0.1 scoring with ONNX Runtime (one worker; two workers over a
TCP_NODELAY-capable socket, bench/serving_app.py), the same two workers forced to scikit-learn, and the
aiplatform SDK's Custom Prediction Routine server (ModelServer + SklearnPredictor, bench/cpr.py) serving the
same model file. The load comes from bench.loadgen (closed loop, keep-alive clients in threads of this
process, bounded by count and time). The floor is the model call in this process (scikit-learn
``predict_proba`` and the ONNX Runtime session), one row or 100 rows per call.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult, closed_loop
from bench.report import Figure, Section, Table, fmt_number
from bench.rss import TreeSampler
from bench.stats import percentile
from bench.workspace import PYTHON, REPO, Context, ensure_sample_data

BATCH = 100
# (label, workers, launcher, runtime): "uvicorn" = uvicorn's command line; "tcp" = bench.serving_app's
# TCP_NODELAY socket; "cpr" = the aiplatform SDK's model server (bench/cpr.py). runtime: ctloop's
# CTLOOP_SERVING_RUNTIME ("auto" serves the gate-approved ONNX model).
CONFIGS = (("1 worker, ONNX", 1, "uvicorn", "auto"), ("2 workers, TCP socket, ONNX", 2, "tcp", "auto"),
           ("2 workers, TCP socket, scikit-learn", 2, "tcp", "sklearn"),
           ("CPR ModelServer + SklearnPredictor, 1 worker", 1, "cpr", ""))
# The targets apply to the product's server scoring with ONNX Runtime.
TARGETS = {"rate": (">=", 3000.0), "p99": ("<", 20.0), "rows": (">=", 50_000.0)}
_MB = 2**20


def ensure_model(ctx: Context) -> tuple[Path, Path]:
    """(model dir, test split dir): the loop suite's model, or one trained now by the floor's code path."""
    if "model_dir" in ctx.shared:
        return Path(ctx.shared["model_dir"]), Path(ctx.shared["test_dir"])
    from datetime import UTC, datetime

    from bench.loop import fresh_workdir, run_floor_process

    ctx.echo("  serving: training a model on sample data (the loop's steps in one process) ...")
    settings = ctx.settings("serving-model")
    landing = ensure_sample_data(ctx.data_root, ctx.loop_rows, settings).parent
    workdir = fresh_workdir(ctx.workdir / "serving-model", landing / "landing")
    snapshot = datetime.now(UTC).replace(microsecond=0).isoformat()
    _, floor = run_floor_process(workdir, landing, "bench-serving-model", snapshot, profile=False)
    ctx.shared.update(model_dir=floor["model_dir"], test_dir=floor["test_dir"])
    return Path(floor["model_dir"]), Path(floor["test_dir"])


def time_calls(fn: Callable[[Any], Any], inputs: list[Any], max_calls: int, max_seconds: float) -> LoadResult:
    """Call ``fn`` on ``inputs`` round robin, one at a time; per-call latency in ms."""
    result = LoadResult()
    deadline = time.perf_counter() + max_seconds
    t_start = time.perf_counter()
    for i in range(max_calls):
        if time.perf_counter() >= deadline:
            break
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        result.latencies_ms.append((time.perf_counter() - t0) * 1000)
    result.elapsed_s = time.perf_counter() - t_start
    return result


def _floor(model_dir: Path, instances: list[dict[str, Any]], budget: dict[str, float]) -> dict[str, LoadResult]:
    import pandas as pd

    from ctloop.model_runtime import load_model, onnx_probabilities
    from serving.model import InstanceValidator

    loaded = load_model(model_dir)
    validator = InstanceValidator(loaded.card)

    def frame(cols: dict[str, list[Any]]) -> pd.DataFrame:
        data = {n: pd.array(cols[n], dtype="float64") for n in loaded.card.numeric}
        data.update({n: pd.array(cols[n], dtype="str") for n in loaded.card.categorical})
        return pd.DataFrame(data, columns=list(loaded.card.features))

    single_cols = [validator.columns([inst]) for inst in instances]
    batch_cols = [validator.columns(instances[i:i + BATCH]) for i in range(0, len(instances), BATCH)]
    singles, batches = [frame(c) for c in single_cols], [frame(c) for c in batch_cols]
    predict = loaded.pipeline.predict_proba
    calls: dict[str, tuple[Callable[[Any], Any], list[Any], int]] = {}
    n, s = int(budget["calls"]), budget["seconds"]
    calls["predict_proba, 1 row"] = (predict, singles, n)
    calls[f"predict_proba, {BATCH} rows"] = (predict, batches, max(1, n // 5))
    if loaded.session is not None:
        def onnx(cols: dict[str, list[Any]]) -> Any:
            return onnx_probabilities(loaded.session, loaded.card, cols)

        calls["ONNX Runtime, 1 row"] = (onnx, single_cols, n)
        calls[f"ONNX Runtime, {BATCH} rows"] = (onnx, batch_cols, n)
    calls[f"validate + score with {loaded.runtime}, 1 row (the server's work, no HTTP)"] = (
        lambda inst: loaded.probabilities(validator.columns([inst])), instances, n)
    for fn, inputs, _ in calls.values():  # warm-up
        for item in inputs[:20]:
            fn(item)
    return {name: time_calls(fn, inputs, count, s) for name, (fn, inputs, count) in calls.items()}


def _start_server(model_dir: Path, workers: int, launcher: str, runtime: str, log_dir: Path, echo: Any) -> Any:
    from bench import cpr
    from bench.serving_app import FACTORY, MODEL_DIR_ENV, RUNTIME_ENV
    from ctloop.ports import free_port
    from devtools.emulators import start_process, wait_ready

    port = free_port()
    env = {**os.environ, MODEL_DIR_ENV: str(model_dir), RUNTIME_ENV: runtime, "PYTHONPATH": str(REPO)}
    cwd = REPO
    if launcher == "uvicorn":
        argv = [PYTHON, "-m", "uvicorn", FACTORY, "--factory", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    elif launcher == "tcp":
        argv = [PYTHON, "-m", "bench.serving_app", "--port", str(port), "--workers", str(workers)]
    else:  # the CPR server copies the model files into its working directory
        argv, env = cpr.server_command(cpr.ensure_venv(echo)), cpr.server_env(model_dir, port, workers)
        cwd = log_dir / "cpr-model"
        cwd.mkdir(parents=True, exist_ok=True)
    name = f"serving-{workers}w-{launcher}-{runtime or 'cpr'}"
    proc = start_process(name, argv, log_dir / f"{name}.log", env=env, cwd=cwd)
    wait_ready(proc, f"http://127.0.0.1:{port}/health", timeout=600)
    return proc, f"http://127.0.0.1:{port}"


def run(ctx: Context) -> Section:
    from bench.online_lookup import measure as measure_online_lookup
    from ctloop.smoke import json_records, smoke_instances

    section = Section("serving", "Prediction server: throughput and latency")
    model_dir, test_dir = ensure_model(ctx)
    rows = smoke_instances(ctx.settings("serving"), test_dir, 1000)
    # Every model feature per instance (no online lookup here: bench/online_lookup.py measures that apart).
    instances = json_records(rows.offline) if rows.offline is not None else list(rows)
    singles = [json.dumps({"instances": [inst]}).encode() for inst in instances]
    batches = [json.dumps({"instances": instances[i:i + BATCH]}).encode()
               for i in range(0, len(instances) - BATCH + 1, BATCH)]
    seconds = 3.0 if ctx.quick else 10.0
    budget = {"calls": 500 if ctx.quick else 3000, "seconds": seconds}
    loads = [("single, 1 client", singles, 1), ("single, 16 clients", singles, 16),
             (f"{BATCH} instances, 1 client", batches, 1), (f"{BATCH} instances, 4 clients", batches, 4)]

    ctx.echo("  serving: in-process floor ...")
    floor = _floor(model_dir, instances, budget)
    measured: dict[str, dict[str, LoadResult]] = {}
    cpu: dict[str, dict[str, tuple[float, float]]] = {}  # (server tree, this process) CPU seconds per load
    peaks: dict[str, int] = {}
    log_dir = ctx.workdir / "serving"
    for label, workers, launcher, runtime in CONFIGS:
        ctx.echo(f"  serving: {label} ...")
        proc, url = _start_server(model_dir, workers, launcher, runtime, log_dir, ctx.echo)
        try:
            closed_loop(f"{url}/predict", singles, concurrency=4 * workers, max_requests=300, max_seconds=10)
            sampler = TreeSampler(proc.process.pid, interval=0.1).start()
            measured[label], cpu[label] = {}, {}
            for name, bodies, clients in loads:
                sampler.sample()
                server0, client0 = sampler.cpu_seconds, time.process_time()
                measured[label][name] = closed_loop(f"{url}/predict", bodies, concurrency=clients,
                                                    max_requests=100_000, max_seconds=seconds)
                sampler.sample()
                cpu[label][name] = (sampler.cpu_seconds - server0, time.process_time() - client0)
            peaks[label] = sampler.stop().peak_bytes
        finally:
            proc.stop()
    _report(section, floor, measured, cpu, peaks)
    ctx.echo("  serving: online lookup ...")
    section.figures += measure_online_lookup(model_dir, test_dir, calls=int(budget["calls"]), seconds=seconds)
    return section


def _p(result: LoadResult, q: float) -> float | None:
    return percentile(result.latencies_ms, q) if result.latencies_ms else None


def _report(section: Section, floor: dict[str, LoadResult], measured: dict[str, dict[str, LoadResult]],
            cpu: dict[str, dict[str, tuple[float, float]]], peaks: dict[str, int]) -> None:
    # The floor's rate from its median call: one stalled call (a descheduled thread on a busy machine) must not
    # make the floor look slower than the server it is the floor of.
    def floor_rates(kind: str) -> tuple[float | None, float | None]:
        one, many = floor.get(f"{kind}, 1 row"), floor.get(f"{kind}, {BATCH} rows")
        return (1000.0 / _p(one, 50) if one and one.latencies_ms else None,
                1000.0 * BATCH / _p(many, 50) if many and many.latencies_ms else None)

    for label, loads in measured.items():
        onnx = label.endswith("ONNX")
        kind = "ONNX Runtime" if onnx and "ONNX Runtime, 1 row" in floor else "predict_proba"
        one_rate, many_rate = floor_rates(kind)
        one = floor[f"{kind}, 1 row"]
        conc = loads["single, 16 clients"]
        seq = loads["single, 1 client"]
        batch = loads[f"{BATCH} instances, 4 clients"]
        section.figures += [
            Figure(f"single-instance predictions/s, {label}, 16 clients", conc.rate, "/s",
                   f"in-process {kind}, 1 row per call (1000 / p50)", one_rate,
                   target=TARGETS["rate"] if onnx else None),
            Figure(f"single-instance p99, {label}, 16 clients", _p(conc, 99), "ms", f"in-process {kind} 1-row p99",
                   _p(one, 99), target=TARGETS["p99"] if onnx else None),
            Figure(f"single-instance p50, {label}, 1 client", _p(seq, 50), "ms", f"in-process {kind} 1-row p50",
                   _p(one, 50)),
            Figure(f"{BATCH}-instance requests: rows/s, {label}, 4 clients", batch.rate * BATCH, "/s",
                   f"in-process {kind}, {BATCH} rows per call (at p50)", many_rate,
                   target=TARGETS["rows"] if onnx else None),
        ]
    rows = []
    for label, loads in measured.items():
        for name, r in loads.items():
            per = BATCH if name.startswith(str(BATCH)) else 1
            server_cpu, client_cpu = cpu[label][name]
            n = max(1, r.requests)
            rows.append([label, name, r.requests, r.errors, fmt_number(r.rate), fmt_number(r.rate * per),
                         fmt_number(_p(r, 50)), fmt_number(_p(r, 95)), fmt_number(_p(r, 99)),
                         fmt_number(max(r.latencies_ms) if r.latencies_ms else None),
                         fmt_number(1000 * server_cpu / n), fmt_number(1000 * client_cpu / n),
                         fmt_number(peaks.get(label, 0) / _MB)])
    section.tables.append(Table(
        "Server under load (latency in ms; CPU in ms per request: server process tree, load generator; RSS in MB)",
        ["server", "load", "requests", "errors", "requests/s", "rows/s", "p50", "p95", "p99", "max",
         "server CPU", "client CPU", "server peak RSS"], rows))
    floor_rows = []
    for name, r in floor.items():
        per = BATCH if f"{BATCH} rows" in name else 1
        floor_rows.append([name, r.requests, fmt_number(r.rate), fmt_number(r.rate * per), fmt_number(_p(r, 50)),
                           fmt_number(_p(r, 99))])
    section.tables.append(Table("In-process floor (this process, one call at a time; ms)",
                                ["call", "calls", "calls/s", "rows/s", "p50", "p99"], floor_rows))
    errors = [f"{label} / {name}: {r.errors} errors, first: {r.first_error}" for label, loads in measured.items()
              for name, r in loads.items() if r.errors]
    section.notes += errors
    section.notes += [
        "`uvicorn --workers N` binds its listening socket with protocol 0, and asyncio sets TCP_NODELAY only on "
        "sockets whose protocol is TCP: each keep-alive response (headers and body are two writes) then waits "
        "for the client's delayed ACK (~40 ms). The 'TCP socket' configurations run the same uvicorn worker "
        "supervisor over a socket created with IPPROTO_TCP (bench/serving_app.py); the CPR server runs one "
        "worker for the same reason.",
        "CPR: the aiplatform SDK's model server with a SklearnPredictor subclass that builds the DataFrame the "
        "pipeline takes and answers predict_proba (bench/cpr.py), in its own venv (.venv-cpr).",
        "The load generator runs in this process and shares the machine's CPUs with the server: on a small "
        "machine it is part of what limits the numbers.",
        "The server scores requests that arrive while the model is busy together in one call, so under "
        "concurrency single-instance throughput can exceed the one-row-per-call floor.",
    ]
    section.data = {"floor": {k: {"calls": r.requests, "rate": r.rate, "p50": _p(r, 50), "p99": _p(r, 99)}
                              for k, r in floor.items()},
                    "server": {label: {k: {"requests": r.requests, "errors": r.errors, "rate": r.rate,
                                           "p50": _p(r, 50), "p95": _p(r, 95), "p99": _p(r, 99),
                                           "server_cpu_s": cpu[label][k][0], "client_cpu_s": cpu[label][k][1]}
                                       for k, r in loads.items()} for label, loads in measured.items()},
                    "peak_rss_bytes": peaks}
