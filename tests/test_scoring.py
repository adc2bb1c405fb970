"""Batch scoring: the scores equal the model's predict_proba on training's own features, row for row; reruns
replace their own output; the compiled pipeline; the cloud requests with the real Google clients against the
local recording server."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from google.auth.credentials import AnonymousCredentials

from components.extract import run_extract
from components.score import (
    ScoringModel,
    _run_cloud,
    destination_dir,
    load_into_bigquery,
    load_statement,
    resolve_model,
    run_scoring,
)
from components.scoring_report import render_scoring_report
from components.transform import run_transform
from ctloop.config import Settings, load_settings
from ctloop.errors import CtloopError
from ctloop.model_runtime import load_model
from ctloop.modeling import train_model
from ctloop.registry import LocalRegistry
from devtools.sample_data import write_sample_data
from pipelines.compile import all_pipelines, compile_pipeline
from pipelines.scoring import scoring_pipeline
from pipelines.submit import submit_scoring
from tests.recording_server import RecordingServer
from tests.spark_fixtures import live_session, spark  # noqa: F401  (spark: a pytest fixture)

REPO = Path(__file__).resolve().parents[1]
AS_OF = "2026-11-20T00:00:00+00:00"
IMAGE = "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/component:1.0"

pytestmark = pytest.mark.spark


def _settings(workdir: Path) -> Settings:
    return load_settings(REPO / "ctloop.yaml", [f"local.workdir={workdir}", "data.min_rows=10"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The training path end to end without the runner: extract, transform (local Spark), train, register the
    model as champion; returns the settings, the extract and the transform outputs."""
    root = tmp_path_factory.mktemp("scoring")
    s = _settings(root / "work")
    write_sample_data(s.local.landing_dir, s, rows=4000, seed=11, end=AS_OF)
    extract = root / "extract"
    run_extract(s, run_id="train-1", output_path=str(extract), output_uri=str(extract), snapshot_time=AS_OF)
    splits = {name: root / "transform" / name for name in ("train", "valid", "test")}
    run_transform(s, run_id="train-1", input_path=str(extract), input_uri=str(extract),
                  **{f"{k}_path": str(v) for k, v in splits.items()},
                  **{f"{k}_uri": str(v) for k, v in splits.items()},
                  report_path=str(root / "transform" / "report.md"), spark=live_session())
    model_dir = root / "model"
    train_model(s, splits["train"], splits["valid"], model_dir, "train-1",
                {"train_uri": str(splits["train"]), "valid_uri": str(splits["valid"])})
    LocalRegistry(s.local.registry_db).register_version(s.model.display_name, str(model_dir), "train-1",
                                                        aliases=["champion"])
    return {"settings": s, "extract": extract, "splits": splits, "model_dir": model_dir, "root": root}


def _settings_out(trained: dict[str, Any], tmp: Path) -> Settings:
    """The trained settings with this test's own scores destination."""
    return trained["settings"].with_overrides({"scoring.output_dir": str(tmp / "out")})


def _score(trained: dict[str, Any], spark: Any, run_id: str, tmp: Path, version: str = "") -> Any:  # noqa: F811
    scores = tmp / run_id / "scores"
    return run_scoring(_settings_out(trained, tmp), run_id=run_id, input_path=str(trained["extract"]),
                       input_uri=str(trained["extract"]), scores_path=str(scores), scores_uri=str(scores),
                       model_version=version, snapshot_time=AS_OF, spark=spark)


