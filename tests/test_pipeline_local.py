"""The training pipeline end to end under the KFP local runner, on small sample data, through both gate branches.

One module-scoped workdir carries state from run to run, as a user's would:
1. the compiled YAML (loaded back from disk) trains, passes the gate, registers v1 and deploys it;
2. the Python DSL pipeline reruns on the same data: the candidate is scored against that champion, and nothing is
   duplicated (no second version, no second deployment);
3. a run with an unreachable threshold is rejected: the champion keeps 100% of production traffic and its alias;
4. a rerun with a run id that already succeeded does not run again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kfp import components as kfp_components

from ctloop.config import Settings, load_settings
from ctloop.launching import pipeline_parameters as pipeline_arguments
from ctloop.registry import LocalRegistry
from devtools.sample_data import write_sample_data
from pipelines.compile import compile_pipeline
from pipelines.local_run import RunRecord, run_local
from pipelines.main_job import predict_from_served_endpoint
from pipelines.training import training_pipeline

REPO = Path(__file__).resolve().parents[1]
IMAGE = "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/component:0123abc"

pytestmark = [pytest.mark.slow, pytest.mark.spark]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    workdir = tmp_path_factory.mktemp("ctloop")
    s = load_settings(REPO / "ctloop.yaml", [
        f"local.workdir={workdir}",
        "local.spark_master=local[1]",
        "local.spark_shuffle_partitions=2",
        "model.params={max_iter: 60, max_depth: 3}",
        "deploy.smoke_instances=5",
    ])
    write_sample_data(s.local.landing_dir, s, rows=6000, seed=11)
    return s


def _run(settings: Settings, pipeline, run_id: str) -> RunRecord:
    lines: list[str] = []
    record = run_local(pipeline, settings, run_id=run_id,
                       arguments=pipeline_arguments(settings, run_id, "", "gs://landing/events/part-0.parquet#1"),
                       echo=lines.append)
    assert record.status == "SUCCEEDED", record.error
    # progress was reported per step, start and end
    assert any("extract" in ln and "✓" in ln for ln in lines), lines
    return record


def _production(settings: Settings):
    return LocalRegistry(settings.local.registry_db).get_endpoint(settings.deploy.production_endpoint)


@pytest.fixture(scope="module")
def compiled(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_pipeline(training_pipeline, tmp_path_factory.mktemp("compiled") / "training.yaml", IMAGE)


def test_compiled_yaml_pins_the_image_and_installs_nothing_at_run_time(compiled: Path) -> None:
    spec = yaml.safe_load(compiled.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 9
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"] == IMAGE, name
        script = " ".join(container.get("command", []) + container.get("args", []))
        # The component image carries the project and kfp from the lock file; nothing is pip-installed per step.
        assert "pip install" not in script, name
        assert "kfp.dsl.executor_main" in script, name
    # The image is built from the lock file that pins the same kfp the components were compiled with.
    import kfp

    assert f"kfp=={kfp.__version__}" in (REPO / "requirements.lock").read_text()
    assert "requirements.lock" in (REPO / "components" / "Dockerfile").read_text()
    # Never a cached extract. No step is retried as a whole: bad data or settings fail once, and transient
    # API errors are retried inside the step (ctloop/steps.py; tests/test_step_policy.py).
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["extract"]["cachingOptions"].get("enableCache", False) is False
    passed_branch = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    for task in ("extract", "transform"):
        assert "retryPolicy" not in tasks[task], task
    for task in ("register", "deploy"):
        assert "retryPolicy" not in passed_branch[task], task
    # Each step's CPU and memory from the settings travel in the YAML.
    assert executors["exec-train"]["container"]["resources"]["resourceMemoryLimit"] == "32G"
    assert executors["exec-materialize-features"]["container"]["resources"]["resourceMemoryLimit"] == "8G"
    # The deploy step's smoke test reads the states the materialize step writes: the gate's branches wait on it.
    assert "materialize-features" in tasks["condition-branches-1"]["dependentTasks"]


def test_first_run_of_the_compiled_yaml_trains_gates_registers_deploys_and_serves(
        settings: Settings, compiled: Path) -> None:
    pipeline = kfp_components.load_component_from_file(str(compiled))
    record = _run(settings, pipeline, "run-first")
    assert record.output("evaluate-gate", "decision") == "pass"
    assert record.output("evaluate-gate", "champion_metric") == -1.0  # no champion yet
    assert record.step("report-rejection") is None or record.step("report-rejection").status == "SKIPPED"
    reg = LocalRegistry(settings.local.registry_db)
    versions = reg.list_versions(settings.model.display_name)
    assert [v.version_id for v in versions] == [1]
    assert reg.get_alias(settings.model.display_name, "champion").version_id == 1
    # The registered copy holds the ONNX export with the gate's verdict, so the endpoint serves it.
    from ctloop.model_runtime import load_model, read_onnx_check

    assert read_onnx_check(versions[0].artifact_uri)["agrees"]
    assert load_model(versions[0].artifact_uri).runtime == "onnx"
    prod = _production(settings)
    assert [(d.version, d.traffic_percent) for d in prod.deployments] == [(1, 100)]
    # Each entity's latest history state is in the local online store.
    from ctloop.online_store import SQLiteStore, local_store_path

    assert SQLiteStore(local_store_path(settings)).count() > 0
    answer = predict_from_served_endpoint(settings, record, echo=lambda _s: None)
    (pred,) = answer["predictions"]
    assert pred["label"] in (0, 1) and 0.0 <= pred["probability"] <= 1.0
    # The example sends the entity id and source features only: its history was looked up.
    assert pred["onlineFeatures"]["known"] is True and pred["onlineFeatures"]["values"]["hist_prior_events"] > 0


def test_second_run_on_the_same_data_is_compared_with_the_champion_and_duplicates_nothing(
        settings: Settings) -> None:
    record = _run(settings, training_pipeline, "run-second")
    champion_metric = record.output("evaluate-gate", "champion_metric")
    assert champion_metric > 0.5  # the champion was scored on this run's test split
    assert record.output("evaluate-gate", "decision") == "pass"
    reg = LocalRegistry(settings.local.registry_db)
    # Same data, same settings: the same model, so the registry keeps one version and production one deployment.
    assert [v.version_id for v in reg.list_versions(settings.model.display_name)] == [1]
    assert [(d.version, d.traffic_percent) for d in _production(settings).deployments] == [(1, 100)]


def test_rejected_candidate_leaves_the_champion_serving(settings: Settings) -> None:
    strict = settings.with_overrides(["gate.min_roc_auc=0.999"])
    record = _run(strict, training_pipeline, "run-rejected")
    assert record.output("evaluate-gate", "decision") == "fail"
    reasons = json.loads(record.output("evaluate-gate", "reasons"))
    failed = [r for r in reasons if not r["passed"]]
    assert any(r["check"].startswith("min_roc_auc") or "roc_auc" in r["check"] for r in failed), failed
    assert record.step("register") is None or record.step("register").status == "SKIPPED"
    report = Path(record.artifact("report-rejection", "report")["uri"]).read_text()
    assert "0.999" in report
    reg = LocalRegistry(settings.local.registry_db)
    assert reg.get_alias(settings.model.display_name, "champion").version_id == 1
    assert [(d.version, d.traffic_percent) for d in _production(settings).deployments] == [(1, 100)]
    html = Path(settings.local.runs_dir / "run-rejected" / "run.json")
    assert html.is_file()


def test_a_run_id_that_already_succeeded_is_not_run_again(settings: Settings) -> None:
    before = sorted(p.name for p in (settings.local.pipeline_root / "run-first").iterdir())
    lines: list[str] = []
    record = run_local(training_pipeline, settings, run_id="run-first",
                       arguments=pipeline_arguments(settings, "run-first", "", ""), echo=lines.append)
    assert record.status == "SUCCEEDED"
    assert any("already succeeded" in ln for ln in lines)
    assert sorted(p.name for p in (settings.local.pipeline_root / "run-first").iterdir()) == before
