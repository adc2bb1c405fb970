"""The monitoring steps on their own, on real engines and a real champion: collect_recent (DuckDB extract over the
recent window, or the prediction log), check_drift (reference found through the champion's card, scores, HTML
report, metrics) and launch_training (exactly once: a real detached process locally, the real aiplatform client
against the recording server in the cloud)."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from google.auth.credentials import AnonymousCredentials
from kfp.dsl import HTML, Dataset, Metrics

import components.launch as launch_module
from components.drift import run_drift_check, run_drift_step
from components.launch import LAUNCH_LEDGER, launch_training_run
from components.recent import collect_recent_to_artifact, gather_recent, recent_window
from ctloop.config import Settings, load_settings
from ctloop.errors import ChampionError, DataValidationError
from ctloop.features import FeatureSpec
from ctloop.launch_ledger import Ledger
from ctloop.launching import LaunchError
from ctloop.launching import retrain_job_id as training_run_id
from ctloop.local_launch import launch_env
from ctloop.modeling import CARD_FILE, train_model
from ctloop.prediction_log import log_root
from devtools.sample_data import CATEGORICAL_COLUMNS, NUMERIC_COLUMNS, generate_part, write_sample_data
from serving.prediction_log import PredictionLogConfig, PredictionLogger
from tests.recording_server import RecordingServer

REPO = Path(__file__).resolve().parents[1]
NOW = datetime.now(UTC).replace(microsecond=0)


def _settings(workdir: Path, **overrides: object) -> Settings:
    return load_settings(REPO / "ctloop.yaml", [f"local.workdir={workdir}", "model.type=logistic_regression",
                                                 "model.params={}", "monitoring.min_rows=300"]).with_overrides(
        dict(overrides))


def _split(directory: Path, frame: pd.DataFrame, spec: FeatureSpec) -> Path:
    """A split directory as the transform writes it (cleaned rows, float numerics, the feature spec)."""
    directory.mkdir(parents=True)
    frame = frame[frame["churned"].isin([0, 1])].copy()
    for c in spec.numeric:
        frame[c] = frame[c].astype("float64")
    frame.to_parquet(directory / "part-00000.parquet", index=False)
    spec.write(directory)
    return directory


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A champion trained on sample data, its card pointing at its train and valid splits."""
    root = tmp_path_factory.mktemp("champion")
    s = _settings(root, **{"data.history_features": False})
    spec = FeatureSpec("customer_id", "event_ts", "churned", list(NUMERIC_COLUMNS), list(CATEGORICAL_COLUMNS),
                       history_enabled=False)
    window = {"start": NOW - timedelta(days=120), "end": NOW - timedelta(days=30)}
    train = _split(root / "train", generate_part(s, 0, rows=8000, seed=1, batch="t", **window).to_pandas(), spec)
    valid = _split(root / "valid", generate_part(s, 0, rows=3000, seed=2, batch="v", **window).to_pandas(), spec)
    lineage = {"train_uri": str(train), "valid_uri": str(valid), "git_sha": "abc"}
    train_model(s, train, valid, root / "model", "run-champion", lineage)
    return root / "model"


def _recent_dir(tmp_path: Path, drift: float, seed: int, rows: int = 3000) -> Path:
    s = Settings()
    frame = generate_part(s, 0, rows=rows, seed=seed, drift=drift, batch=f"r{seed}",
                          start=NOW - timedelta(days=20), end=NOW).to_pandas()
    out = tmp_path / f"recent-{seed}-{drift}"
    out.mkdir()
    frame.to_parquet(out / "part-0.parquet", index=False)
    return out


# --- collect_recent ------------------------------------------------------------------------------------------


def test_recent_window_ends_at_window_end_else_snapshot_else_now(tmp_path: Path) -> None:
    s = _settings(tmp_path, **{"monitoring.recent_days": 3})
    start, end = recent_window(s, "2026-05-10T12:00:00Z")
    assert (start.isoformat(), end.isoformat()) == ("2026-05-07T12:00:00+00:00", "2026-05-10T12:00:00+00:00")
    fixed = s.with_overrides({"monitoring.window_end": "2026-01-01T00:00:00"})
    assert recent_window(fixed, "2026-05-10T12:00:00Z")[1].isoformat() == "2026-01-01T00:00:00+00:00"
    assert abs((recent_window(s, "")[1] - datetime.now(UTC)).total_seconds()) < 60


