"""The step policy: what a failed step says, what is retried, thread settings, and the compiled YAML's task names
and resources for every pipeline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.api_core.exceptions import BadRequest, ServiceUnavailable

from ctloop import threads
from ctloop.config import DEFAULT_RESOURCES, Settings
from ctloop.errors import DataValidationError
from ctloop.steps import REASON_PREFIX, run_step, transient_retry
from ctloop.threads import fit_threads, idle_cpus, thread_env
from pipelines.compile import all_pipelines, compile_pipeline
from pipelines.local_run import RunRecord, StepRecord, _attach_reasons
from pipelines.report_html import markdown_html, render_run_report

REPO = Path(__file__).resolve().parents[1]
IMAGE = "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/component:0123abc"
FAST = transient_retry(deadline_s=5.0, initial_s=0.01)


# ---- run_step: deterministic errors fail once, transient ones retry ------------------------------------------

def test_an_expected_error_fails_once_with_one_line_and_no_traceback(capsys: pytest.CaptureFixture,
                                                                      tmp_path: Path) -> None:
    calls = []

    def body() -> None:
        calls.append(1)
        raise DataValidationError("t: column 'churned' has type STRING;\n expected INT64 or BOOL")

    with pytest.raises(SystemExit) as exit_info:
        run_step(body, retry=FAST, termination_log=tmp_path / "absent")
    assert exit_info.value.code == 1 and len(calls) == 1
    line = f"{REASON_PREFIX}t: column 'churned' has type STRING; expected INT64 or BOOL\n"
    assert capsys.readouterr().err == line and not (tmp_path / "absent").exists()
    # In a Kubernetes container (Vertex), the termination message gets the same line.
    (tmp_path / "termination-log").write_text("")
    with pytest.raises(SystemExit):
        run_step(body, retry=FAST, termination_log=tmp_path / "termination-log")
    assert (tmp_path / "termination-log").read_text() == line


def test_transient_google_errors_are_retried_in_the_step() -> None:
    calls = []

    def body(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise ServiceUnavailable("backend busy")
        return x * 2

    assert run_step(body, 21, retry=FAST) == 42 and calls == [21, 21, 21]


def test_a_non_transient_google_error_is_not_retried() -> None:
    calls = []

    def body() -> None:
        calls.append(1)
        raise BadRequest("invalid query")

    with pytest.raises(BadRequest):
        run_step(body, retry=FAST)
    assert len(calls) == 1


def test_a_body_that_raises_nothing_does_not_import_the_retry_policy() -> None:
    """google.api_core is imported at a body's first exception only (0.1 s of every local step otherwise)."""
    code = ("import sys\nfrom ctloop.steps import run_step\n"
            "print(run_step(lambda x: x * 2, 21), 'google.api_core.retry' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42", "False"]


def test_the_expected_error_line_ends_the_real_step_process_log() -> None:
    """In a process, as the executor runs it: exit 1, the reason as the last line, no traceback."""
    code = ("from ctloop.steps import run_step\nfrom ctloop.errors import CtloopError\n"
            "def body():\n    raise CtloopError('settings: gate.min_roc_auc: expected a number')\n"
            "run_step(body)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"{REASON_PREFIX}settings: gate.min_roc_auc: expected a number"
    assert "Traceback" not in done.stderr


def test_a_step_process_freezes_what_is_left_at_exit_and_still_runs_its_exit_hooks() -> None:
    """The objects alive at exit are frozen before the interpreter's final collections, once however many bodies
    ran; exit hooks registered by the last body run before the freeze, the others after it, and all of them run."""
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('process', gc.get_freeze_count() > 0, flush=True))\n"
            "from ctloop.steps import run_step\n"
            "def body(name):\n"
            "    atexit.register(lambda: print(name, gc.get_freeze_count() > 0, flush=True))\n"
            "    return 7\n"
            "sys.exit(run_step(body, 'first') + run_step(body, 'last'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 14, done.stderr
    assert done.stdout.splitlines() == ["last False", "first True", "process True"]


# ---- the local runner's per-step reasons ---------------------------------------------------------------------

def _record(tmp_path: Path, steps: list[StepRecord]) -> RunRecord:
    return RunRecord(run_id="r", pipeline="p", status="FAILED", started_at="", seconds=1.0, parameters={},
                     steps=steps, pipeline_root=str(tmp_path), log_path=str(tmp_path / "pipeline.log"))


