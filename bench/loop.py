"""Suite ``loop``: the local CT loop (``ctloop run``) on sample data vs the same work in one plain process.

1. ``ctloop run --no-serve`` in a fresh process (KFP local runner, one subprocess per step); its run record
   gives the wall time per step and in total; the process tree is sampled for CPU and peak memory.
2. ``python -m bench.floor`` on the same landing data and snapshot: the steps' plain functions in one process,
   each timed. That is each step's own work; what the pipeline spends beyond it is orchestration overhead.
3. The cost of a step's process before it does any work: interpreter start plus the step module's imports.

The transform's Spark job runs on the local Spark service (ctloop/spark_service.py), and the steps fork from the
local step server (ctloop/step_server.py). The suite stops both first, so the first ``ctloop run`` starts them (the
cold figure); the later runs and the floors find them warm. Their CPU and memory during each run (the step
server's with its forked steps) are sampled beside the run's own process tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.floor import FLOOR_STEPS, STEPS
from bench.report import Figure, Section, Table, fmt_number
from bench.rss import SampledRun, TreeSampler, run_sampled
from bench.service import service_pid, step_server_pid, stop_daemons
from bench.workspace import CONFIG, PYTHON, REPO, Context, ensure_sample_data, python_module

STEP_MODULES = {"lookup-champion": "components.lookup", "extract": "components.extract",
                "transform": "components.transform", "train": "components.train",
                "evaluate-gate": "components.evaluate", "materialize-features": "components.materialize",
                "register": "components.register",
                "deploy": "components.deploy"}
_MB = 2**20
WARM_UP_PAIRS = 2  # untimed runs and floors after the cold run
FLOOR_SPARK_PHASES = [("spark_service_job", "transform: the job on the warm local Spark service"),
                      ("spark_session_start", "transform: Spark session start (JVM)"),
                      ("spark_job", "transform: the Spark job"),
                      ("spark_session_stop", "transform: Spark session stop")]


class BenchFailed(RuntimeError):
    """A measured command failed; the message carries its log tail."""


def fresh_workdir(path: Path, landing: Path) -> Path:
    """An empty workdir whose ``landing`` is the shared sample data (read-only for the steps)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / "landing").symlink_to(landing.resolve(), target_is_directory=True)
    return path


def _check(run: SampledRun, what: str) -> None:
    if run.returncode != 0:
        raise BenchFailed(f"{what} exited with {run.returncode}; log {run.log_path}:\n{run.log_tail()}")


def import_seconds(module: str, repeat: int = 2) -> float:
    """Best-of-``repeat`` wall time of a fresh interpreter that imports ``module`` ('' = bare start).

    With ``_KFP_RUNTIME=true``, as the KFP executor runs a step: kfp then skips its compile-time modules.
    """
    code = f"import {module}" if module else "pass"
    env = {**os.environ, "_KFP_RUNTIME": "true"}
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([PYTHON, "-c", code], cwd=REPO, check=True, capture_output=True, env=env)
        best = min(best, time.perf_counter() - t)
    return best


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUNNER_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) - INFO - (Executing task|Task) '([^']+)'")
_EXECUTOR_LINE = re.compile(r"\[KFP Executor \S+ (\d\d):(\d\d):(\d\d),(\d{3}) INFO\]: "
                            r"(Looking for component|Wrote executor output)")