def test_extract_source_selects_only_the_recent_window_with_the_extract_sql(tmp_path: Path) -> None:
    s = _settings(tmp_path, **{"monitoring.recent_days": 20})
    write_sample_data(s.local.landing_dir, s, rows=2000, seed=3, batch="old", start=NOW - timedelta(days=90),
                      end=NOW - timedelta(days=30))
    write_sample_data(s.local.landing_dir, s, rows=1500, seed=4, batch="new", start=NOW - timedelta(days=15),
                      end=NOW - timedelta(days=1))
    out = tmp_path / "recent"
    artifact = Dataset(uri=str(out))
    (rows,) = collect_recent_to_artifact(s.to_param(), "mon-1", NOW.isoformat(), artifact)
    frame = pd.read_parquet(out)
    # What extract.sql selects: rows in [end - 20 days, end) or without a timestamp, exact duplicates once.
    landing = pd.read_parquet(s.local.landing_dir / s.data.bq_dataset / s.data.bq_table)
    ts = landing["event_ts"]
    expected = landing[ts.isna() | ((ts >= pd.Timestamp(NOW - timedelta(days=20))) & (ts < pd.Timestamp(NOW)))]
    assert rows == len(frame) == len(expected.drop_duplicates())
    assert frame["event_ts"].min() >= pd.Timestamp(NOW - timedelta(days=20))
    assert artifact.metadata["source"] == "extract" and artifact.metadata["window_end"] == NOW.isoformat()
    assert artifact.metadata["origin"] == s.source_table and "SELECT" in artifact.metadata["query"].upper()
    short = s.with_overrides({"monitoring.recent_days": 1})
    with pytest.raises(DataValidationError, match=r"recent batch \(monitoring.recent_days=1, monitoring.min_rows="
                                                  r"300\): .*returned (no rows|\d+ rows)"):
        gather_recent(short, run_id="mon-2", output_path=str(tmp_path / "r2"), output_uri=str(tmp_path / "r2"),
                      snapshot_time=NOW.isoformat())


def test_prediction_log_source_reads_the_endpoint_log_window(tmp_path: Path) -> None:
    s = _settings(tmp_path, **{"monitoring.source": "prediction_log", "monitoring.recent_days": 1})
    root = log_root(s, s.deploy.production_endpoint)
    logger = PredictionLogger(PredictionLogConfig(uri=root, sample_rate=1.0), ["tenure_months"], ["region"])
    logger.offer({"tenure_months": list(range(400)), "region": ["north"] * 400}, [0.2] * 400, 0.5, "dm", "m", "3")
    logger.close()
    out = tmp_path / "recent"
    # The logger stamps rows with the wall clock: the window ends just after this test's own now, not the
    # module's (taken at import, possibly minutes earlier in a long run).
    window_end = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    batch = gather_recent(s, run_id="m", output_path=str(out), output_uri=str(out), snapshot_time=window_end)
    assert batch.row_count == 400 and batch.origin == root and batch.lineage == {"model_versions": "3"}
    assert sorted(pd.read_parquet(out)["tenure_months"].tolist()) == [float(i) for i in range(400)]
    with pytest.raises(DataValidationError, match=r"400 logged rows .* expected at least 500 \(monitoring.min_rows"):
        gather_recent(s.with_overrides({"monitoring.min_rows": 500}), run_id="m", output_path=str(out),
                      output_uri=str(out), snapshot_time=window_end)


# --- check_drift ---------------------------------------------------------------------------------------------


def test_same_distribution_is_no_drift_with_scores_measured(champion: Path, tmp_path: Path) -> None:
    s = _settings(tmp_path)
    check = run_drift_check(s, _recent_dir(tmp_path, 0.0, 10), str(champion))
    r = check.report
    assert r.decision == "no_drift", r.reasons[0].message
    assert sorted(check.compared) == sorted([*NUMERIC_COLUMNS, *CATEGORICAL_COLUMNS])
    # Scores compared; at 375 entities a PSI near psi_warn is noise, which the test (not significant) says.
    assert r.scores is not None and r.scores.status in ("ok", "warn") and r.scores.p_value >= r.alpha
    assert r.notes == ["one row per customer_id: reference 7996 -> 1000 rows, recent 3000 -> 375 rows"]
    card = json.loads((champion / CARD_FILE).read_text())
    assert check.reference_uri == card["lineage"]["train_uri"]


