"""Run a pipeline with the KFP local runner (SubprocessRunner, no venv: the components import this project).

Progress is printed per step; the runner's own verbose log goes to ``<runs_dir>/<run_id>/pipeline.log``. After the
run, every task's executor output is collected into a run record (``run.json``) and an HTML report.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctloop.config import Settings
from ctloop.errors import CtloopError
from ctloop.steps import REASON_PREFIX
from ctloop.threads import use_local_threads

_TASK_START = re.compile(r"Executing task .*?'([^']+)'")
_TASK_END = re.compile(r"Task .*?'([^']+)'.* finished with status .*?(SUCCESS|FAILURE)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last line of a Python traceback: ``package.module.SomeError: message``.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b(: .*)?$")


class PipelineRunError(CtloopError):
    """A local pipeline run failed; the message names the failing step and its last log lines."""


@dataclass
class StepRecord:
    name: str
    status: str = "RUNNING"
    started: float = 0.0
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str = ""  # a failed step's one-line reason
    attempts: int = 0  # times the runner started it


@dataclass
class RunRecord:
    run_id: str
    pipeline: str
    status: str
    started_at: str
    seconds: float
    parameters: dict[str, Any]
    steps: list[StepRecord]
    pipeline_root: str
    log_path: str
    report_path: str = ""
    error: str = ""

    def step(self, name: str) -> StepRecord | None:
        return next((s for s in self.steps if s.name == name), None)

    def output(self, step: str, key: str, default: Any = None) -> Any:
        s = self.step(step)
        return s.outputs.get(key, default) if s else default

    def artifact(self, step: str, name: str) -> dict[str, Any]:
        s = self.step(step)
        return s.artifacts.get(name, {}) if s else {}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        data = json.loads(path.read_text())
        data["steps"] = [StepRecord(**s) for s in data["steps"]]
        return cls(**data)


class _ProgressStream(io.TextIOBase):
    """Receives the runner's stdout: writes all of it to the log, and step starts/ends to ``on_event``."""

    def __init__(self, log: io.TextIOBase, on_event: Callable[[str, str], None]) -> None:
        self._log = log
        self._on_event = on_event
        self._buf = ""

    def write(self, text: str) -> int:
        self._log.write(text)
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            clean = _ANSI.sub("", line)
            if m := _TASK_START.search(clean):
                self._on_event(m.group(1), "start")
            elif m := _TASK_END.search(clean):
                self._on_event(m.group(1), m.group(2))
        return len(text)

    def flush(self) -> None:
        self._log.flush()


def new_run_id(prefix: str = "ctloop-train") -> str:
    return f"{prefix}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S-%f')}"


