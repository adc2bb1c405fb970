"""The floor of the local loop: every step's plain function called in one Python process, each timed.

``python -m bench.floor --workdir W --landing L --snapshot-time T --run-id R --result out.json [--profile]``

Runs lookup-champion, extract, transform, train, evaluate-gate, materialize-features, register and deploy
exactly as the components do (same functions, same settings), without the pipeline runner: no per-step process,
no executor, no artifact bookkeeping. What the pipeline spends beyond these timings is orchestration overhead.
``--profile`` adds the top functions of cProfile for train and evaluate to the result.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports: they are part of what one process pays once

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

STEPS = ("lookup-champion", "extract", "transform", "train", "evaluate-gate", "materialize-features", "register",
         "deploy")
FLOOR_STEPS = ("extract", "transform", "train", "evaluate-gate")  # the work of one plain training script


def _profiled(fn: Callable[[], Any], top: int = 15) -> tuple[Any, str]:
    profiler = cProfile.Profile()
    result = profiler.runcall(fn)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    return result, out.getvalue()


def run_floor(workdir: Path, landing: Path, snapshot_time: str, run_id: str, profile: bool = False,
              overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every step in this process; returns per-step seconds, sub-phases and where the outputs are."""
    t_imports = time.perf_counter()
    from bench.workspace import bench_settings
    from components.deploy import run_deploy
    from components.evaluate import run_evaluate
    from components.extract import run_extract
    from components.lookup import find_champion
    from components.materialize import materialize
    from components.register import run_register
    from components.transform import run_transform
    from ctloop.modeling import train_model
    from ctloop.online_stores import open_online_store
    from ctloop.spark_session import local_spark, parquet_rows

    phases: dict[str, float] = {"imports": time.perf_counter() - t_imports}
    settings = bench_settings(workdir, overrides)
    art = workdir / "artifacts"
    steps: dict[str, float] = {}
    profiles: dict[str, str] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        if profile and name in ("train", "evaluate-gate"):
            result, profiles[name] = _profiled(fn)
        else:
            result = fn()
        steps[name] = time.perf_counter() - t
        return result

    champion = timed("lookup-champion", lambda: find_champion(settings))
    dataset = art / "extract" / "dataset"
    extracted = timed("extract", lambda: run_extract(settings, run_id=run_id, output_path=str(dataset),
                                                       output_uri=str(dataset), snapshot_time=snapshot_time,
                                                       landing_dir=landing))
    splits = {name: art / "transform" / name for name in ("train", "valid", "test")}

    def transform() -> Any:
        def job(spark: Any = None) -> Any:
            return run_transform(settings, run_id=run_id, input_path=str(dataset), input_uri=str(dataset),
                                 train_path=str(splits["train"]), valid_path=str(splits["valid"]),
                                 test_path=str(splits["test"]), train_uri=str(splits["train"]),
                                 valid_uri=str(splits["valid"]), test_uri=str(splits["test"]),
                                 report_path=str(art / "transform" / "report.md"), spark=spark)

        if settings.local.spark_service_idle_seconds > 0:
            # As the component does: the job runs on the local Spark service.
            t = time.perf_counter()
            result = job()
            phases["spark_service_job"] = time.perf_counter() - t
            return result
        # The component starts and stops its own session: so does this, timed in parts.
        t = time.perf_counter()
        spark = local_spark(settings, app_name="ctloop-transform", rows=parquet_rows(str(dataset)))
        phases["spark_session_start"] = time.perf_counter() - t
        try:
            t = time.perf_counter()
            result = job(spark)
            phases["spark_job"] = time.perf_counter() - t
        finally:
            t = time.perf_counter()
            spark.stop()
            phases["spark_session_stop"] = time.perf_counter() - t
        return result

    transformed = timed("transform", transform)
    model_dir = art / "train" / "model"
    trained = timed("train", lambda: train_model(settings, splits["train"], splits["valid"], model_dir, run_id,
                                                 {"git_sha": "bench"}))
    evaluation = timed("evaluate-gate", lambda: run_evaluate(settings, model_dir, splits["test"],
                                                             champion.artifact_uri if champion else None))
    decision = evaluation.decision.decision
    # The pipeline runs it whatever the gate decides; deploy's smoke test reads the states it writes.
    timed("materialize-features", lambda: materialize(open_online_store(settings),
                                                      [str(splits[name]) for name in ("train", "valid", "test")]))
    registered = deployed = None
    if decision == "pass":
        metrics = {k: float(v) for k, v in evaluation.candidate_metrics.items()}
        registered = timed("register", lambda: run_register(settings, run_id, model_dir, str(model_dir), metrics,
                                                            {"run_id": run_id}))
        deployed = timed("deploy", lambda: run_deploy(settings, run_id, registered.model_name,
                                                      registered.version, splits["test"],
                                                      champion.version if champion else None))
    return {
        "steps": steps,
        "phases": phases,
        "decision": decision,
        "rows": {"extract": extracted.row_count, "train": trained.rows["train"], "valid": trained.rows["valid"],
                 "test": int(evaluation.candidate_metrics.get("n", 0)),
                 "transform_output": transformed.report["output_rows"]},
        "roc_auc": evaluation.candidate_metrics.get("roc_auc"),
        "model_dir": str(model_dir),
        "test_dir": str(splits["test"]),
        "registered_version": registered.version if registered else None,
        "deployed_endpoint": deployed.endpoint if deployed else None,
        "profiles": profiles,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--landing", type=Path, required=True)
    p.add_argument("--snapshot-time", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    result = run_floor(args.workdir, args.landing, args.snapshot_time, args.run_id, args.profile, args.overrides)
    result["process_seconds"] = time.perf_counter() - _T0
    from bench.report import write_atomic

    write_atomic(args.result, json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
