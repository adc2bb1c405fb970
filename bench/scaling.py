"""Suite ``scaling``: transform (Spark job vs the pandas baseline) and train at growing row counts.

Each measurement runs in a fresh process (``python -m bench.worker``) whose process tree (Python plus, for
Spark, the JVM) is sampled every 50 ms for RSS, so the peaks of different runs never mix. Input: the sample
data's Parquet part files (``write_sample_data`` streams them, so generating 20M rows stays flat in memory).
Train runs on the Spark job's splits, as in the pipeline.

Up to ``SERVICE_MAX_ROWS``, the transform also runs as the pipeline runs it: its job on the local Spark service
(ctloop/spark_service.py), started cold by the first such measurement, then warm.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench.machine import meminfo_bytes
from bench.report import Figure, Section, Table, fmt_number
from bench.rss import run_sampled
from bench.service import stop_daemons
from bench.stats import growth_exponent
from bench.svg import line_chart, short_number
from bench.workspace import REPO, Context, batch_dir, ensure_sample_data, python_module

_MB = 2**20
KINDS = ("spark-transform", "pandas-transform", "train")
LABELS = {"spark-transform": "transform, Spark job", "pandas-transform": "transform, pandas baseline",
          "train": "train (on the Spark splits)", "spark-service-transform": "transform, on the local Spark service"}
SERVICE_KIND = "spark-service-transform"
SERVICE_MAX_ROWS = 1_000_000  # the target's size; the service's warm figures above it cost minutes each
QUANTILE_RELATIVE_ERROR = 1e-4  # the job's approxQuantile error: how far its cut points may sit from exact
MEMORY_SHARE = 0.5  # run a measurement only if its extrapolated peak fits in this share of available memory


def measure(kind: str, input_dir: Path, out: Path, work: Path, timeout: float,
            env: dict[str, str] | None = None, tag: str = "") -> dict[str, Any]:
    """One worker run; the result carries wall seconds, peak tree RSS, CPU seconds, or the failure.

    ``env`` is added to this process's environment for the run; ``tag`` keeps its log and result apart.
    """
    shutil.rmtree(out, ignore_errors=True)
    name = f"{kind}{tag}"
    result_file = work / f"{name}.json"
    result_file.unlink(missing_ok=True)
    argv = python_module("bench.worker", kind, "--input", str(input_dir), "--out", str(out), "--workdir",
                         str(work), "--result", str(result_file))
    run = run_sampled(argv, work / f"{name}.log", cwd=REPO, timeout=timeout,
                      env={**os.environ, **env} if env else None)
    measured: dict[str, Any] = {"wall": run.wall_seconds, "peak_rss_bytes": run.peak_rss_bytes,
                                "peak_anon_bytes": run.peak_anon_bytes, "peak_by_process": run.peak_by_name,
                                "cpu": run.cpu_seconds, "samples": run.samples, "returncode": run.returncode}
    if run.returncode != 0 or not result_file.is_file():
        reason = "timed out" if run.returncode == -9 else f"exit {run.returncode}"
        measured["error"] = f"{LABELS[kind]} {reason}; log {run.log_path}: {run.log_tail(600)}"
    else:
        measured.update(json.loads(result_file.read_text()))
    return measured


def estimated_peak_bytes(sizes: list[int], peaks: list[int], n: int) -> float | None:
    """Peak memory at ``n`` rows extrapolated on a log-log line through the two largest measured sizes."""
    if len(sizes) < 2:
        return None
    (n0, p0), (n1, p1) = sorted(zip(sizes, peaks, strict=True))[-2:]
    if n1 == n0 or p0 <= 0 or p1 <= 0:
        return None
    slope = max(0.0, math.log(p1 / p0) / math.log(n1 / n0))
    return p1 * (n / n1) ** slope


def memory_guard(kind: str, n: int, results: dict[int, dict[str, dict[str, Any]]],
                 share: float = MEMORY_SHARE) -> str:
    """Why ``kind`` at ``n`` rows should not run here ('' = it may): its extrapolated peak RSS would exceed
    ``share`` of the memory available now. On a shared machine an out-of-memory kill may hit someone else."""
    done = [m for m in sorted(results) if m < n and "error" not in results[m].get(kind, {"error": ""})]
    estimate = estimated_peak_bytes(done, [results[m][kind]["peak_rss_bytes"] for m in done], n)
    available = meminfo_bytes("MemAvailable")
    if estimate is None or available is None or estimate <= share * available:
        return ""
    return (f"needs about {estimate / 2**30:.1f} GiB (extrapolated from {done[-2]:,} and {done[-1]:,} rows), "
            f"more than {share:.0%} of the {available / 2**30:.1f} GiB available")


def _spec(settings: Any, input_dir: Path) -> Any:
    from components.transform import read_column_types
    from ctloop.features import resolve_feature_spec

    return resolve_feature_spec(settings, read_column_types(str(input_dir)))


def run(ctx: Context) -> Section:
    from bench.pandas_transform import compare_splits

    sizes = ctx.scaling_sizes()
    section = Section("scaling", f"Scaling: transform and train at {', '.join(f'{n:,}' for n in sizes)} rows")
    settings = ctx.settings("scaling")
    results: dict[int, dict[str, dict[str, Any]]] = {}
    generation: dict[int, float] = {}
    parity: dict[str, Any] | None = None
    stop_daemons("spark")  # the first measurement on the service starts it
    for n in sizes:
        t = time.perf_counter()
        ctx.echo(f"  scaling: sample data, {n:,} rows ...")
        landing = ensure_sample_data(ctx.data_root, n, settings)
        generation[n] = time.perf_counter() - t
        input_dir = batch_dir(landing, settings)
        work = ctx.workdir / "scaling" / f"rows-{n}"
        work.mkdir(parents=True, exist_ok=True)
        timeout = max(600.0, n / 1_000_000 * 600.0)
        results[n] = {}
        for kind in KINDS:
            source = work / "spark-transform" if kind == "train" else input_dir
            if kind == "train" and "error" in results[n]["spark-transform"]:
                results[n][kind] = {"error": "no splits: the Spark transform failed or was skipped"}
                continue
            too_big = memory_guard(kind, n, results)
            if too_big:
                ctx.echo(f"  scaling: {LABELS[kind]}, {n:,} rows: skipped, {too_big}")
                results[n][kind] = {"error": f"skipped: {too_big}"}
                continue
            ctx.echo(f"  scaling: {LABELS[kind]}, {n:,} rows ...")
            results[n][kind] = measure(kind, source, work / kind, work, timeout)
        if n <= SERVICE_MAX_ROWS:
            ctx.echo(f"  scaling: {LABELS[SERVICE_KIND]}, {n:,} rows, 1 + 3 jobs ...")
            results[n][SERVICE_KIND] = measure(SERVICE_KIND, input_dir, work / SERVICE_KIND, work, 4 * timeout)
            shutil.rmtree(work / SERVICE_KIND, ignore_errors=True)
            if not [m for m in sizes if n < m <= SERVICE_MAX_ROWS]:
                stop_daemons("spark")  # its memory is not left to the larger sizes
        if parity is None and not any("error" in results[n][k] for k in ("spark-transform", "pandas-transform")):
            parity = compare_splits(work / "spark-transform", work / "pandas-transform", _spec(settings, input_dir))
            parity["rows_compared_at"] = n
        if n != sizes[0]:  # keep the smallest size's outputs to look at; the big ones only cost disk
            for kind in KINDS:
                shutil.rmtree(work / kind, ignore_errors=True)

    _figures(section, sizes, results)
    _tables(section, sizes, results, generation)
    _plots(section, sizes, results)
    if parity is not None:
        n = parity["rows_compared_at"]
        allowed = 2 * math.ceil(QUANTILE_RELATIVE_ERROR * n) + 2
        ok = (parity["only_spark"] == 0 and parity["only_pandas"] == 0 and parity["features_agree"]
              and parity["split_disagreements"] <= allowed)
        section.notes.append(
            f"Baseline check at {n:,} rows: the pandas output {'matches' if ok else 'DOES NOT match'} the Spark "
            f"job's: {parity['only_spark']} rows only in Spark, {parity['only_pandas']} only in pandas, "
            f"derived features within {max(parity['max_relative_difference'].values()):.1e} relative, "
            f"{parity['split_disagreements']} rows in another split (allowed {allowed}: Spark's cut points come "
            f"from a quantile sketch with relative rank error {QUANTILE_RELATIVE_ERROR}, pandas' are exact).")
    local = settings.local
    section.notes += [
        "Wall time is the whole fresh process (interpreter, imports, Spark's JVM start), as a pipeline step "
        "with the Spark service off (local.spark_service_idle_seconds = 0) pays it; the work alone is in the table.",
        f"In a fresh JVM, Spark runs with the project's local settings ({local.spark_master}, driver memory "
        f"{local.spark_driver_memory}, {local.spark_shuffle_partitions} shuffle partitions, the optimising JIT "
        f"from {local.spark_full_jit_rows:,} input rows).",
        "On the local Spark service the step runs as in the pipeline: its job goes to the service's warm JVM. "
        "Its figure is the best of 3 jobs after the service's first at that size, from the step's call to its "
        "return (no interpreter or JVM start), against the pandas baseline's work alone (likewise). "
        f"The service started cold at the first size. Its report matches the fresh JVM's at: {_same_reports(results)}.",
    ]
    section.data = {"sizes": sizes, "results": {str(n): r for n, r in results.items()}, "generation": generation,
                    "parity": parity}
    return section


def _same_reports(results: dict[int, dict[str, dict[str, Any]]]) -> str:
    keys = ("input_rows", "output_rows", "splits", "quarantined", "cut_points")
    said = []
    for n, r in sorted(results.items()):
        a, b = r.get("spark-transform", {}), r.get(SERVICE_KIND)
        if b is None or "error" in a or "error" in b:
            continue
        same = all(a.get(k) == b.get(k) for k in keys)
        said.append(f"{n:,} rows {'yes' if same else 'NO: ' + str({k: (a.get(k), b.get(k)) for k in keys})}")
    return "; ".join(said) or "n/a"


def _peak_mb(r: dict[str, Any]) -> float | None:
    return None if "error" in r or "peak_rss_bytes" not in r else r["peak_rss_bytes"] / _MB


def _wall(r: dict[str, Any]) -> float | None:
    return None if "error" in r or "wall" not in r else r["wall"]


def _work(r: dict[str, Any]) -> float | None:
    return None if "error" in r or "seconds" not in r else r["seconds"]


def _span(low: int, high: int) -> str:
    return f"{short_number(low)}→{short_number(high)}"


def _growth(results: dict[int, dict[str, dict[str, Any]]], kind: str, low: int, high: int,
            value: Any) -> float | None:
    a, b = value(results[low][kind]), value(results[high][kind])
    return None if a is None or b is None else b / a


def _figures(section: Section, sizes: list[int], results: dict[int, dict[str, dict[str, Any]]]) -> None:
    for n in sizes:
        spark, pandas = results[n]["spark-transform"], results[n]["pandas-transform"]
        section.figures.append(Figure(f"transform {short_number(n)} rows: Spark wall (fresh JVM)", _wall(spark),
                                      "s", "pandas baseline", _wall(pandas)))
        service = results[n].get(SERVICE_KIND)
        if service is not None:
            section.figures.append(Figure(
                f"transform {short_number(n)} rows: Spark on the warm service", _work(service), "s",
                "pandas baseline, work alone", _work(pandas), target=("<", 3.0) if n == 1_000_000 else None,
                target_on_ratio=True, note="as the pipeline runs it"))
            section.figures.append(Figure(
                f"transform {short_number(n)} rows: the service's first job at this size",
                None if "error" in service else service["first_seconds"], "s", "pandas baseline, work alone",
                _work(pandas)))
        section.figures.append(Figure(f"transform {short_number(n)} rows: Spark peak RSS", _peak_mb(spark), "MB",
                                      "pandas baseline", _peak_mb(pandas)))
    big = [n for n in sizes if n >= 1_000_000]
    if len(big) >= 2:
        low, high = big[0], big[-1]
        section.figures.append(Figure(
            f"Spark peak RSS growth {_span(low, high)}", _growth(results, "spark-transform", low, high, _peak_mb),
            "x", "pandas growth", _growth(results, "pandas-transform", low, high, _peak_mb), target=("<", 2.0)))
        if len(big) >= 3:
            prev = big[-2]
            section.figures.append(Figure(
                f"Spark peak RSS growth {_span(prev, high)}",
                _growth(results, "spark-transform", prev, high, _peak_mb), "x", "pandas growth",
                _growth(results, "pandas-transform", prev, high, _peak_mb)))
    # Train: over the sizes it ran at (the memory guard may have skipped the largest).
    trained = [n for n in sizes if _wall(results[n]["train"]) is not None]
    if len(trained) >= 2:
        low, high = trained[0], trained[-1]
        section.figures.append(Figure(f"train wall growth {_span(low, high)} rows",
                                      _growth(results, "train", low, high, _wall), "x", "row growth", high / low,
                                      note="ratio < 1: cheaper per row at scale"))
        section.figures.append(Figure(f"train peak RSS growth {_span(low, high)} rows",
                                      _growth(results, "train", low, high, _peak_mb), "x", "row growth",
                                      high / low))


def _tables(section: Section, sizes: list[int], results: dict[int, dict[str, dict[str, Any]]],
            generation: dict[int, float]) -> None:
    time_rows, mem_rows = [], []
    for n in sizes:
        r = results[n]
        spark, pandas, train = r["spark-transform"], r["pandas-transform"], r["train"]

        def cell(x: dict[str, Any], key: str, scale: float = 1.0) -> str:
            if "error" in x:
                return "failed"
            value = x.get(key)
            return fmt_number(None if value is None else value / scale)

        def proc(x: dict[str, Any], name: str) -> str:
            if "error" in x:
                return "failed"
            peaks = x.get("peak_by_process", {})
            value = max((v for k, v in peaks.items() if k.startswith(name)), default=None)
            return fmt_number(None if value is None else value / _MB)

        time_rows.append([f"{n:,}", fmt_number(generation[n]), cell(spark, "wall"), cell(spark, "seconds"),
                          cell(spark, "session_start_seconds"), cell(spark, "cpu"), cell(pandas, "wall"),
                          cell(pandas, "seconds"), cell(pandas, "cpu"), cell(train, "wall"), cell(train, "seconds"),
                          cell(train, "cpu"),
                          fmt_number(train.get("valid_roc_auc")) if "error" not in train else "failed"])
        mem_rows.append([f"{n:,}", cell(spark, "peak_rss_bytes", _MB), cell(spark, "peak_anon_bytes", _MB),
                         proc(spark, "java"), proc(spark, "python"), cell(pandas, "peak_rss_bytes", _MB),
                         cell(pandas, "peak_anon_bytes", _MB), cell(train, "peak_rss_bytes", _MB),
                         cell(train, "peak_anon_bytes", _MB)])
    section.tables.append(Table(
        "Time per size (seconds): wall = the fresh process; work = inside it",
        ["rows", "sample data (0 = reused)", "Spark wall", "Spark work", "Spark session start", "Spark CPU",
         "pandas wall", "pandas work", "pandas CPU", "train wall", "train work", "train CPU", "valid ROC AUC"],
        time_rows))
    section.tables.append(Table(
        "Peak memory per size (MB): RSS of the process tree; anonymous = RssAnon (without mapped files)",
        ["rows", "Spark RSS", "Spark anonymous", "Spark: JVM alone", "Spark: Python driver alone", "pandas RSS",
         "pandas anonymous", "train RSS", "train anonymous"], mem_rows))
    exp_rows = []
    for kind in KINDS:
        ok = [n for n in sizes if "error" not in results[n][kind]]
        t = growth_exponent(ok, [results[n][kind]["wall"] for n in ok]) if len(ok) > 1 else None
        m = growth_exponent(ok, [results[n][kind]["peak_rss_bytes"] for n in ok]) if len(ok) > 1 else None
        exp_rows.append([LABELS[kind], fmt_number(t), fmt_number(m)])
    section.tables.append(Table("Growth exponents (slope of log cost over log rows: 1 = linear, 0 = flat)",
                                ["what", "wall time", "peak RSS"], exp_rows))
    errors = [f"{n:,} rows: {results[n][k]['error']}" for n in sizes for k in (*KINDS, SERVICE_KIND)
              if "error" in results[n].get(k, {})]
    section.notes += errors


def _plots(section: Section, sizes: list[int], results: dict[int, dict[str, dict[str, Any]]]) -> None:
    if len(sizes) < 2:
        return
    time_series = {LABELS[k]: [(n, results[n][k]["wall"]) for n in sizes if "error" not in results[n][k]]
                   for k in KINDS}
    mem_series = {LABELS[k]: [(n, results[n][k]["peak_rss_bytes"] / _MB) for n in sizes
                              if "error" not in results[n][k]] for k in KINDS}
    if any(time_series.values()):
        section.plots["scaling_time.svg"] = line_chart(
            "Wall time vs rows (fresh process each)", "rows", "seconds",
            {k: v for k, v in time_series.items() if v}, log_x=True, x_ticks=sizes)
        section.plots["scaling_memory.svg"] = line_chart(
            "Peak RSS of the process tree vs rows", "rows", "MB",
            {k: v for k, v in mem_series.items() if v}, log_x=True, x_ticks=sizes)