def test_each_failed_step_gets_the_reason_from_its_own_log_section(tmp_path: Path) -> None:
    log = tmp_path / "pipeline.log"
    log.write_text(
        "\x1b[32mExecuting task 'extract'\x1b[0m\n    Streamed logs:\n    starting\n"
        f"    {REASON_PREFIX}t: column 'churned' has type STRING; expected INT64 or BOOL\n"
        "Task 'extract' finished with status FAILURE\n"
        "Executing task 'register'\n    Streamed logs:\n    Traceback (most recent call last):\n"
        "      File \"x.py\", line 1, in <module>\n    google.api_core.exceptions.Forbidden: 403 denied\n"
        "Task 'register' finished with status FAILURE\n"
        "Executing task 'train'\n    {\"executor\": \"output\"}\n Task 'train' finished with status SUCCESS\n")
    record = _record(tmp_path, [StepRecord("extract", "FAILED"), StepRecord("train", "SUCCEEDED"),
                                StepRecord("register", "FAILED")])
    _attach_reasons(record, log)
    assert record.step("extract").error == "t: column 'churned' has type STRING; expected INT64 or BOOL"
    assert record.step("register").error == "google.api_core.exceptions.Forbidden: 403 denied"
    assert record.step("train").error == ""


# ---- thread settings ---------------------------------------------------------------------------------------

def test_thread_settings_become_the_runtime_variables() -> None:
    assert thread_env(Settings()) == {"OMP_WAIT_POLICY": "PASSIVE"}
    two = thread_env(Settings().with_overrides(["local.threads=2", "local.omp_wait_policy=ACTIVE"]))
    assert two == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2",
                   "MKL_NUM_THREADS": "2"}


def test_local_threads_are_set_before_the_runtimes_load_and_a_user_value_wins() -> None:
    code = ("import os\nfrom ctloop.config import Settings\nfrom ctloop.threads import use_local_threads\n"
            "use_local_threads(Settings().with_overrides(['local.threads=1']))\n"
            "from threadpoolctl import threadpool_info\nimport sklearn.ensemble, numpy\n"
            "import json\nprint(json.dumps([os.environ['OMP_WAIT_POLICY'], "
            "sorted({p['internal_api']: p['num_threads'] for p in threadpool_info()}.items())]))\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("_NUM_THREADS")}
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # set by the user: kept
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=env, check=True)
    policy, pools = json.loads(done.stdout.strip().splitlines()[-1])
    assert policy == "ACTIVE"
    assert pools and all(n == 1 for _, n in pools), pools  # every OpenMP/BLAS pool sized by the settings


def test_a_local_fit_takes_the_cpus_left_idle_and_a_quiet_machine_keeps_every_core(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.ensemble  # noqa: F401  (loads the OpenMP runtime the limit applies to)
    from threadpoolctl import threadpool_info

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "idle_cpus", lambda: 1.2)  # another process holds the rest
    with fit_threads(Settings()) as limit:
        openmp = {p["num_threads"] for p in threadpool_info() if p["user_api"] == "openmp"}
    if cpus > 1:
        assert limit == 1 and openmp == {1}
    monkeypatch.setattr(threads, "idle_cpus", lambda: cpus - 0.1)  # quiet: no limit
    with fit_threads(Settings()) as limit:
        assert limit is None


def test_fit_threads_leave_the_cloud_and_explicit_settings_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def never() -> float:
        raise AssertionError("sampled the CPUs although the settings decide")

    monkeypatch.setattr(threads, "idle_cpus", never)
    for settings in (Settings().with_overrides(["local.threads=1"]),
                     Settings().with_overrides(["backend=cloud", "gcp.project=ctloop-test"])):
        with fit_threads(settings) as limit:
            assert limit is None
    measured = idle_cpus()
    assert measured is not None and 0.0 <= measured <= len(os.sched_getaffinity(0))


# ---- compiled YAML of every pipeline: names, retries, resources ------------------------------------------------

@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    settings = Settings().with_overrides(["resources.train.memory=64G", "resources.train.cpu=16"])
    out = tmp_path_factory.mktemp("compiled")
    return {name: yaml.safe_load(compile_pipeline(func, out / f"{name}.yaml", IMAGE, settings.resources).read_text())
            for name, func in all_pipelines().items()}


def _tasks(spec: dict) -> list[tuple[str, dict]]:
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return [(name, task) for dag in dags for name, task in dag["tasks"].items()]


def test_every_task_display_name_is_plain(compiled: dict[str, dict]) -> None:
    for pipeline, spec in compiled.items():
        names = [(n, t["taskInfo"]["name"]) for n, t in _tasks(spec)]
        assert len(names) >= {"scoring": 2}.get(pipeline, 4), pipeline  # the walk found the tasks
        for task, shown in names:
            assert re.fullmatch(r"[a-z0-9-]+", shown), (pipeline, task, shown)