def test_drifted_batch_is_drift_and_the_step_writes_report_metrics_and_outputs(champion: Path,
                                                                              tmp_path: Path) -> None:
    s = _settings(tmp_path)
    recent = Dataset(uri=str(_recent_dir(tmp_path, 0.6, 11)))
    recent.metadata.update({"source": "extract", "window_end": NOW.isoformat()})
    metrics, report = Metrics(uri=str(tmp_path / "metrics")), HTML(uri=str(tmp_path / "out" / "report.html"))
    decision, drifted, reasons = run_drift_step(s.to_param(), "mon-9", recent, str(champion), metrics, report)
    assert decision == "drift" and drifted >= 1
    parsed = json.loads(reasons)
    assert parsed[0]["check"] == "decision" and parsed[0]["drifted"] is True
    assert any(r["check"] == "feature_psi" and r["subject"] == "monthly_charges" and r["drifted"] for r in parsed)
    assert metrics.metadata["psi_monthly_charges"] >= s.monitoring.psi_alert
    assert metrics.metadata["drifted_features"] == drifted and metrics.metadata["decision"] == "drift"
    # The recent rows carry labels: the champion's performance on them is recorded with the drop's bound.
    assert 0.5 < metrics.metadata["champion_recent_roc_auc"] < 1 and "auc_drop_lower" in metrics.metadata
    assert metrics.metadata["retrain_policy"] == "always" and metrics.metadata["drift_decision"] == "drift"
    assert any(r["check"] == "performance_decay" and "champion ROC AUC" in r["message"] for r in parsed)
    html = Path(report.path).read_text()
    assert html.count("<svg") == len(NUMERIC_COLUMNS) + len(CATEGORICAL_COLUMNS) + 1  # features + scores
    assert "DRIFT" in html and "monthly_charges" in html and NOW.isoformat() in html
    assert not list(Path(report.path).parent.glob(".*"))  # written via a temp file, nothing left behind


def test_missing_columns_and_a_lost_reference_are_named(champion: Path, tmp_path: Path) -> None:
    s = _settings(tmp_path)
    recent = _recent_dir(tmp_path, 0.0, 12)
    frame = pd.read_parquet(recent).drop(columns=["region"])
    frame.to_parquet(recent / "part-0.parquet", index=False)
    with pytest.raises(DataValidationError, match=r"missing feature column\(s\) \['region'\] the champion was"):
        run_drift_check(s, recent, str(champion))
    broken = tmp_path / "broken"
    broken.mkdir()
    card = json.loads((champion / CARD_FILE).read_text())
    (broken / "model.joblib").write_bytes((champion / "model.joblib").read_bytes())
    card["lineage"]["train_uri"] = str(tmp_path / "gone")
    (broken / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ChampionError, match=r"its train split .*gone.* is gone"):
        run_drift_check(s, _recent_dir(tmp_path, 0.0, 13), str(broken))
    del card["lineage"]["train_uri"]
    (broken / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ChampionError, match="model_card.json has no lineage.train_uri"):
        run_drift_check(s, _recent_dir(tmp_path, 0.0, 14), str(broken))


def test_no_champion_means_drift(tmp_path: Path) -> None:
    check = run_drift_check(_settings(tmp_path), _recent_dir(tmp_path, 0.0, 15), None)
    assert check.report.decision == "drift" and check.report.reasons[0].check == "no_champion"


# --- launch_training -----------------------------------------------------------------------------------------


def test_training_run_id_derives_from_the_monitoring_run() -> None:
    assert training_run_id("ctloop-monitor-abc") == "ctloop-monitor-abc-retrain"
    odd = training_run_id("Monitor Run #1")
    assert odd == training_run_id("Monitor Run #1") and odd.startswith("ctloop-train-")


