"""One measured piece of work in a fresh process, so its peak memory is its own.

``python -m bench.worker spark-transform|pandas-transform|train ... --result out.json``; the parent samples the
process tree (bench.rss) and reads the JSON (the work's own seconds, row counts).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.report import write_atomic

SPLITS = ("train", "valid", "test")
SERVICE_REPEAT = 3


def spark_transform(input_dir: Path, out: Path, workdir: Path, overrides: list[str]) -> dict[str, Any]:
    """The product's transform step (run_transform, local Spark), session start included as the step does."""
    from bench.workspace import bench_settings
    from components.transform import run_transform
    from ctloop.spark_session import local_spark, parquet_rows

    settings = bench_settings(workdir, overrides)
    paths = {s: out / s for s in SPLITS}
    t0 = time.perf_counter()
    spark = local_spark(settings, app_name="ctloop-transform", rows=parquet_rows(str(input_dir)))
    started = time.perf_counter() - t0
    try:
        result = run_transform(settings, run_id="bench-scaling", input_path=str(input_dir),
                               input_uri=str(input_dir), **{f"{s}_path": str(p) for s, p in paths.items()},
                               **{f"{s}_uri": str(p) for s, p in paths.items()},
                               report_path=str(out / "report.md"), spark=spark)
    finally:
        spark.stop()
    seconds = time.perf_counter() - t0
    report = result.report
    return {"seconds": seconds, "session_start_seconds": started, "input_rows": report["input_rows"],
            "output_rows": report["output_rows"], "splits": {s: report["splits"][s]["rows"] for s in SPLITS},
            "quarantined": report["quarantined"]["rows"], "cut_points": report["cut_points"]}


def spark_service_transform(input_dir: Path, out: Path, workdir: Path, overrides: list[str]) -> dict[str, Any]:
    """The transform step as the pipeline runs it, its job on the local Spark service: the service's first job
    at this size, then ``SERVICE_REPEAT`` more (the service keeps compiling its hot code over the first few)."""
    from bench.workspace import bench_settings
    from components.transform import run_transform

    settings = bench_settings(workdir, overrides)
    paths = {s: out / s for s in SPLITS}
    walls = []
    for _ in range(1 + SERVICE_REPEAT):
        t0 = time.perf_counter()
        result = run_transform(settings, run_id="bench-scaling", input_path=str(input_dir),
                               input_uri=str(input_dir), **{f"{s}_path": str(p) for s, p in paths.items()},
                               **{f"{s}_uri": str(p) for s, p in paths.items()},
                               report_path=str(out / "report.md"))
        walls.append(time.perf_counter() - t0)
    report = result.report
    return {"seconds": min(walls[1:]), "first_seconds": walls[0], "warm_seconds": walls[1:],
            "input_rows": report["input_rows"], "output_rows": report["output_rows"],
            "splits": {s: report["splits"][s]["rows"] for s in SPLITS},
            "quarantined": report["quarantined"]["rows"], "cut_points": report["cut_points"]}


def pandas_transform(input_dir: Path, out: Path, workdir: Path, overrides: list[str]) -> dict[str, Any]:
    from bench.pandas_transform import transform
    from bench.workspace import bench_settings
    from components.transform import read_column_types
    from ctloop.features import resolve_feature_spec

    settings = bench_settings(workdir, overrides)
    spec = resolve_feature_spec(settings, read_column_types(str(input_dir)))
    t0 = time.perf_counter()
    report = transform(input_dir, out, spec, settings.data.valid_fraction, settings.data.test_fraction)
    return {"seconds": time.perf_counter() - t0, "input_rows": report["input_rows"],
            "output_rows": report["output_rows"], "splits": {s: report["splits"][s]["rows"] for s in SPLITS},
            "quarantined": report["quarantined"]["rows"], "cut_points": report["cut_points"]}


def train(split_dir: Path, out: Path, workdir: Path, overrides: list[str]) -> dict[str, Any]:
    """The product's train step (train_model) on ``split_dir/train`` and ``split_dir/valid``."""
    from bench.workspace import bench_settings
    from ctloop.threads import use_local_threads

    settings = bench_settings(workdir, overrides)
    use_local_threads(settings)  # as a local step gets it: before scikit-learn loads its OpenMP runtime
    from ctloop.modeling import train_model

    t0 = time.perf_counter()
    result = train_model(settings, split_dir / "train", split_dir / "valid", out, "bench-scaling",
                         {"git_sha": "bench"})
    return {"seconds": time.perf_counter() - t0, "rows": result.rows,
            "valid_roc_auc": result.valid_metrics.get("roc_auc")}


COMMANDS = {"spark-transform": spark_transform, "spark-service-transform": spark_service_transform,
            "pandas-transform": pandas_transform, "train": train}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("--input", type=Path, required=True, help="transform: Parquet folder; train: split folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    result = COMMANDS[args.command](args.input, args.out, args.workdir, args.overrides)
    write_atomic(args.result, json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