def run_local(
    pipeline_func: Callable[..., Any],
    settings: Settings,
    *,
    run_id: str,
    arguments: dict[str, Any],
    echo: Callable[[str], None] = print,
    runner: Any = None,
    uses_spark: bool = False,
) -> RunRecord:
    """Run ``pipeline_func`` under kfp.local with ``arguments``; returns the run record (also on failure).

    ``runner``: a ``kfp.local`` runner; default ``SubprocessRunner(use_venv=False)`` (this process's venv).
    ``uses_spark``: a step runs a Spark job, so the local Spark service is started now, while the steps before
    it run (ctloop/spark_service.py); the steps of another runner run it where they run. The default runner's
    steps fork from the local step server (ctloop/step_server.py).
    """
    from kfp import local

    run_dir = settings.local.runs_dir / run_id
    record_path = run_dir / "run.json"
    if record_path.is_file():
        previous = RunRecord.load(record_path)
        if previous.status == "SUCCEEDED":
            echo(f"run {run_id} already succeeded; not running it again ({record_path})")
            return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    # One pipeline root per run: concurrent runs (two triggers at once) never pick up each other's outputs.
    root = settings.local.pipeline_root / run_id
    root.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "pipeline.log"
    steps: dict[str, StepRecord] = {}
    terminal = sys.stdout  # progress goes here; everything else the runner prints goes to the log

    def show(text: str) -> None:
        with contextlib.redirect_stdout(terminal):
            echo(text)

    def on_event(task: str, event: str) -> None:
        now = time.perf_counter()
        if event == "start":
            attempts = steps[task].attempts if task in steps else 0
            steps[task] = StepRecord(name=task, started=now, attempts=attempts + 1)
            show(f"  ▸ {task} ...")
            return
        step = steps.setdefault(task, StepRecord(name=task, started=now))
        step.status = "SUCCEEDED" if event == "SUCCESS" else "FAILED"
        step.seconds = round(now - step.started, 3)
        mark = "✓" if step.status == "SUCCEEDED" else "✗"
        show(f"  {mark} {task} {step.seconds:.1f}s")

    existing = {p.name for p in root.iterdir()} if root.exists() else set()
    use_local_threads(settings)  # the step processes inherit it
    if uses_spark and runner is None and settings.local.spark_service_idle_seconds > 0:
        from ctloop.spark_service import start_soon

        start_soon(settings)
    local.init(runner=runner or local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=True, enable_caching=True)
    started_at = datetime.now(UTC).isoformat()
    t0 = time.perf_counter()
    error = ""
    with _step_processes(settings, runner), log_path.open("w") as log, \
            contextlib.redirect_stdout(_ProgressStream(log, on_event)), warnings.catch_warnings():
        # The runner warns that display names and the component image do not apply locally: both are expected.
        warnings.filterwarnings("ignore", module=r"kfp\.local\..*")
        try:
            pipeline_func(**arguments)
        except Exception as exc:  # the runner raises RuntimeError naming the failed task
            error = _ANSI.sub("", str(exc))
    seconds = round(time.perf_counter() - t0, 3)

    run_root = _new_run_root(root, existing)
    if run_root is not None:
        _collect_outputs(run_root, steps)
    status = "FAILED" if error else "SUCCEEDED"
    for step in steps.values():
        if step.status == "RUNNING":
            step.status = "FAILED" if error else "SKIPPED"
    record = RunRecord(
        run_id=run_id,
        pipeline=getattr(pipeline_func, "name", "pipeline"),
        status=status,
        started_at=started_at,
        seconds=seconds,
        parameters={k: v for k, v in arguments.items() if k != "config"},
        steps=sorted(steps.values(), key=lambda s: s.started),
        pipeline_root=str(run_root or root),
        log_path=str(log_path),
        error=error,
    )
    if error:
        _attach_reasons(record, log_path)
        failed = [s for s in record.steps if s.status == "FAILED"]
        record.error = "; ".join(f"{s.name}: {s.error}" for s in failed) or error.splitlines()[0]
    _write_atomic(record_path, record.to_json())
    return record


def _step_processes(settings: Settings, runner: Any) -> contextlib.AbstractContextManager[Any]:
    """The default runner's steps fork from the local step server (ctloop/step_server.py) unless it is off."""
    if runner is not None or settings.local.step_server_idle_seconds <= 0:
        return contextlib.nullcontext()
    from ctloop.step_server import forked_steps

    return forked_steps(settings)


def _new_run_root(root: Path, existing: set[str]) -> Path | None:
    fresh = [p for p in root.iterdir() if p.is_dir() and p.name not in existing]
    return max(fresh, key=lambda p: p.stat().st_mtime) if fresh else None


def _collect_outputs(run_root: Path, steps: dict[str, StepRecord]) -> None:
    for output in run_root.rglob("executor_output.json"):
        task = output.parent.name
        step = steps.setdefault(task, StepRecord(name=task, status="SUCCEEDED"))
        data = json.loads(output.read_text())
        step.outputs = data.get("parameterValues", {})
        for name, entry in data.get("artifacts", {}).items():
            arts = entry.get("artifacts", [])
            if arts:
                step.artifacts[name] = {"uri": arts[0].get("uri", ""), "metadata": arts[0].get("metadata", {})}


def _attach_reasons(record: RunRecord, log_path: Path) -> None:
    """Give each failed step its one-line reason from its own section of the log: the step's ``ctloop error:``
    line (ctloop/steps.py), else the last line of its traceback, else its last log line."""
    text = _ANSI.sub("", log_path.read_text()) if log_path.is_file() else ""
    for step in record.steps:
        if step.status != "FAILED":
            continue
        start = text.rfind(f"Executing task '{step.name}'")
        if start < 0:
            step.error = "failed before its log started"
            continue
        following = _TASK_START.search(text, start + 1)
        lines = [ln.strip() for ln in text[start:following.start() if following else None].splitlines()]
        lines = [ln for ln in lines if ln and not _TASK_END.search(ln)]
        reasons = [ln.removeprefix(REASON_PREFIX) for ln in lines if ln.startswith(REASON_PREFIX)]
        raised = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
        step.error = (reasons or raised or lines[-1:] or ["no log output"])[-1]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def stderr_echo(text: str) -> None:
    print(text, file=sys.stderr)