def test_no_task_is_retried_as_a_whole(compiled: dict[str, dict]) -> None:
    for pipeline, spec in compiled.items():
        retried = [n for n, t in _tasks(spec) if "retryPolicy" in t]
        assert retried == [], (pipeline, retried)


def test_every_executor_has_the_settings_cpu_and_memory(compiled: dict[str, dict]) -> None:
    seen = set()
    for pipeline, spec in compiled.items():
        for name, executor in spec["deploymentSpec"]["executors"].items():
            step = name.removeprefix("exec-").replace("-", "_")
            cpu, memory = ("16", "64G") if step == "train" else DEFAULT_RESOURCES[step]
            assert executor["container"]["resources"] == {
                "cpuLimit": float(cpu), "memoryLimit": float(memory.rstrip("G")),
                "resourceCpuLimit": cpu, "resourceMemoryLimit": memory}, (pipeline, name)
            seen.add(step)
    assert seen == set(DEFAULT_RESOURCES)  # every configured step exists, every step is configured


def test_resources_compile_exactly_as_kfp_set_cpu_limit_does(compiled: dict[str, dict], tmp_path: Path) -> None:
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11")
    def probe():  # no annotations: this module postpones them, which kfp cannot read
        pass

    @dsl.pipeline(name="probe")
    def pipeline():
        probe().set_cpu_limit("16").set_memory_limit("64G")

    compiler.Compiler().compile(pipeline, str(tmp_path / "p.yaml"))
    (theirs,) = yaml.safe_load((tmp_path / "p.yaml").read_text())["deploymentSpec"]["executors"].values()
    ours = compiled["training"]["deploymentSpec"]["executors"]["exec-train"]
    assert ours["container"]["resources"] == theirs["container"]["resources"]


def test_unknown_resource_steps_are_refused() -> None:
    with pytest.raises(ValueError, match=r"resources: unknown step\(s\) \['trian'\]"):
        Settings.model_validate({"resources": {"trian": {"cpu": "2", "memory": "4G"}}})
    with pytest.raises(ValueError, match="resources.train.memory"):
        Settings().with_overrides(["resources.train.memory=lots"])


# ---- the report renders the data-quality Markdown as tables ----------------------------------------------------

def test_data_quality_markdown_becomes_tables() -> None:
    html = markdown_html("# Transform data quality (run `r1`)\n\nInput `x`: **10** rows.\n\n"
                         "| column | role | chosen by |\n|---|---|---|\n| `a<b` | label | configured |\n")
    assert html == ("<h3>Transform data quality (run <code>r1</code>)</h3><p>Input <code>x</code>: <b>10</b> rows.</p>"
                    "<table><tr><th>column</th><th>role</th><th>chosen by</th></tr>"
                    "<tr><td><code>a&lt;b</code></td><td>label</td><td>configured</td></tr></table>")


def test_the_report_shows_each_failed_steps_reason(tmp_path: Path) -> None:
    record = _record(tmp_path, [StepRecord("extract", "FAILED", error="t: column 'x' has type STRING")])
    record.error = "extract: t: column 'x' has type STRING"
    html = render_run_report(record)
    assert "<td>extract</td>" in html and "<td>t: column &#x27;x&#x27; has type STRING</td>" in html
    assert "<pre>" not in html


def test_the_feature_list_says_each_role_and_whether_it_was_inferred() -> None:
    from ctloop.features import feature_roles, resolve_feature_spec

    types = {"customer_id": "string", "event_ts": "timestamp", "churned": "int", "tenure": "double",
             "plan": "string"}
    inferred = Settings()
    configured = inferred.with_overrides({"columns.numeric_features": ["tenure"], "data.history_features": False})
    assert feature_roles(resolve_feature_spec(inferred, types), inferred)[:5] == [
        ("customer_id", "id", "configured (columns.id_column)"),
        ("event_ts", "timestamp", "configured (columns.timestamp_column)"),
        ("churned", "label", "configured (columns.label_column)"),
        ("tenure", "numeric feature", "inferred from the column type"),
        ("plan", "categorical feature", "inferred from the column type")]
    roles = feature_roles(resolve_feature_spec(inferred, types), inferred)
    assert ("hist_prior_events", "numeric feature", "derived (per-entity history, data.history_features)") in roles
    assert feature_roles(resolve_feature_spec(configured, types), configured)[3:] == [
        ("tenure", "numeric feature", "configured (columns.numeric_features)"),
        ("plan", "categorical feature", "inferred from the column type")]
