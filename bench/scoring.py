"""Suite ``scoring``: batch scoring throughput (rows/s) of the score step on 1M sample rows (100k quick).

Measured in a fresh process (``python -m bench.scoring``): a champion trained on 20k rows through the real
transform and train code, then ``components.score.run_scoring`` (local Spark: training's features, each
entity's latest row, the model's predict_proba, Parquet out) over the sample rows. Baseline, in the same run:
the model alone, ``predict_proba`` in this process over as many featured rows as the step scored (the floor
the step's feature derivation and Spark are added to).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.report import Figure, Section, Table, fmt_number
from bench.rss import run_sampled
from bench.workspace import REPO, Context, batch_dir, bench_settings, ensure_sample_data, python_module

TRAIN_ROWS = 20_000


def _champion(settings: Any, data_root: Path, work: Path, spark: Any) -> Path:
    """Train and register a champion on TRAIN_ROWS sample rows (the transform on local Spark, then train)."""
    from components.transform import run_transform
    from ctloop.modeling import train_model
    from ctloop.registry import LocalRegistry

    source = batch_dir(ensure_sample_data(data_root, TRAIN_ROWS, settings), settings)
    splits = {name: work / "train-splits" / name for name in ("train", "valid", "test")}
    run_transform(settings, run_id="bench-train", input_path=str(source), input_uri=str(source),
                  **{f"{k}_path": str(v) for k, v in splits.items()},
                  **{f"{k}_uri": str(v) for k, v in splits.items()},
                  report_path=str(work / "train-splits" / "report.md"), spark=spark)
    model_dir = work / "model"
    train_model(settings, splits["train"], splits["valid"], model_dir, "bench-train",
                {"train_uri": str(splits["train"]), "valid_uri": str(splits["valid"])})
    LocalRegistry(settings.local.registry_db).register_version(
        settings.model.display_name, str(model_dir), "bench-train", aliases=["champion"])
    return model_dir


def measure(rows: int, workdir: Path) -> dict[str, Any]:
    import pandas as pd

    from components.score import destination_dir, run_scoring
    from ctloop.model_runtime import load_model
    from ctloop.spark_session import local_spark

    work = workdir / "scoring"
    settings = bench_settings(work / "state")
    spark = local_spark(settings, app_name="bench-scoring", rows=rows)  # the size it scores
    try:
        t = time.perf_counter()
        model_dir = _champion(settings, workdir / "data", work, spark)
        train_s = time.perf_counter() - t
        source = batch_dir(ensure_sample_data(workdir / "data", rows, settings), settings)
        scores = work / "run" / "scores"
        t = time.perf_counter()
        result = run_scoring(settings, run_id=f"bench-{rows}", input_path=str(source), input_uri=str(source),
                             scores_path=str(scores), scores_uri=str(scores), spark=spark)
        score_s = time.perf_counter() - t
    finally:
        spark.stop()
    scored = result.report["scored_rows"]
    model = load_model(model_dir)
    test = pd.read_parquet(work / "train-splits" / "test")
    frame = pd.concat([test] * -(-scored // len(test)), ignore_index=True).head(scored)
    t = time.perf_counter()
    model.predict_proba(frame)
    predict_s = time.perf_counter() - t
    out = pd.read_parquet(destination_dir(settings, f"bench-{rows}", result.model.version))
    return {"rows": rows, "input_rows": result.report["input_rows"], "scored": scored, "score_s": score_s,
            "predict_s": predict_s, "train_s": train_s, "output_rows": len(out),
            "output_unique": int(out[settings.columns.id_column].nunique())}


def run(ctx: Context) -> Section:
    rows = 100_000 if ctx.quick else 1_000_000
    section = Section("scoring", f"Batch scoring: {rows:,} rows with the champion")
    result_file = ctx.workdir / "scoring" / "scoring.json"
    result_file.unlink(missing_ok=True)
    run_ = run_sampled(python_module("bench.scoring", "--rows", str(rows), "--workdir", str(ctx.workdir),
                                     "--result", str(result_file)),
                       ctx.workdir / "scoring" / "scoring.log", cwd=REPO, timeout=max(1800.0, rows / 1e6 * 3600))
    if run_.returncode != 0:
        raise RuntimeError(f"python -m bench.scoring exited with {run_.returncode}: {run_.log_tail()}")
    r = json.loads(result_file.read_text())
    section.figures += [
        Figure(f"score step, input rows/s ({r['input_rows']:,} rows)", r["input_rows"] / r["score_s"], "rows/s"),
        Figure(f"score step wall time ({r['scored']:,} entities)", r["score_s"], "s",
               "model predict_proba alone on as many featured rows", r["predict_s"]),
    ]
    section.tables.append(Table("Scoring", ["what", "value"], [
        ["input rows", f"{r['input_rows']:,}"],
        ["entities scored (one row each)", f"{r['scored']:,}"],
        ["score step wall time (s)", fmt_number(r["score_s"])],
        ["model predict_proba on as many featured rows (s)", fmt_number(r["predict_s"])],
        ["champion training on 20k rows (s, not in the figure)", fmt_number(r["train_s"])],
        ["peak RSS of the process tree (MB)", fmt_number(run_.peak_rss_bytes / 1e6)],
    ]))
    section.notes.append("The step reads the landing Parquet directly (the extract is not timed); local Spark "
                         "derives training's features, keeps each entity's latest row and scores it.")
    section.data = {**r, "wall_seconds": run_.wall_seconds}
    return section


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    from bench.report import write_atomic

    write_atomic(args.result, json.dumps(measure(args.rows, args.workdir), indent=2))


if __name__ == "__main__":
    main()
