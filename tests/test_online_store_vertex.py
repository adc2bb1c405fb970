"""The cloud online store with the real Google clients against the recording server: the BigQuery load that
replaces the table, the feature view sync and its wait, and online serving's fetch_feature_values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials

from ctloop.config import Settings
from ctloop.history import HistoryState
from ctloop.online_store import FEATURE_VIEW_ENV, OnlineStoreUnavailable
from ctloop.online_store_vertex import FeatureViewSyncError, VertexFeatureStore
from ctloop.online_stores import online_store_environment, open_online_store
from tests.recording_server import RecordedRequest, RecordingServer

VIEW = "projects/ctloop-dev/locations/europe-west4/featureOnlineStores/ctloop/featureViews/entity_history"
SYNC = f"{VIEW}/featureViewSyncs/1733"
JOBS = r"/bigquery/v2/projects/ctloop-dev/jobs(/[^/]+)?"
AS_OF = "2025-12-31T23:00:00Z"
STATES = {
    "c1": HistoryState.first(1_700_000_000_000_000, {"tenure_months": 3.0, "monthly_charges": None},
                             ["tenure_months", "monthly_charges"]).then(1_700_086_400_000_000,
                                                                         {"tenure_months": 4.0,
                                                                          "monthly_charges": 20.5}),
    "c2": HistoryState.first(1_700_000_000_000_001, {"tenure_months": 7.0, "monthly_charges": 0.1},
                             ["tenure_months", "monthly_charges"]),
}


def _settings(tmp_path: Path) -> Settings:
    return Settings().with_overrides({"backend": "cloud", "local.workdir": str(tmp_path / "work"),
                                      "online_features.sync_poll_seconds": 0.01,
                                      "online_features.sync_timeout_seconds": 2})


def _store(settings: Settings, url: str) -> VertexFeatureStore:
    from google.cloud import bigquery
    from google.cloud.aiplatform_v1 import FeatureOnlineStoreAdminServiceClient, FeatureOnlineStoreServiceClient

    options = {"api_endpoint": url}
    creds = AnonymousCredentials()
    return VertexFeatureStore.from_settings(
        settings,
        bq_client=bigquery.Client(project="ctloop-dev", credentials=creds, client_options=options),
        admin_client=FeatureOnlineStoreAdminServiceClient(transport="rest", credentials=creds,
                                                          client_options=options),
        serving_client=FeatureOnlineStoreServiceClient(transport="rest", credentials=creds, client_options=options))


def _load_job_routes(server: RecordingServer) -> None:
    def job(q: RecordedRequest) -> tuple[int, Any]:
        ref = {"projectId": "ctloop-dev", "jobId": q.path.rsplit("/", 1)[-1], "location": "europe-west4"}
        if q.method == "POST":
            ref = json.loads(_parts(q)[0])["jobReference"]
        return 200, {"jobReference": ref, "status": {"state": "DONE"}}

    server.route("POST", r"/upload" + JOBS, job)
    server.route("GET", JOBS, job)


def _parts(q: RecordedRequest) -> list[str]:
    """The multipart upload's parts: the job resource, then the data."""
    boundary = q.headers["content-type"].split("boundary=")[1].strip('"')
    chunks = q.body.decode().split("--" + boundary)
    return [c.split("\r\n\r\n", 1)[1].rstrip("\r\n") for c in chunks[1:-1]]


def _sync_routes(server: RecordingServer, final: dict[str, Any] | None = None, polls_until_done: int = 2) -> None:
    server.route("POST", f"/v1/{VIEW}:sync", {"featureViewSync": SYNC})
    seen: list[int] = []

    def get(_q: RecordedRequest) -> tuple[int, Any]:
        seen.append(1)
        body: dict[str, Any] = {"name": SYNC, "createTime": "2025-12-31T23:01:00Z"}
        if len(seen) >= polls_until_done:
            body |= {"runTime": {"startTime": "2025-12-31T23:01:00Z", "endTime": "2025-12-31T23:03:00Z"},
                     "finalStatus": final or {}}
        return 200, body

    server.route("GET", f"/v1/{SYNC}", get)


def test_write_replaces_the_table_then_syncs_the_view_and_waits(recording_server: RecordingServer,
                                                                tmp_path: Path) -> None:
    s = _settings(tmp_path)
    store = _store(s, recording_server.url)
    _load_job_routes(recording_server)
    _sync_routes(recording_server)
    assert store.write(STATES, AS_OF) == 2
    (load,) = recording_server.find("POST", r"/upload" + JOBS)
    assert load.query["uploadType"] == ["multipart"]
    job, data = _parts(load)
    config = json.loads(job)["configuration"]
    assert config["labels"] == s.labels
    assert config["load"]["writeDisposition"] == "WRITE_TRUNCATE"  # a rerun replaces, never appends
    assert config["load"]["sourceFormat"] == "NEWLINE_DELIMITED_JSON"
    assert config["load"]["destinationTable"] == {"projectId": "ctloop-dev", "datasetId": "ctloop",
                                                  "tableId": "entity_history"}
    assert [f["name"] for f in config["load"]["schema"]["fields"]] == ["entity_id", "state", "as_of",
                                                                       "feature_timestamp"]
    rows = [json.loads(line) for line in data.splitlines()]
    assert {r["entity_id"]: HistoryState.from_json(r["state"]) for r in rows} == STATES
    assert {r["as_of"] for r in rows} == {r["feature_timestamp"] for r in rows} == {AS_OF}
    # The sync starts after the load and is polled until its run has ended.
    paths = [q.path for q in recording_server.requests]
    assert paths.index(f"/v1/{VIEW}:sync") > paths.index(load.path)
    assert len(recording_server.find("GET", f"/v1/{SYNC}")) == 2