def test_scores_equal_offline_predict_proba_on_trainings_features(trained: dict[str, Any], spark: Any,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    result = _score(trained, spark, "score-1", tmp_path)
    s = _settings_out(trained, tmp_path)
    out = pd.read_parquet(destination_dir(s, "score-1", "1"))
    # Offline: every row of the transform's three splits carries training's features; each entity's latest row
    # is what scoring at AS_OF sees (the extract window ends there).
    featured = pd.concat([pd.read_parquet(p) for p in trained["splits"].values()], ignore_index=True)
    latest = featured.sort_values("event_ts").groupby("customer_id", as_index=False).tail(1)
    model = load_model(trained["model_dir"])
    expected = pd.DataFrame({"customer_id": latest["customer_id"].astype(str),
                             "expected": model.predict_proba(latest), "event_ts": latest["event_ts"]})
    merged = out.merge(expected, on="customer_id", how="outer", indicator=True, suffixes=("", "_expected"))
    assert (merged["_merge"] == "both").all(), merged["_merge"].value_counts().to_dict()
    assert len(out) == out["customer_id"].nunique() == latest["customer_id"].nunique()
    assert (merged["event_ts"] == merged["event_ts_expected"]).all()
    np.testing.assert_array_equal(merged["probability"].to_numpy(), merged["expected"].to_numpy())
    assert (merged["label"] == (merged["expected"] >= model.threshold).astype(int)).all()
    assert set(out["model_version"]) == {"1"} and set(out["run_id"]) == {"score-1"}
    assert set(out["scored_at"]) == {pd.Timestamp(AS_OF).tz_localize(None)} or set(
        out["scored_at"].dt.tz_localize(None)) == {pd.Timestamp(AS_OF).tz_localize(None)}
    r = result.report
    assert r["scored_rows"] == len(out) and sum(r["histogram"]) == len(out)
    assert r["positives"] == int(out["label"].sum())
    ref = r["reference"]
    assert ref["uri"] == str(trained["splits"]["test"]) and ref["rows"] == len(pd.read_parquet(
        trained["splits"]["test"])) and sum(ref["histogram"]) == ref["rows"]


def test_rerun_replaces_its_own_output_and_another_run_adds_its_own(trained: dict[str, Any], spark: Any,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    s = _settings_out(trained, tmp_path)
    first = _score(trained, spark, "score-rerun", tmp_path)
    second = _score(trained, spark, "score-rerun", tmp_path)
    dest = destination_dir(s, "score-rerun", "1")
    assert first.destination == second.destination == str(dest)
    out = pd.read_parquet(dest)
    assert len(out) == out["customer_id"].nunique() == first.report["scored_rows"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model_version=1"]  # no staging copy left
    _score(trained, spark, "score-other", tmp_path, version="1")
    runs = sorted(p.name for p in dest.parent.parent.iterdir())
    assert runs == ["run_id=score-other", "run_id=score-rerun"]


def test_rows_without_labels_are_scored(trained: dict[str, Any], spark: Any, tmp_path: Path) -> None:  # noqa: F811
    """A table of rows to score need not know their outcome: no label column at all scores the same entities."""
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    frame = pd.read_parquet(trained["extract"])
    label = pd.to_numeric(frame["churned"], errors="coerce")
    frame[label.isin([0, 1])].drop(columns=["churned"]).to_parquet(unlabelled / "part-0.parquet", index=False)
    scores = tmp_path / "scores"
    result = run_scoring(_settings_out(trained, tmp_path), run_id="no-labels", input_path=str(unlabelled),
                         input_uri=str(unlabelled), scores_path=str(scores), scores_uri=str(scores),
                         snapshot_time=AS_OF, spark=spark)
    out = pd.read_parquet(result.destination)
    trained_entities = pd.concat([pd.read_parquet(p) for p in trained["splits"].values()])["customer_id"]
    assert len(out) == out["customer_id"].nunique() == trained_entities.nunique()
    assert out["probability"].between(0, 1).all()


def test_unknown_version_is_one_clear_error(trained: dict[str, Any]) -> None:
    with pytest.raises(CtloopError, match=r"model 'ctloop-churn' has no version '7'"):
        resolve_model(trained["settings"], "7")
    assert resolve_model(trained["settings"], "champion").version == "1"


def test_report_shows_counts_distributions_and_destination(trained: dict[str, Any]) -> None:
    meta = {"input_rows": 100, "scored_rows": 40, "positives": 7, "mean_probability": 0.2,
            "histogram": [10, 10, 10, 10, 0, 0, 0, 0, 0, 0], "model_version": "3", "model_uri": "/m",
            "destination": "/scores/run_id=r/model_version=3",
            "reference": {"uri": "/t/test", "rows": 20, "mean_probability": 0.25,
                          "histogram": [5, 5, 0, 0, 0, 0, 0, 10, 0, 0]}}
    page = render_scoring_report("r", meta)
    for text in ("scored entities</td><td>40", "input rows</td><td>100", "/scores/run_id=r/model_version=3",
                 "<td>0.0-0.1</td><td>10</td><td>0.2500</td><td>0.2500</td>", "<svg", "/t/test"):
        assert text in page


def test_compiled_scoring_pipeline(tmp_path: Path) -> None:
    assert all_pipelines()["scoring"] is scoring_pipeline
    path = compile_pipeline(scoring_pipeline, tmp_path / "scoring.yaml", IMAGE)
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"collect-scoring-rows", "score-batch"}
    assert tasks["score-batch"]["inputs"]["artifacts"]["rows"]["taskOutputArtifact"] == {
        "outputArtifactKey": "rows", "producerTask": "collect-scoring-rows"}
    assert all(t["cachingOptions"].get("enableCache", False) is False for t in tasks.values())
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "config", "run_id", "snapshot_time", "trigger_uri", "model_version", "input_uri"}
    # "score this": the landed batch reaches the step that collects the rows
    assert tasks["collect-scoring-rows"]["inputs"]["parameters"]["input_uri"] == {
        "componentInputParameter": "input_uri"}
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}