def test_local_launch_starts_one_detached_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spawned command records its argv and environment: the real launch path, a stand-in for the run."""
    s = _settings(tmp_path)
    script = tmp_path / "record.py"
    script.write_text("import json, os, sys\n"
                      "json.dump({'argv': sys.argv[1:], 'kfp_runtime': os.environ.get('_KFP_RUNTIME')},\n"
                      "          open(sys.argv[1], 'w'))\n")
    real_command = launch_module.local_command
    seen: list[list[str]] = []

    def recording_command(*args: object) -> list[str]:
        argv = real_command(*args)
        seen.append(argv)
        return [sys.executable, str(script), str(tmp_path / "ran.json"), *argv[1:]]

    monkeypatch.setattr(launch_module, "local_command", recording_command)
    monkeypatch.setenv("_KFP_RUNTIME", "true")  # as inside a component
    first = launch_training_run(s, run_id="mon-7", snapshot_time="2026-05-01T00:00:00Z", trigger_uri="gs://b/o#1")
    again = launch_training_run(s, run_id="mon-7", snapshot_time="2026-05-01T00:00:00Z", trigger_uri="gs://b/o#1")
    assert (first.created, again.created) == (True, False) and first.job_id == again.job_id == "mon-7-retrain"
    assert len(seen) == 1
    deadline = time.monotonic() + 20
    while not (tmp_path / "ran.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    ran = json.loads((tmp_path / "ran.json").read_text())
    assert ran["kfp_runtime"] is None  # the run can build pipelines
    assert ran["argv"][1:] == ["-m", "pipelines.cli", "--config", str(s.local.runs_dir / "mon-7-retrain" /
                                                                     "launch-settings.yaml"), "run", "--run-id",
                               "mon-7-retrain", "--trigger-uri", "gs://b/o#1", "--no-serve", "--snapshot-time",
                               "2026-05-01T00:00:00Z"]
    launched = load_settings(s.local.runs_dir / "mon-7-retrain" / "launch-settings.yaml")
    assert launched.local.workdir == str(tmp_path.resolve()) and launched.model == s.model
    # One "launch once" record: the launch ledger, the same one the trigger function keeps.
    [record] = Ledger(s.local.path(LAUNCH_LEDGER)).records()
    assert (record.job_id, record.status, record.trigger_uri) == ("mon-7-retrain", "launched", "gs://b/o#1")
    assert record.command == [sys.executable, str(script), str(tmp_path / "ran.json"), *ran["argv"][1:]]
    assert "_KFP_RUNTIME" not in launch_env()


JOBS = "/v1/projects/ctloop-dev/locations/europe-west4/pipelineJobs"


@pytest.fixture
def vertex(recording_server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> RecordingServer:
    from google.cloud.aiplatform import initializer
    from google.cloud.aiplatform.utils import gcs_utils

    for name, value in list(vars(initializer.global_config).items()):
        monkeypatch.setattr(initializer.global_config, name, value)
    monkeypatch.setattr(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist",
                        lambda output_artifacts_gcs_dir=None, **_: output_artifacts_gcs_dir)
    return recording_server


def test_cloud_launch_submits_the_training_pipeline_once(vertex: RecordingServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.compile import compile_pipeline
    from pipelines.training import training_pipeline

    # The released template (Artifact Registry in production; a compiled file here): the step compiles nothing.
    image = _settings(tmp_path).gcp.component_image
    template = compile_pipeline(training_pipeline, tmp_path / "released" / "training.yaml", image)
    s = _settings(tmp_path, backend="cloud", **{"monitoring.training_template": str(template)})
    monkeypatch.setenv("_KFP_RUNTIME", "true")  # as inside the component
    options = {"api_endpoint": vertex.url, "credentials": AnonymousCredentials(), "api_transport": "rest"}
    vertex.route("POST", JOBS, lambda r: (200, {"name": f"{JOBS[4:]}/{r.query['pipelineJobId'][0]}"}))
    launched = launch_training_run(s, run_id="ctloop-monitor-5d1f", snapshot_time="2026-05-01T00:00:00Z",
                                   trigger_uri="gs://b/o#3", client_options=options)
    assert launched.created and launched.job_id == "ctloop-monitor-5d1f-retrain"
    (req,) = vertex.find("POST", JOBS)
    assert req.query["pipelineJobId"] == ["ctloop-monitor-5d1f-retrain"]
    body = req.json
    assert body["displayName"] == "ctloop-training"
    assert body["pipelineSpec"]["pipelineInfo"]["name"] == "ctloop-training"
    executors = body["pipelineSpec"]["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {s.gcp.component_image}
    assert body["labels"] == {**s.labels, "trigger": "drift", "ctloop-monitor-run": "ctloop-monitor-5d1f"}
    params = body["runtimeConfig"]["parameterValues"]
    assert (params["run_id"], params["snapshot_time"], params["trigger_uri"]) == (
        "ctloop-monitor-5d1f-retrain", "2026-05-01T00:00:00Z", "gs://b/o#3")
    assert params["config"]["backend"] == "cloud"
    # The step retried: 409 means it was launched, and nothing new is created.
    name = f"{JOBS[4:]}/ctloop-monitor-5d1f-retrain"
    vertex.route("POST", JOBS, (409, {"error": {"code": 409, "message": "exists", "status": "ALREADY_EXISTS"}}))
    vertex.route("GET", f"/v1/{name}", (200, {"name": name}))
    again = launch_training_run(s, run_id="ctloop-monitor-5d1f", snapshot_time="2026-05-01T00:00:00Z",
                                trigger_uri="gs://b/o#3", client_options=options)
    assert not again.created and again.job_name == name


def test_cloud_launch_needs_the_released_training_template(vertex: RecordingServer, tmp_path: Path) -> None:
    s = _settings(tmp_path, backend="cloud")
    options = {"api_endpoint": vertex.url, "credentials": AnonymousCredentials(), "api_transport": "rest"}
    with pytest.raises(LaunchError, match=r"monitoring.training_template: required on the cloud backend"):
        launch_training_run(s, run_id="ctloop-monitor-5d1f", client_options=options)
    assert vertex.requests == []
