"""Suite ``compile``: compiling every pipeline (pipelines.compile.compile_all) vs a one-step pipeline.

Measured in a fresh process (``python -m bench.compile_time``): the imports a compile needs, then each compile
repeated, all through the same ``compile_pipeline`` path (KFP compiler plus the image rewrite).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import Figure, Section, Table, fmt_number
from bench.rss import run_sampled
from bench.workspace import REPO, Context, python_module

IMAGE = "europe-west4-docker.pkg.dev/bench/ctloop/component:bench"


def measure(repeat: int) -> dict[str, Any]:
    """Import and compile timings in this process (call it in a fresh one)."""
    t0 = time.perf_counter()
    import kfp  # noqa: F401

    kfp_import = time.perf_counter() - t0
    from pipelines.compile import all_pipelines, compile_all, compile_pipeline

    pipelines = all_pipelines()
    project_import = time.perf_counter() - t0
    from bench.tiny_pipeline import tiny_pipeline
    from ctloop.config import StepResources

    tiny_resources = {"echo": StepResources(cpu="1", memory="1G")}  # its step is in no settings' resources

    compile_all_s, tiny_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            t = time.perf_counter()
            paths = compile_all(Path(tmp) / f"all-{i}", IMAGE)
            compile_all_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            compile_pipeline(tiny_pipeline, Path(tmp) / f"tiny-{i}.yaml", IMAGE, tiny_resources)
            tiny_s.append(time.perf_counter() - t)
        sizes = {p.stem: p.stat().st_size for p in paths}
    return {"kfp_import": kfp_import, "project_import": project_import, "pipelines": sorted(pipelines),
            "compile_all": compile_all_s, "tiny": tiny_s, "yaml_bytes": sizes}


def run(ctx: Context) -> Section:
    section = Section("compile", "Compile time of all pipelines")
    repeat = 3 if ctx.quick else 7
    result_file = ctx.workdir / "compile" / "compile.json"
    result_file.unlink(missing_ok=True)
    run_ = run_sampled(python_module("bench.compile_time", "--repeat", str(repeat), "--result", str(result_file)),
                       ctx.workdir / "compile" / "compile.log", cwd=REPO, timeout=600)
    if run_.returncode != 0:
        raise RuntimeError(f"python -m bench.compile_time exited with {run_.returncode}: {run_.log_tail()}")
    r = json.loads(result_file.read_text())
    first, warm = r["compile_all"][0], statistics.median(r["compile_all"][1:] or r["compile_all"])
    tiny = statistics.median(r["tiny"][1:] or r["tiny"])
    section.figures += [
        Figure(f"compile all pipelines ({len(r['pipelines'])}), warm median", warm, "s", "one-step pipeline",
               tiny),
        Figure("first compile in a fresh process (incl. imports)", r["project_import"] + first, "s",
               "warm compile", warm),
    ]
    section.tables.append(Table("Compile timings (seconds)", ["what", "seconds"], [
        ["import kfp", fmt_number(r["kfp_import"])],
        ["import kfp + the pipelines and their components", fmt_number(r["project_import"])],
        ["compile_all, first call", fmt_number(first)],
        ["compile_all, each call", ", ".join(fmt_number(x) for x in r["compile_all"])],
        ["one-step pipeline, each call", ", ".join(fmt_number(x) for x in r["tiny"])],
        ["fresh process, start to exit", fmt_number(run_.wall_seconds)],
    ]))
    section.notes.append(f"Pipelines: {', '.join(r['pipelines'])}; compiled YAML sizes (bytes): {r['yaml_bytes']}.")
    section.data = r
    return section


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.compile_time", description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    from bench.report import write_atomic

    write_atomic(args.result, json.dumps(measure(args.repeat), indent=2))


if __name__ == "__main__":
    main()