# ---- cloud requests ---------------------------------------------------------------------------------------

def _cloud_settings(tmp: Path) -> Settings:
    return load_settings(REPO / "ctloop.yaml", [f"local.workdir={tmp}", "backend=cloud"])


def test_submit_scoring_creates_one_pipeline_job_with_the_version(recording_server: RecordingServer,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    names = "projects/ctloop-dev/locations/europe-west4/pipelineJobs"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", recording_server.url)
    r = recording_server.route
    r("GET", r"/storage/v1/b/[^/]+", (404, {"error": {"code": 404, "message": "Not Found"}}))
    r("POST", r"/storage/v1/b", lambda q: (200, {"name": q.json["name"]}))
    r("GET", r"/storage/v1/b/[^/]+/iam", (200, {"bindings": [], "etag": "CAE="}))
    r("PUT", r"/storage/v1/b/[^/]+/iam", lambda q: (200, q.json))
    r("POST", f"/v1/{names}", lambda q: (200, {"name": f"{names}/{q.query['pipelineJobId'][0]}"}))
    result = submit_scoring(load_settings(REPO / "ctloop.yaml"), run_id="ctloop-score-daily-1",
                            snapshot_time=AS_OF, model_version="4",
                            client_options={"api_endpoint": recording_server.url,
                                            "credentials": AnonymousCredentials(), "api_transport": "rest"})
    assert result.created and result.job_id == "ctloop-score-daily-1"
    (req,) = recording_server.find("POST", f"/v1/{names}")
    body = req.json
    params = body["runtimeConfig"]["parameterValues"]
    assert params["model_version"] == "4" and params["snapshot_time"] == AS_OF
    assert params["input_uri"] == ""  # the scoring window of the settings, not a landed batch
    assert params["config"]["backend"] == "cloud" and params["config"]["scoring"]["bq_table"] == "scores"
    assert body["displayName"] == "ctloop-scoring"
    assert set(body["pipelineSpec"]["root"]["dag"]["tasks"]) == {"collect-scoring-rows", "score-batch"}


def test_cloud_scoring_runs_a_dataproc_batch_then_one_bigquery_job(recording_server: RecordingServer,
                                                                   tmp_path: Path) -> None:
    from google.cloud import bigquery, dataproc_v1, storage

    s = _cloud_settings(tmp_path)
    url = recording_server.url
    parent = "projects/ctloop-dev/locations/europe-west4"
    batch_type = "type.googleapis.com/google.cloud.dataproc.v1.Batch"
    r = recording_server.route
    r("POST", r"/upload/storage/v1/b/ctloop-dev-staging/o", lambda q: (200, {"name": "x", "bucket": "b"}))
    r("POST", f"/v1/{parent}/batches", lambda q: (200, {
        "name": "projects/ctloop-dev/regions/europe-west4/operations/op1", "done": True,
        "response": {"@type": batch_type, "name": f"{parent}/batches/{q.query['batchId'][0]}",
                     "state": "SUCCEEDED"}}))
    r("GET", f"/v1/{parent}/batches/[^/]+", lambda q: (200, {"name": q.path.removeprefix("/v1/"),
                                                            "state": "SUCCEEDED"}))
    r("POST", r"/bigquery/v2/projects/ctloop-dev/jobs", lambda q: (200, {
        "jobReference": q.json["jobReference"], "status": {"state": "DONE"},
        "configuration": q.json["configuration"]}))
    r("GET", r"/bigquery/v2/projects/ctloop-dev/queries/[^/]+", lambda q: (200, {
        "jobComplete": True, "totalRows": "0", "schema": {"fields": []},
        "jobReference": {"projectId": "ctloop-dev", "jobId": q.path.rsplit("/", 1)[-1]}}))
    # The batch writes its report next to the scores; here the "mount" is a local folder.
    scores_dir = tmp_path / "task" / "scores"
    scores_dir.parent.mkdir(parents=True)
    (scores_dir.parent / "score_report.json").write_text(json.dumps({"scored_rows": 5}))

    def argv(input_: str, scores: str, report: str, model_dir: str) -> list[str]:
        return ["--input", input_, "--scores-out", scores, "--report-out", report, "--model-dir", model_dir]

    batch_client = dataproc_v1.BatchControllerClient(
        transport="rest", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})
    storage_client = storage.Client(project="ctloop-dev", credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": url})
    model = ScoringModel("4", "gs://ctloop-dev-models/churn/4")
    name, report = _run_cloud(s, argv, "ctloop-score-daily-1", "gs://root/run/rows", scores_dir,
                              "gs://root/run/score-batch/scores", model, batch_client, storage_client,
                              poll_seconds=0.01, timeout_seconds=30)
    assert report == {"scored_rows": 5} and name.endswith("/batches/" + name.rsplit("/", 1)[-1])
    (create,) = recording_server.find("POST", f"/v1/{parent}/batches")
    batch_id = create.query["batchId"][0]
    assert batch_id.startswith("score-ctloop-score-daily-1-")
    body = create.json
    args = body["pysparkBatch"]["args"]
    assert body["pysparkBatch"]["mainPythonFileUri"].startswith("gs://ctloop-dev-staging/ctloop/spark/")
    assert body["pysparkBatch"]["mainPythonFileUri"].endswith("/score_job.py")
    assert args[args.index("--model-dir") + 1] == "gs://ctloop-dev-models/churn/4"
    assert args[args.index("--report-out") + 1] == "gs://root/run/score-batch/score_report.json"
    assert body["labels"]["ctloop-step"] == "score"
    # The scoring image (a Dataproc custom container without Spark) on the pinned runtime, not the component image.
    assert body["runtimeConfig"]["containerImage"] == s.gcp.scoring_image != s.gcp.component_image
    assert body["runtimeConfig"]["version"] == s.gcp.dataproc_runtime_version

    bq = bigquery.Client(project="ctloop-dev", credentials=AnonymousCredentials(),
                         client_options={"api_endpoint": url})
    table = load_into_bigquery(s, run_id="ctloop-score-daily-1", version="4",
                               scores_uri="gs://root/run/score-batch/scores", client=bq)
    assert table == "ctloop-dev.ctloop.scores"
    (job,) = recording_server.find("POST", r"/bigquery/v2/projects/ctloop-dev/jobs")
    query = job.json["configuration"]["query"]["query"]
    assert query == load_statement(s, run_id="ctloop-score-daily-1", version="4",
                                   scores_uri="gs://root/run/score-batch/scores")
    assert "DELETE FROM `ctloop-dev.ctloop.scores` WHERE run_id = 'ctloop-score-daily-1' AND model_version = '4'" \
        in query
    assert "uris = ['gs://root/run/score-batch/scores/*.parquet']" in query
    assert job.json["jobReference"]["jobId"].startswith("ctloop_score_ctloop-score-daily-1-v4_")
    assert job.json["configuration"]["labels"]["ctloop-step"] == "score"
    # A retried step sends the same job id: BigQuery answers 409 and the step waits on that job.
    recording_server.route("POST", r"/bigquery/v2/projects/ctloop-dev/jobs", (409, {
        "error": {"code": 409, "message": "Already Exists", "status": "ALREADY_EXISTS"}}))
    recording_server.route("GET", r"/bigquery/v2/projects/ctloop-dev/jobs/[^/]+", lambda q: (200, {
        "jobReference": {"projectId": "ctloop-dev", "jobId": q.path.rsplit("/", 1)[-1],
                         "location": "europe-west4"}, "status": {"state": "DONE"}}))
    load_into_bigquery(s, run_id="ctloop-score-daily-1", version="4",
                       scores_uri="gs://root/run/score-batch/scores", client=bq)
    ids = {q.json["jobReference"]["jobId"] for q in recording_server.find("POST", r"/bigquery/v2/.*/jobs")}
    assert len(ids) == 1


def test_scoring_time_is_utc_and_defaults_to_now() -> None:
    from components.score import scoring_time

    assert scoring_time("2026-11-20T01:00:00+01:00") == datetime(2026, 11, 20, tzinfo=UTC)
    assert abs((scoring_time("") - datetime.now(UTC)).total_seconds()) < 5


# ---- "score this": a landed batch --------------------------------------------------------------------------

def _land_batch(trained: dict[str, Any], folder: Path, entities: int = 40) -> pd.DataFrame:
    """Every extracted row of the first ``entities`` customers, landed as two data files plus a marker, a Spark
    temporary and a hidden file (which the run must leave out)."""
    frame = pd.read_parquet(trained["extract"])
    chosen = sorted(frame["customer_id"].dropna().astype(str).unique())[:entities]
    rows = frame[frame["customer_id"].astype(str).isin(chosen)].reset_index(drop=True)
    (folder / "_temporary").mkdir(parents=True)
    half = len(rows) // 2
    rows.iloc[:half].to_parquet(folder / "part-0.parquet", index=False)
    rows.iloc[half:].to_parquet(folder / "part-1.parquet", index=False)
    rows.iloc[:5].to_parquet(folder / "_temporary" / "part-9.parquet", index=False)
    rows.iloc[:5].to_parquet(folder / ".part-8.parquet", index=False)
    (folder / "_SUCCESS").write_bytes(b"")
    return rows


def test_a_landed_batch_is_scored_as_the_window_scores_its_entities(trained: dict[str, Any], spark: Any,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    """A batch holding every row of some entities gets, for those entities, exactly the scores the scheduled run
    over the whole window gives them: the same job, the same features, the same model."""
    from components.score import collect_batch

    rows = _land_batch(trained, tmp_path / "landing" / "scoring" / "2026-11-20")
    s = _settings_out(trained, tmp_path)
    collected = tmp_path / "run" / "rows"
    batch = collect_batch(s, input_uri=str(tmp_path / "landing" / "scoring" / "2026-11-20"),
                          output_path=str(collected), output_uri=str(collected))
    assert batch.rows == len(rows) and batch.files == ["part-00000.parquet", "part-00001.parquet"]
    scores = tmp_path / "run" / "scores"
    result = run_scoring(s, run_id="score-batch-1", input_path=str(collected), input_uri=str(collected),
                         scores_path=str(scores), scores_uri=str(scores), snapshot_time=AS_OF, spark=spark)
    window = _score(trained, spark, "score-window-1", tmp_path)
    by_batch = pd.read_parquet(result.destination).set_index("customer_id").sort_index()
    by_window = pd.read_parquet(window.destination).set_index("customer_id").loc[by_batch.index]
    assert len(by_batch) == rows["customer_id"].nunique() == 40
    np.testing.assert_array_equal(by_batch["probability"].to_numpy(), by_window["probability"].to_numpy())
    assert (by_batch["event_ts"] == by_window["event_ts"]).all()
    assert result.report["input_rows"] == len(rows)


def test_collect_batch_refuses_what_it_cannot_score(trained: dict[str, Any], tmp_path: Path) -> None:
    from components.score import collect_batch

    s = trained["settings"]
    out = str(tmp_path / "rows")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_SUCCESS").write_bytes(b"")
    for uri, message in ((str(tmp_path / "missing"), "no such folder or file"),
                         (str(empty), "expected Parquet data files"),
                         ("gs://landing/scoring/b1/", "the local backend reads a local folder")):
        with pytest.raises(CtloopError, match=message):
            collect_batch(s, input_uri=uri, output_path=out, output_uri=out)
    assert not (tmp_path / "rows").exists()  # nothing half-written


def test_cloud_collect_batch_copies_the_data_files_server_side(recording_server: RecordingServer,
                                                              tmp_path: Path) -> None:
    """The real storage client against the recording server: list the batch, rewrite each data file into the
    step's output (markers, temporaries and hidden files left out), count rows from the copies' footers."""
    from google.cloud import storage

    from components.score import collect_batch

    s = _cloud_settings(tmp_path)
    src = "scoring/2026-11-20/"
    landed = ["part-0.parquet", "part-1.parquet", "_SUCCESS", "_temporary/0/part-9.parquet", ".part-2.parquet"]
    dst_prefix = "runs/r1/collect-scoring-rows/rows"
    mount = tmp_path / "gcs" / "rows"  # what the task's /gcs/ mount shows of the output after the copies
    mount.mkdir(parents=True)
    for i, rows in enumerate((3, 4)):
        pd.DataFrame({"customer_id": [f"c{i}{n}" for n in range(rows)]}).to_parquet(
            mount / f"part-{i:05d}.parquet", index=False)
    r = recording_server.route
    r("GET", r"/storage/v1/b/ctloop-dev-landing/o", (200, {"items": [
        {"name": src + n, "bucket": "ctloop-dev-landing", "generation": "7", "size": "10"} for n in landed]}))
    r("POST", r"/storage/v1/b/ctloop-dev-landing/o/.+/rewriteTo/b/ctloop-dev-pipeline-root/o/.+", lambda q: (200, {
        "kind": "storage#rewriteResponse", "done": True, "totalBytesRewritten": "10", "objectSize": "10",
        "resource": {"name": q.path.rsplit("/o/", 1)[1], "bucket": "ctloop-dev-pipeline-root"}}))
    r("GET", r"/storage/v1/b/ctloop-dev-pipeline-root/o", (200, {"items": [
        {"name": f"{dst_prefix}/part-{i:05d}.parquet", "size": "10", "crc32c": "AAAAAA=="} for i in range(2)]}))
    client = storage.Client(project="ctloop-dev", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": recording_server.url})
    batch = collect_batch(s, input_uri=f"gs://ctloop-dev-landing/{src}", output_path=str(mount),
                          output_uri=f"gs://ctloop-dev-pipeline-root/{dst_prefix}", storage_client=client)
    assert batch.rows == 7 and batch.files == ["part-00000.parquet", "part-00001.parquet"]
    (listing,) = recording_server.find("GET", r"/storage/v1/b/ctloop-dev-landing/o")
    assert listing.query["prefix"] == [src]
    copies = recording_server.find("POST", r"/storage/v1/b/.+/rewriteTo/.+")
    from urllib.parse import unquote

    assert [tuple(unquote(p) for p in re.match(r"/storage/v1/b/[^/]+/o/(.+)/rewriteTo/b/[^/]+/o/(.+)", q.path)
                  .groups()) for q in copies] == [
        (src + "part-0.parquet", f"{dst_prefix}/part-00000.parquet"),
        (src + "part-1.parquet", f"{dst_prefix}/part-00001.parquet")]
    with pytest.raises(CtloopError, match="must be gs://"):
        collect_batch(s, input_uri="/local/folder", output_path=str(mount), output_uri="gs://b/x")


def test_ctloop_score_over_a_landed_batch_runs_the_pipeline_locally(trained: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    """The pipeline under the KFP local runner with ``input_uri``: the collect step copies the batch, the score
    step scores exactly its entities (what the local trigger's score command runs)."""
    from pipelines.scoring import run_scoring_local

    folder = tmp_path / "landing" / "scoring" / "b1"
    rows = _land_batch(trained, folder, entities=25)
    s = _settings_out(trained, tmp_path)
    lines: list[str] = []
    code, record = run_scoring_local(s, run_id="ctloop-score-b1", snapshot_time=AS_OF, input_uri=str(folder),
                                     trigger_uri="gs://landing/scoring/b1/_SUCCESS#1", echo=lines.append)
    assert code == 0, "\n".join(lines)
    collected = record.artifact("collect-scoring-rows", "rows")["metadata"]
    assert collected["source"] == str(folder) and collected["row_count"] == len(rows) and collected["files"] == 2
    scored = record.artifact("score-batch", "scores")["metadata"]
    assert scored["scored_rows"] == 25 and scored["input_rows"] == len(rows)
    out = pd.read_parquet(destination_dir(s, "ctloop-score-b1", "1"))
    assert sorted(out["customer_id"]) == sorted(rows["customer_id"].astype(str).unique())