def test_a_failed_or_endless_sync_is_a_clear_error(recording_server: RecordingServer, tmp_path: Path) -> None:
    store = _store(_settings(tmp_path), recording_server.url)
    _load_job_routes(recording_server)
    _sync_routes(recording_server, final={"code": 9, "message": "source table has no entity_id column"})
    with pytest.raises(FeatureViewSyncError, match="failed: source table has no entity_id column"):
        store.write(STATES, AS_OF)
    _sync_routes(recording_server, polls_until_done=10**6)
    with pytest.raises(FeatureViewSyncError, match="did not finish within 2 s"):
        store.sync()


def test_read_fetches_each_entity_from_the_view(recording_server: RecordingServer, tmp_path: Path) -> None:
    store = VertexFeatureStore.for_view(VIEW, serving_client=_store(_settings(tmp_path),
                                                                     recording_server.url).serving)
    assert store.view == VIEW

    def fetch(q: RecordedRequest) -> tuple[int, Any]:
        key = q.json["dataKey"]["key"]
        if key not in STATES:
            return 404, {"error": {"code": 404, "message": f"key {key} not found", "status": "NOT_FOUND"}}
        return 200, {"keyValues": {"features": [
            {"name": "state", "value": {"stringValue": STATES[key].to_json()}},
            {"name": "as_of", "value": {"stringValue": AS_OF}},
            {"name": "feature_timestamp", "value": {"int64Value": "1767222000000000"}}]}}

    recording_server.route("POST", f"/v1/{VIEW}:fetchFeatureValues", fetch)
    found = store.read(["c1", "c2", "c1", "nobody"])
    assert {e: f.state for e, f in found.items()} == STATES
    assert {f.as_of for f in found.values()} == {AS_OF}
    calls = recording_server.find("POST", f"/v1/{VIEW}:fetchFeatureValues")  # the view is in the path
    assert sorted(q.json["dataKey"]["key"] for q in calls) == ["c1", "c2", "nobody"]  # each entity once


def test_a_failing_fetch_makes_the_store_unavailable(recording_server: RecordingServer, tmp_path: Path) -> None:
    store = VertexFeatureStore.for_view(VIEW, serving_client=_store(_settings(tmp_path),
                                                                     recording_server.url).serving)
    recording_server.route("POST", f"/v1/{VIEW}:fetchFeatureValues", (403, {
        "error": {"code": 403, "message": "Permission 'aiplatform.featureViews.fetchFeatureValues' denied",
                  "status": "PERMISSION_DENIED"}}))
    with pytest.raises(OnlineStoreUnavailable, match="fetch_feature_values for entity 'c1' failed: Forbidden: 403"):
        store.read(["c1"])


def test_a_transient_fetch_failure_is_retried(recording_server: RecordingServer, tmp_path: Path) -> None:
    store = VertexFeatureStore.for_view(VIEW, serving_client=_store(_settings(tmp_path),
                                                                     recording_server.url).serving)
    answers = [(503, {"error": {"code": 503, "message": "try again", "status": "UNAVAILABLE"}}),
               (200, {"keyValues": {"features": [{"name": "state", "value": {"stringValue": STATES["c2"].to_json()}},
                                                 {"name": "as_of", "value": {"stringValue": AS_OF}}]}})]
    recording_server.route("POST", f"/v1/{VIEW}:fetchFeatureValues", lambda _q: answers.pop(0))
    assert store.read(["c2"])["c2"].state == STATES["c2"]
    assert len(recording_server.find("POST", f"/v1/{VIEW}:fetchFeatureValues")) == 2


def test_settings_choose_the_backend_and_the_serving_variable(tmp_path: Path) -> None:
    local = Settings().with_overrides({"local.workdir": str(tmp_path)})
    assert open_online_store(local).description == f"sqlite:{tmp_path / 'online_store.sqlite'}"
    assert online_store_environment(local) == {}
    cloud = _settings(tmp_path)
    assert open_online_store(cloud).description == f"vertex:{VIEW}"
    assert online_store_environment(cloud) == {FEATURE_VIEW_ENV: VIEW}
    with pytest.raises(ValueError, match="expected projects/P/locations/L/featureOnlineStores/S/featureViews/V"):
        VertexFeatureStore.for_view("projects/p/featureViews/v")
