"""``python -m bench [--quick] [--only NAME] [--rows-max N]``: run the benchmark suites, print one table.

A full run (every suite, not ``--quick``) writes its results to ``bench/results/``; a partial or quick run writes
to ``<workdir>/results/`` so the committed results always come from one complete run. Exit code 1 when a
suite failed (its error is in the table and the report); timings never fail the run.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
import traceback
from pathlib import Path

from bench.machine import describe, loadavg
from bench.report import FIGURE_HEADERS, Section, console_table, figure_rows, write_results
from bench.workspace import DEFAULT_WORKDIR, REPO, Context

SUITES = {
    "loop": ("bench.loop", "local CT loop vs one process"),
    "scaling": ("bench.scaling", "transform (Spark vs pandas) and train at growing row counts"),
    "trigger": ("bench.trigger", "upload -> function -> launch latency on the emulators"),
    "serving": ("bench.serving", "prediction server throughput and latency vs in-process predict"),
    "compile": ("bench.compile_time", "compile time of all pipelines"),
    "scoring": ("bench.scoring", "batch scoring rows/s with the champion (1M rows)"),
}
RESULTS_DIR = REPO / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="suites:\n" + "\n".join(f"  {k:9} {v[1]}" for k, v in SUITES.items()))
    p.add_argument("--quick", action="store_true", help="small sizes and short runs (a few minutes), for smoke use")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this suite (repeatable, or comma-separated)")
    p.add_argument("--rows-max", type=int, default=5_000_000, metavar="N",
                   help="largest scaling size (default 5,000,000; 20000000 adds the 20M point)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help=f"data and scratch space (default {DEFAULT_WORKDIR.relative_to(REPO)})")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: see above)")
    args = p.parse_args(argv)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        p.error(f"--only: unknown suite(s) {unknown}; expected one of {list(SUITES)}")
    if args.rows_max < 1000:
        p.error(f"--rows-max: expected at least 1000 rows, found {args.rows_max}")
    args.suites = [n for n in SUITES if n in names] if names else list(SUITES)
    if args.out is None:
        complete = not args.quick and args.suites == list(SUITES)
        args.out = RESULTS_DIR if complete else args.workdir / "results"
    return args


def run_suite(name: str, ctx: Context) -> Section:
    module_name, description = SUITES[name]
    ctx.echo(f"[{name}] {description}")
    load_before = loadavg()
    t0 = time.perf_counter()
    try:
        section = importlib.import_module(module_name).run(ctx)
    except Exception as exc:  # one failed suite must not lose the others' results
        section = Section(name, description, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    section.seconds = time.perf_counter() - t0
    section.load_before, section.load_after = load_before, loadavg()
    ctx.echo(f"[{name}] done in {section.seconds:.0f} s{' (FAILED)' if section.error else ''}")
    return section


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Context(workdir=args.workdir.resolve(), quick=args.quick, rows_max=args.rows_max,
                  echo=lambda text: print(text, flush=True))
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    machine = describe()
    options = {"command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "quick": args.quick, "suites": args.suites, "rows_max": args.rows_max,
               "load_before": loadavg()}
    sections = [run_suite(name, ctx) for name in args.suites]
    options["load_after"] = loadavg()
    print()
    print(console_table(FIGURE_HEADERS, figure_rows(sections)))
    paths = write_results(args.out, sections, machine, options)
    print(f"\nresults: {paths[-1]}")
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
