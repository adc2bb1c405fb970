"""History features online: the pure-Python definition against the Spark job's values, the online store, and
served/offline parity through the real prediction server (HTTP) on a real transform output and model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from components import transform as tr
from components.materialize import materialize
from ctloop.config import Settings
from ctloop.features import FeatureSpec
from ctloop.history import HistoryOrderError, HistoryState, features, fold_states, states_from_splits, to_micros
from ctloop.model_runtime import load_model
from ctloop.modeling import train_model
from ctloop.online_store import SQLiteStore
from ctloop.online_store_vertex import VertexFeatureStore
from ctloop.smoke import SMOKE_TOLERANCE, expect_offline_scores, run_smoke, smoke_instances
from serving.app import ServedModel, create_app
from serving.background import running_server
from tests.recording_server import RecordedRequest, RecordingServer
from tests.spark_fixtures import live_session, spark  # noqa: F401  (spark: a pytest fixture)
from tests.test_transform import _run_local, _settings, build_fixture, write_fixture

pytestmark = pytest.mark.spark


@dataclass
class Trained:
    settings: Settings
    spec: FeatureSpec
    dirs: dict[str, str]
    splits: dict[str, pd.DataFrame]
    model_dir: Path

    @property
    def all_rows(self) -> pd.DataFrame:
        frame = pd.concat([self.splits[s].assign(_split=s) for s in tr.SPLITS], ignore_index=True)
        return frame.sort_values([self.spec.id_column, self.spec.timestamp_column], kind="stable")

    def first_test_events(self) -> pd.DataFrame:
        test = self.splits["test"].sort_values([self.spec.id_column, self.spec.timestamp_column], kind="stable")
        return test.groupby(self.spec.id_column, sort=True).head(1).reset_index(drop=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("history")
    settings = _settings(**{"local.workdir": str(root / "work"), "model.params": {"max_iter": 40}})
    result = _run_local(settings, write_fixture(build_fixture(), root / "input"), root, live_session())
    dirs = {s: str(root / "task" / s) for s in tr.SPLITS}
    train_model(settings, dirs["train"], dirs["valid"], root / "model", run_id="history-1")
    return Trained(settings, result.spec, dirs, {s: pd.read_parquet(d) for s, d in dirs.items()}, root / "model")


def _same(a: Any, b: Any) -> bool:
    """Equal values, a missing value (None or NaN) equal only to a missing value; no tolerance."""
    a_missing = a is None or (isinstance(a, float) and math.isnan(a))
    b_missing = b is None or (isinstance(b, float) and math.isnan(b))
    return a_missing == b_missing and (a_missing or a == b)


def _mismatches(derived: dict[str, Any], row: pd.Series) -> dict[str, tuple[Any, Any]]:
    return {k: (v, row[k]) for k, v in derived.items() if not _same(v, row[k])}


def _us(ts: Any) -> int:
    return to_micros(pd.Timestamp(ts).to_pydatetime())


def test_features_equal_the_job_on_every_row(trained: Trained) -> None:
    """Folding each entity's rows in time order, the features of every row before it is folded in are the
    job's, value for value."""
    spec, means = trained.spec, trained.spec.history_means
    assert len(means) == 3 and spec.derived
    states: dict[str, HistoryState] = {}
    checked = 0
    for _, row in trained.all_rows.iterrows():
        entity, ts = row[spec.id_column], _us(row[spec.timestamp_column])
        state = states.get(entity)
        derived = features(state, ts, spec)
        assert list(derived) == spec.derived
        assert not _mismatches(derived, row), (entity, row[spec.timestamp_column], _mismatches(derived, row))
        values = {c: row[c] for c in means}
        states[entity] = HistoryState.first(ts, values, means) if state is None else state.then(ts, values)
        checked += 1
    assert checked == sum(len(f) for f in trained.splits.values()) > 1000
    # Means over nulls were exercised: some entity has a null total_charges among its earlier events.
    assert any(s.prior_counts["total_charges"] < s.events - 1 for s in states.values())


def test_store_before_the_test_cut_derives_each_first_test_event(trained: Trained, tmp_path: Path) -> None:
    spec = trained.spec
    store = SQLiteStore(tmp_path / "store.sqlite")
    entities, as_of = materialize(store, [trained.dirs["train"], trained.dirs["valid"]])
    assert entities == store.count() > 0
    assert as_of == trained.splits["valid"][spec.timestamp_column].max().isoformat().replace("+00:00", "Z")
    first = trained.first_test_events()
    stored = store.read(first[spec.id_column].tolist())
    unknown = 0
    for _, row in first.iterrows():
        found = stored.get(row[spec.id_column])
        unknown += found is None
        derived = features(found.state if found else None, _us(row[spec.timestamp_column]), spec)
        assert not _mismatches(derived, row), (row[spec.id_column], _mismatches(derived, row))
    assert 0 < unknown < len(first)  # both kinds: entities first seen in the test split, and known ones