def _seconds_of_day(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def step_phases(log_path: Path) -> dict[str, dict[str, float]]:
    """Per step, from the runner's log: executor start (task start -> the executor looks for the component),
    component body (-> executor output written: imports, work, artifacts) and process exit (-> task end)."""
    marks: dict[str, dict[str, float]] = {}
    task = None
    for raw in log_path.read_text(errors="replace").splitlines():
        line = _ANSI.sub("", raw).strip()
        if m := _RUNNER_LINE.match(line):
            t = _seconds_of_day(*m.group(1, 2, 3, 4))
            if m.group(5) == "Executing task":
                task = m.group(6)
                marks[task] = {"start": t}
            elif m.group(6) in marks:
                marks[m.group(6)]["end"] = t
        elif task is not None and (m := _EXECUTOR_LINE.search(line)):
            key = "body_start" if m.group(5).startswith("Looking") else "body_end"
            marks[task].setdefault(key, _seconds_of_day(*m.group(1, 2, 3, 4)))
    phases = {}
    for name, t in marks.items():
        if {"start", "body_start", "body_end", "end"} <= t.keys():
            # A run across midnight wraps the time of day: modulo one day keeps each interval right.
            phases[name] = {"executor_start": (t["body_start"] - t["start"]) % 86400,
                            "body": (t["body_end"] - t["body_start"]) % 86400,
                            "exit": (t["end"] - t["body_end"]) % 86400}
    return phases


@dataclass(frozen=True)
class ServiceUse:
    """The local daemons during one run: the Spark service's and the step server's (with its forked steps) CPU
    seconds then and peak RSS (0 for one not running)."""

    cpu_seconds: float
    peak_rss_bytes: int
    steps_cpu_seconds: float = 0.0
    steps_peak_rss_bytes: int = 0


def sampled_with_service(argv: list[str], log: Path, settings: Any) -> tuple[SampledRun, ServiceUse]:
    """``run_sampled``, and the local Spark service and step server (those running) sampled beside it."""
    # A daemon this run starts is its child: the run's own sampler sees it.
    samplers = [TreeSampler(pid).start() if pid is not None else None
                for pid in (service_pid(settings), step_server_pid())]
    before = [s.cpu_seconds if s else 0.0 for s in samplers]
    try:
        run = run_sampled(argv, log, cwd=REPO, timeout=1800)
    finally:
        for s in samplers:
            if s:
                s.stop()
    (spark, steps), (spark_before, steps_before) = samplers, before
    return run, ServiceUse(spark.cpu_seconds - spark_before if spark else 0.0, spark.peak_bytes if spark else 0,
                           steps.cpu_seconds - steps_before if steps else 0.0, steps.peak_bytes if steps else 0)


def run_pipeline(workdir: Path, run_id: str, snapshot: str, settings: Any) -> tuple[SampledRun, Any, ServiceUse]:
    from pipelines.local_run import RunRecord

    argv = python_module("pipelines.cli", "--config", str(CONFIG), "--workdir", str(workdir), "run",
                         "--run-id", run_id, "--snapshot-time", snapshot, "--no-serve")
    run, use = sampled_with_service(argv, workdir / "bench-loop.log", settings)
    _check(run, "ctloop run")
    return run, RunRecord.load(workdir / "runs" / run_id / "run.json"), use


def run_floor_process(workdir: Path, landing: Path, run_id: str, snapshot: str, profile: bool,
                      settings: Any) -> tuple[SampledRun, dict[str, Any], ServiceUse]:
    result = workdir / "floor.json"
    argv = python_module("bench.floor", "--workdir", str(workdir), "--landing", str(landing / "landing"),
                         "--snapshot-time", snapshot, "--run-id", run_id, "--result", str(result),
                         *(["--profile"] if profile else []))
    run, use = sampled_with_service(argv, workdir / "bench-floor.log", settings)
    _check(run, "python -m bench.floor")
    return run, json.loads(result.read_text()), use


def run(ctx: Context) -> Section:
    section = Section("loop", f"Local CT loop on {ctx.loop_rows:,} sample rows")
    settings = ctx.settings("loop")
    landing = ensure_sample_data(ctx.data_root, ctx.loop_rows, settings).parent
    snapshot = datetime.now(UTC).replace(microsecond=0).isoformat()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")

    repeat = 1 if ctx.quick else 3
    ctx.echo("  loop: ctloop run, the first: it starts the local Spark service and step server ...")
    stop_daemons("*")
    cold_dir = fresh_workdir(ctx.workdir / "loop-cold", landing / "landing")
    cold_run, cold, cold_use = run_pipeline(cold_dir, f"bench-loop-{stamp}-cold", snapshot, settings)
    if cold.status != "SUCCEEDED":
        raise BenchFailed(f"ctloop run: {cold.status}: {cold.error}")
    loops: list[tuple[SampledRun, Any, ServiceUse]] = []
    floors: list[tuple[SampledRun, dict[str, Any], ServiceUse]] = []

    def loop_once(i: int | str) -> None:
        ctx.echo(f"  loop: ctloop run (KFP local runner), Spark service and step server warm, {i}/{repeat} ...")
        loop_dir = fresh_workdir(ctx.workdir / f"loop-{i}", landing / "landing")
        loop_run, record, use = run_pipeline(loop_dir, f"bench-loop-{stamp}-{i}", snapshot, settings)
        if record.status != "SUCCEEDED":
            raise BenchFailed(f"ctloop run: {record.status}: {record.error}")
        loops.append((loop_run, record, use))

    def floor_once(i: int | str) -> None:
        ctx.echo(f"  loop: the same steps in one process (floor), {i}/{repeat} ...")
        floor_dir = fresh_workdir(ctx.workdir / f"floor-{i}", landing / "landing")
        floors.append(run_floor_process(floor_dir, landing, f"bench-floor-{stamp}-{i}", snapshot,
                                        profile=False, settings=settings))

    if not ctx.quick:
        # The service's JVM keeps compiling over its first ten or so jobs (its job time falls from 4-5 s to 2-3 s):
        # both get a warmer service, or the one measured later would gain from the other's jobs.
        for i in range(WARM_UP_PAIRS):
            loop_once(f"warm-up-{i + 1}")
            floor_once(f"warm-up-{i + 1}")
        loops.clear()
        floors.clear()
    for i in range(1, repeat + 1):
        # Alternate the two, and which goes first, so load from elsewhere and the service's last compiling
        # hit both alike.
        for measure in (loop_once, floor_once) if i % 2 else (floor_once, loop_once):
            measure(i)
    if not ctx.quick:
        # Profiling slows the profiled steps: a separate run, not one of the timed ones.
        ctx.echo("  loop: profiling the floor's train and evaluate ...")
        floor_dir = fresh_workdir(ctx.workdir / "floor-profile", landing / "landing")
        profiles = run_floor_process(floor_dir, landing, f"bench-profile-{stamp}", snapshot,
                                     profile=True, settings=settings)[1]["profiles"]
    else:
        profiles = {}
    service_peak = max([u.peak_rss_bytes for *_, u in [*loops, *floors]] + [cold_use.peak_rss_bytes])
    steps_peak = max(u.steps_peak_rss_bytes for *_, u in loops)
    stop_daemons("*")  # the other suites measure without them
    # Best of the repetitions: on a shared machine the minimum is the least disturbed measurement.
    loop_run, record, loop_use = min(loops, key=lambda x: x[1].seconds)
    floor_run, floor, floor_use = min(floors, key=lambda x: x[1]["process_seconds"])
    floor = dict(floor)
    floor["steps"] = {s: min(f[1]["steps"][s] for f in floors) for s in floor["steps"]}
    contention_results = None
    if not ctx.quick:
        from bench import contention

        contention_results = contention.run_variants(Path(floor["test_dir"]).parent, ctx.workdir / "contention",
                                                     ctx.echo)
    ctx.shared["model_dir"] = floor["model_dir"]
    ctx.shared["test_dir"] = floor["test_dir"]
    ctx.echo("  loop: step process start-up (interpreter + imports) ...")
    bare = import_seconds("")
    imports = {step: import_seconds(module) for step, module in STEP_MODULES.items()}

    walls = {name: min(r.step(name).seconds for _, r, _ in loops if r.step(name)) for name in
             {s.name for s in record.steps}}
    own = floor["steps"]
    missing = [s for s in STEPS if s not in walls or s not in own]
    if missing:
        raise BenchFailed(f"steps {missing} missing from the run record {sorted(walls)} or the floor "
                          f"{sorted(own)}; gate decision {floor['decision']}")
    total = record.seconds
    own_total = sum(own[s] for s in STEPS)
    loop_floor_steps = sum(walls[s] for s in FLOOR_STEPS)
    floor_process = floor["phases"]["imports"] + sum(own[s] for s in FLOOR_STEPS)
    overhead = total - own_total
    section.figures += [
        Figure("loop total (run record)", total, "s", f"same {len(STEPS)} steps in one process",
               floor["process_seconds"],
               target=("<", 20.0), note="Spark service and step server warm; target on a quiet 2-core machine"),
        Figure("loop total, first run: it starts the Spark service and the step server", cold.seconds, "s",
               "loop total, both warm", total),
        Figure("transform step, first run: the service's first job", cold.step("transform").seconds, "s",
               "transform step, service warm", walls["transform"]),
        Figure("extract→evaluate (4 steps)", loop_floor_steps, "s", "one plain script (floor)", floor_process),
        Figure("orchestration overhead", overhead, "s", "loop total", total, target=("<", 0.10),
               target_on_ratio=True,
               note="loop total minus the steps' own work; ratio = overhead fraction"),
        Figure("runner time between steps", total - sum(walls.values()), "s", "loop total", total),
        Figure("CPU time of the process tree, the Spark service and the step server with its steps",
               loop_run.cpu_seconds + loop_use.cpu_seconds + loop_use.steps_cpu_seconds,
               "s", "the floor's, likewise", floor_run.cpu_seconds + floor_use.cpu_seconds),
        Figure("peak RSS of the process tree", loop_run.peak_rss_bytes / _MB, "MB", "floor process tree",
               floor_run.peak_rss_bytes / _MB),
        Figure("peak RSS of the local Spark service (JVM and its Python)", service_peak / _MB, "MB",
               "peak RSS of the loop's process tree", loop_run.peak_rss_bytes / _MB),
        Figure("peak RSS of the step server and its forked steps", steps_peak / _MB, "MB",
               "floor process tree", floor_run.peak_rss_bytes / _MB,
               note="RSS counts the pages a step shares with the server in both"),
    ]
    phases = step_phases(Path(record.log_path))

    def phase(step: str, key: str) -> str:
        return fmt_number(phases[step][key]) if step in phases else "n/a"

    rows = []
    for step in STEPS:
        rows.append([step, fmt_number(walls[step]), fmt_number(own[step]), fmt_number(walls[step] - own[step]),
                     f"{100 * (walls[step] - own[step]) / walls[step]:.0f}%" if walls[step] else "n/a",
                     fmt_number(imports[step]), phase(step, "executor_start"), phase(step, "body"),
                     phase(step, "exit")])
    rows.append(["all steps", fmt_number(sum(walls.values())), fmt_number(own_total),
                 fmt_number(sum(walls.values()) - own_total),
                 f"{100 * (sum(walls.values()) - own_total) / sum(walls.values()):.0f}%",
                 fmt_number(sum(imports.values())),
                 *[fmt_number(sum(p[k] for p in phases.values())) for k in ("executor_start", "body", "exit")]])
    section.tables.append(Table(
        "Per step: pipeline wall time vs the step's own work (seconds); the last three columns split the "
        "fastest run's step wall time using its log",
        ["step", "pipeline step wall", "own work (in-process)", "overhead", "overhead share",
         "a fresh step process's interpreter + imports (the step server's fork saves them)", "executor start",
         "component body", "process exit"], rows))
    if contention_results is not None:
        from bench import contention

        contention.add_to(section, contention_results)
    floor_phases = floor["phases"]
    section.tables.append(Table("Where the floor's time goes (seconds)", ["phase", "seconds"], [
        ["interpreter start (python -c pass)", fmt_number(bare)],
        ["imports of all steps' modules, once", fmt_number(floor_phases["imports"])],
        *[[label, fmt_number(floor_phases[key])] for key, label in FLOOR_SPARK_PHASES if key in floor_phases],
        *[[f"step {s}", fmt_number(own[s])] for s in STEPS],
        ["whole floor process", fmt_number(floor["process_seconds"])],
    ]))
    section.notes += [
        f"`ctloop run` process wall time (CLI start to exit): {loop_run.wall_seconds:.1f} s; the run record "
        f"covers {total:.1f} s of it.",
        f"Both runs: gate decision `{record.output('evaluate-gate', 'decision', '?')}` (loop) / "
        f"`{floor['decision']}` (floor); floor test ROC AUC {floor['roc_auc']:.4f}; rows {floor['rows']}.",
        "Own work = the step's plain function timed in one warm process (imports excluded, paid once by the "
        "floor); a pipeline step additionally pays the launcher, its fork from the step server, the KFP executor "
        "and the artifact bookkeeping. Both are minima over the repetitions, taken separately, so a step whose own "
        "work varies more than its overhead (the Spark transform, the OpenMP train) can show a negative overhead.",
    ]
    section.notes.append(
        f"Best of {repeat} alternating runs each (minimum per step and in total): loop totals "
        f"{', '.join(f'{r.seconds:.1f}' for _, r, _ in loops)} s; floor totals "
        f"{', '.join(format(f['process_seconds'], '.1f') for _, f, _ in floors)} s. Before them, the first run "
        f"({cold.seconds:.1f} s) started the local Spark service and step server: its transform step took "
        f"{cold.step('transform').seconds:.1f} s"
        + ("." if ctx.quick else f"; then {WARM_UP_PAIRS} runs and floors warmed the service up, untimed. The "
                                 "pairs alternate which goes first."))
    section.notes.append(
        "The Spark service and the step server (whose children the steps are) run outside the runs' process trees: "
        "their CPU during each run is added to the tree's; their memory is shown on its own (they stay resident "
        f"between runs until idle for {settings.local.spark_service_idle_seconds:.0f} / "
        f"{settings.local.step_server_idle_seconds:.0f} s).")
    section.data = {"repeat": repeat,
                    "run_records": [{"seconds": r.seconds, "steps": {s.name: s.seconds for s in r.steps}}
                                    for _, r, _ in loops],
                    "cold_run_record": {"seconds": cold.seconds, "steps": {s.name: s.seconds for s in cold.steps}},
                    "service": {"cold": cold_use.__dict__, "loops": [u.__dict__ for *_, u in loops],
                                "floors": [u.__dict__ for *_, u in floors], "peak_rss_bytes": service_peak,
                                "steps_peak_rss_bytes": steps_peak},
                    "floors": [{k: v for k, v in f.items() if k != "profiles"} for _, f, _ in floors],
                    "imports": imports, "interpreter_start": bare, "step_phases": phases,
                    "loop_process": {"wall": loop_run.wall_seconds, "cpu": loop_run.cpu_seconds,
                                     "peak_rss_bytes": loop_run.peak_rss_bytes},
                    "floor_process": {"wall": floor_run.wall_seconds, "cpu": floor_run.cpu_seconds,
                                      "peak_rss_bytes": floor_run.peak_rss_bytes},
                    "load": os.getloadavg()}
    for name, text in profiles.items():
        section.blocks[f"cProfile of `{name}` in the floor (top functions by cumulative time)"] = \
            _profile_excerpt(text)
    return section


def _profile_excerpt(text: str, keep: int = 15) -> str:
    """The table part of a pstats listing, with the site-packages prefix cut from paths."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    trimmed = [re.sub(r"\S*site-packages/", "", ln).replace(str(REPO) + "/", "")
               for ln in lines[start:start + keep + 1]]
    return "\n".join(trimmed)