def test_latest_event_replays_and_earlier_events_are_refused(trained: Trained) -> None:
    spec = trained.spec
    rows = trained.all_rows
    fold = fold_states(((r[spec.id_column], _us(r[spec.timestamp_column]), {c: r[c] for c in spec.history_means})
                        for _, r in rows.iterrows()), spec.history_means)
    latest = rows.groupby(spec.id_column).tail(1)
    for _, row in latest.iterrows():
        state = fold[row[spec.id_column]]
        assert not _mismatches(features(state, state.last_us, spec), row)
        assert HistoryState.from_json(state.to_json()) == state
    multi = next(s for s in fold.values() if s.events > 1)
    with pytest.raises(HistoryOrderError, match="before the entity's latest event"):
        features(multi, multi.last_us - 1, spec)


def test_materialize_reruns_write_the_same_rows(trained: Trained, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store.sqlite")
    dirs = list(trained.dirs.values())

    def dump() -> list[tuple[str, str, str]]:
        import sqlite3

        with sqlite3.connect(store.path) as conn:
            return conn.execute("SELECT * FROM history ORDER BY entity_id").fetchall()

    first = materialize(store, dirs)
    before = dump()
    assert materialize(store, dirs) == first
    assert dump() == before and len(before) == first[0] == trained.all_rows[trained.spec.id_column].nunique()


def _raw(row: pd.Series, spec: FeatureSpec) -> dict[str, Any]:
    inst = {c: (None if pd.isna(row[c]) else row[c].item() if hasattr(row[c], "item") else row[c])
            for c in [spec.id_column, *spec.numeric, *spec.categorical]}
    inst[spec.timestamp_column] = pd.Timestamp(row[spec.timestamp_column]).isoformat()
    return inst


def test_served_features_and_probabilities_equal_offline(trained: Trained, tmp_path: Path) -> None:
    """Held-out events sent raw (entity id, time, source features) through the real HTTP server: the derived
    features equal the job's and the probability equals offline predict_proba of the job's row."""
    spec = trained.spec
    store = SQLiteStore(tmp_path / "store.sqlite")
    materialize(store, [trained.dirs["train"], trained.dirs["valid"]])
    first = trained.first_test_events()
    offline = load_model(trained.model_dir).predict_proba(first[spec.model_features])
    instances = [_raw(row, spec) for _, row in first.iterrows()]
    app = create_app([ServedModel("dm-1", trained.model_dir)], online_store=store)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        batch = client.post("/predict", json={"instances": instances})
        assert batch.status_code == 200, batch.text
        predictions = batch.json()["predictions"]
        singles = [client.post("/predict", json={"instances": [inst]}).json()["predictions"][0]
                   for inst in instances[:25]]
    assert len(predictions) == len(first)
    for i, (_, row) in enumerate(first.iterrows()):
        looked_up = predictions[i]["onlineFeatures"]
        assert looked_up["entityId"] == row[spec.id_column]
        assert not _mismatches(looked_up["values"], row), (i, _mismatches(looked_up["values"], row))
        assert predictions[i]["probability"] == offline[i]
        assert looked_up["known"] == (looked_up["latestEventTime"] is not None)
        if looked_up["known"]:
            assert looked_up["asOf"].startswith(str(trained.splits["valid"][spec.timestamp_column].max().date()))
            assert looked_up["ageSeconds"] > 0
    assert [p["probability"] for p in singles] == list(offline[:25])


def test_served_from_the_vertex_feature_view_equals_offline(trained: Trained, tmp_path: Path,
                                                          recording_server: RecordingServer) -> None:
    """The cloud path: the server reads the states through FeatureOnlineStoreServiceClient (the real client,
    against the recording server standing in for the feature view) and derives the job's values."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform_v1 import FeatureOnlineStoreServiceClient

    spec = trained.spec
    states = states_from_splits([trained.dirs["train"], trained.dirs["valid"]], spec)
    view = "projects/p/locations/europe-west4/featureOnlineStores/ctloop/featureViews/entity_history"

    def fetch(q: RecordedRequest) -> tuple[int, Any]:
        state = states.get(q.json["dataKey"]["key"])
        if state is None:
            return 404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}
        return 200, {"keyValues": {"features": [{"name": "state", "value": {"stringValue": state.to_json()}},
                                                {"name": "as_of", "value": {"stringValue": "2025-01-01T00:00:00Z"}}]}}

    recording_server.route("POST", f"/v1/{view}:fetchFeatureValues", fetch)
    client = FeatureOnlineStoreServiceClient(transport="rest", credentials=AnonymousCredentials(),
                                             client_options={"api_endpoint": recording_server.url})
    store = VertexFeatureStore.for_view(view, serving_client=client)
    first = trained.first_test_events().head(40)
    offline = load_model(trained.model_dir).predict_proba(first[spec.model_features])
    app = create_app([ServedModel("dm-1", trained.model_dir)], online_store=store)
    with running_server(app) as url:
        answer = httpx.post(f"{url}/predict", json={"instances": [_raw(r, spec) for _, r in first.iterrows()]},
                            timeout=30)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    for i, (_, row) in enumerate(first.iterrows()):
        assert not _mismatches(predictions[i]["onlineFeatures"]["values"], row)
        assert predictions[i]["probability"] == offline[i]
    assert len(recording_server.find("POST", f"/v1/{view}:fetchFeatureValues")) == first[spec.id_column].nunique()


def test_unknown_entity_legacy_instances_and_bad_input(trained: Trained, tmp_path: Path) -> None:
    spec = trained.spec
    store = SQLiteStore(tmp_path / "store.sqlite")
    materialize(store, list(trained.dirs.values()))
    row = trained.first_test_events().iloc[0]
    raw = _raw(row, spec)
    full = {c: (None if pd.isna(row[c]) else row[c].item() if hasattr(row[c], "item") else row[c])
            for c in spec.model_features}
    app = create_app([ServedModel("dm-1", trained.model_dir)], online_store=store)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        def post(*instances: dict[str, Any]) -> httpx.Response:
            return client.post("/predict", json={"instances": list(instances)})

        new = {**raw, spec.id_column: "NEVER-SEEN"}
        del new[spec.timestamp_column]  # event time: now
        answer = post(new)
        assert answer.status_code == 200, answer.text
        looked_up = answer.json()["predictions"][0]["onlineFeatures"]
        assert looked_up["known"] is False and looked_up["asOf"] is None
        assert looked_up["values"] == features(None, 0, spec) == {
            "hist_prior_events": 0.0, "hist_days_since_prior": None, "hist_prior_mean_tenure_months": None,
            "hist_prior_mean_monthly_charges": None, "hist_prior_mean_total_charges": None}
        # Every model feature, history included: scored as sent, nothing looked up.
        legacy = post(full)
        assert legacy.status_code == 200, legacy.text
        assert "onlineFeatures" not in legacy.json()["predictions"][0]
        assert legacy.json()["predictions"][0]["probability"] == load_model(trained.model_dir).predict_proba(
            pd.DataFrame([full]))[0]

        def error(*instances: dict[str, Any]) -> str:
            r = post(*instances)
            assert r.status_code == 400, r.text
            return r.json()["error"]

        no_id = {k: v for k, v in raw.items() if k != spec.id_column}
        assert error(no_id).startswith("instances[0].customer_id: missing field(s) ['customer_id']")
        assert error(raw, {**raw, spec.timestamp_column: "yesterday"}).startswith(
            "instances[1].event_ts: expected an ISO 8601 time")
        assert error({**raw, spec.id_column: " "}).startswith("instances[0].customer_id: expected the entity id")
        early = {**raw, spec.timestamp_column: "2000-01-01T00:00:00Z"}
        known = store.read([raw[spec.id_column]])
        if known:  # the entity has events: one before them cannot be answered from its latest state
            assert "is before the entity's latest event" in error(early)
        partial = {**raw, "hist_prior_events": 1.0}
        assert error(partial).startswith("instances[0].")
    without_store = create_app([ServedModel("dm-2", trained.model_dir)])
    never_written = create_app([ServedModel("dm-3", trained.model_dir)],
                               online_store=SQLiteStore(tmp_path / "never" / "store.sqlite"))
    with running_server(without_store) as url, running_server(never_written) as url_empty:
        r = httpx.post(f"{url}/predict", json={"instances": [raw]}, timeout=30)
        assert r.status_code == 400 and "no online store" in r.json()["error"]
        # A store nothing was materialized into is an error, not every entity served as unknown.
        r = httpx.post(f"{url_empty}/predict", json={"instances": [raw]}, timeout=30)
        assert r.status_code == 503 and "no history states have been materialized" in r.json()["error"]
        assert httpx.post(f"{url_empty}/predict", json={"instances": [full]}, timeout=30).status_code == 200


def test_smoke_checks_served_against_offline_scores(trained: Trained, tmp_path: Path) -> None:
    """The deploy smoke test sends raw instances and compares with offline scoring; a store that does not
    hold the data's latest states makes it fail."""
    rows = smoke_instances(trained.settings, trained.dirs["test"], 12)
    assert len(rows) == 12 and all(not any(k.startswith("hist_") for k in r) for r in rows)
    assert {trained.spec.id_column, trained.spec.timestamp_column} <= rows[0].keys()
    expect_offline_scores(rows, trained.model_dir)
    assert rows.expected is not None and len(rows.expected) == 12

    def smoke(store: SQLiteStore) -> list[str]:
        app = create_app([ServedModel("dm-1", trained.model_dir)], online_store=store)
        with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            report = run_smoke(lambda inst: client.post("/predict", json={"instances": inst}).json()["predictions"],
                               rows, max_latency_ms=5000)
        return report.problems

    current = SQLiteStore(tmp_path / "current.sqlite")
    materialize(current, list(trained.dirs.values()))
    assert smoke(current) == []
    stale = SQLiteStore(tmp_path / "stale.sqlite")
    materialize(stale, [trained.dirs["train"]])  # misses the valid and test events: other history features
    problems = smoke(stale)
    assert any("offline scoring of the same row" in p for p in problems), problems
    assert SMOKE_TOLERANCE < 1e-3
