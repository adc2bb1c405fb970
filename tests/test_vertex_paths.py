"""The cloud paths of lookup, register and deploy: the real aiplatform client (REST transport) against the
local recording server, asserting on the exact requests.

The canned answers keep a little state (models, versions, aliases, endpoints, deployed models) so a whole
register -> deploy flow can run; ``:predict`` is answered by the real prediction server serving the uploaded
model, so the smoke test sees genuine predictions (or genuine failures).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform

from components.deploy import run_deploy
from components.lookup import find_champion, run_lookup_step
from components.register import run_register, version_aliases
from ctloop.canary import run_canary
from ctloop.config import Settings
from ctloop.prediction_log import DEPLOYED_MODEL_ID, ERROR, LATENCY_MS, PROBABILITY, REQUEST_ID
from ctloop.registry import open_registry
from ctloop.rollout import ChampionMoved
from ctloop.smoke import SmokeTestFailed
from ctloop.vertex import label_value, resource_id, run_alias
from devtools.emulators import start_fake_gcs
from serving.app import ServedModel, create_app
from serving.background import running_server
from serving.model import fetch_model_dir
from tests.recording_server import RecordedRequest, RecordingServer
from tests.serving_fixtures import make_constant_model_dir, make_model_dir, synthetic_frame, write_split_dir

PROJECT, REGION = "ctloop-test", "europe-west4"
P = f"projects/{PROJECT}/locations/{REGION}"
IMAGE = "europe-west4-docker.pkg.dev/ctloop-test/ctloop/serving:1.2.3"
# The serving container reads the entities' history states from this view (ctloop/online_store_vertex.py).
FEATURE_VIEW = f"{P}/featureOnlineStores/ctloop/featureViews/entity_history"
MODEL_BUCKET = "ctloop-test-models"
STAGING_BUCKET = "ctloop-test-staging"
TIME = "2026-01-01T00:00:{:02d}Z"


@dataclass
class FakeVertex:
    """Canned Vertex AI answers that remember what was created."""

    server: RecordingServer
    model_root: Path  # where the registered versions' files are downloaded to, for :predict
    versions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # model id -> versions
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    servers: dict[str, Any] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1001))
    clock: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def install(self) -> None:
        r = self.server.route
        r("GET", rf"/v1/{P}/models", self.list_models)
        r("POST", rf"/v1/{P}/models:upload", self.upload)
        r("GET", rf"/v1/{P}/models/([^/:]+)", self.get_model)
        r("POST", rf"/v1/{P}/models/([^/:]+):mergeVersionAliases", self.merge_aliases)
        r("GET", rf"/v1/{P}/endpoints", self.list_endpoints)
        r("POST", rf"/v1/{P}/endpoints", self.create_endpoint)
        r("GET", rf"/v1/{P}/endpoints/([^/:]+)", self.get_endpoint)
        r("PATCH", rf"/v1/{P}/endpoints/([^/:]+)", self.patch_endpoint)
        r("POST", rf"/v1/{P}/endpoints/([^/:]+):deployModel", self.deploy)
        r("POST", rf"/v1/{P}/endpoints/([^/:]+):undeployModel", self.undeploy)
        r("POST", rf"/v1/{P}/endpoints/([^/:]+):predict", self.predict)

    # -- helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def _last(req: RecordedRequest) -> str:
        return req.path.rsplit("/", 1)[-1].split(":")[0]

    @staticmethod
    def _display_filter(req: RecordedRequest) -> str | None:
        m = re.fullmatch(r'display_name="(.*)"', req.query.get("filter", [""])[0])
        return m.group(1) if m else None

    @staticmethod
    def _lro(type_name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        kind = f"type.googleapis.com/google.cloud.aiplatform.v1.{type_name}"
        return 200, {"name": f"{P}/operations/1", "done": True, "response": {"@type": kind, **body}}

    def _find_version(self, model_id: str, ref: str) -> dict[str, Any] | None:
        for v in self.versions.get(model_id, []):
            if v["versionId"] == ref or ref in v["versionAliases"]:
                return v
        return None

    def add_version(self, model_id: str, display_name: str, artifact_uri: str, aliases: list[str]) -> dict:
        versions = self.versions.setdefault(model_id, [])
        for alias in aliases:  # an alias lives on one version only
            for v in versions:
                if alias in v["versionAliases"]:
                    raise AssertionError(f"alias {alias} already on version {v['versionId']}")
        if not versions and "default" not in aliases:
            aliases = [*aliases, "default"]
        version = {"name": f"{P}/models/{model_id}", "displayName": display_name,
                   "versionId": str(len(versions) + 1), "versionAliases": list(aliases),
                   "artifactUri": artifact_uri, "createTime": TIME.format(next(self.clock)),
                   "supportedDeploymentResourcesTypes": ["DEDICATED_RESOURCES"]}
        versions.append(version)
        return version

    # -- models ----------------------------------------------------------------------------------------
    def list_models(self, req: RecordedRequest) -> tuple[int, dict]:
        name = self._display_filter(req)
        found = [self._find_version(mid, "default") for mid, vs in self.versions.items()
                 if vs and vs[0]["displayName"] == name]
        return 200, {"models": found} if found else {}

    def upload(self, req: RecordedRequest) -> tuple[int, dict]:
        body = req.json
        spec = body["model"]
        if "parentModel" in body:
            model_id = body["parentModel"].rsplit("/", 1)[-1]
        else:
            model_id = body.get("modelId") or str(next(self.ids))
            if model_id in self.versions:
                return 409, {"error": {"code": 409, "message": "model exists", "status": "ALREADY_EXISTS"}}
        version = self.add_version(model_id, spec["displayName"], spec["artifactUri"],
                                   spec.get("versionAliases", []))
        return self._lro("UploadModelResponse", {"model": f"{P}/models/{model_id}",
                                                 "modelVersionId": version["versionId"]})

    def get_model(self, req: RecordedRequest) -> tuple[int, dict]:
        model_id, _, ref = self._last(req).partition("@")
        version = self._find_version(model_id, ref or "default")
        if version is None:
            return 404, {"error": {"code": 404, "message": f"{req.path} not found", "status": "NOT_FOUND"}}
        return 200, version

    def merge_aliases(self, req: RecordedRequest) -> tuple[int, dict]:
        model_id, _, ref = self._last(req).partition("@")
        version = self._find_version(model_id, ref)
        for alias in req.json["versionAliases"]:
            if alias.startswith("-"):
                version["versionAliases"].remove(alias[1:])
            else:
                self.set_alias(model_id, alias, version["versionId"])
        return 200, version

    def set_alias(self, model_id: str, alias: str, version_id: str) -> None:
        """Vertex moves an alias that another version holds: "applying an existing alias that is used by
        another model version removes it from that version" (Model Registry docs, model-alias)."""
        for v in self.versions[model_id]:
            if alias in v["versionAliases"]:
                v["versionAliases"].remove(alias)
        self._find_version(model_id, version_id)["versionAliases"].append(alias)

    # -- endpoints -------------------------------------------------------------------------------------
    def list_endpoints(self, req: RecordedRequest) -> tuple[int, dict]:
        name = self._display_filter(req)
        found = [e for e in self.endpoints.values() if e["displayName"] == name]
        return 200, {"endpoints": found} if found else {}

    def create_endpoint(self, req: RecordedRequest) -> tuple[int, dict]:
        endpoint_id = req.query["endpointId"][0]
        if endpoint_id in self.endpoints:
            return 409, {"error": {"code": 409, "message": "exists", "status": "ALREADY_EXISTS"}}
        self.endpoints[endpoint_id] = {"name": f"{P}/endpoints/{endpoint_id}", **req.json,
                                       "createTime": TIME.format(next(self.clock)), "deployedModels": [],
                                       "trafficSplit": {}}
        return self._lro("Endpoint", self.endpoints[endpoint_id])

    def get_endpoint(self, req: RecordedRequest) -> tuple[int, dict]:
        endpoint = self.endpoints.get(self._last(req))
        if endpoint is None:
            return 404, {"error": {"code": 404, "message": "no such endpoint", "status": "NOT_FOUND"}}
        return 200, endpoint

    def patch_endpoint(self, req: RecordedRequest) -> tuple[int, dict]:
        endpoint = self.endpoints[self._last(req)]
        for path in req.query["updateMask"][0].split(","):
            if path == "trafficSplit":
                endpoint["trafficSplit"] = {k: v for k, v in req.json["trafficSplit"].items() if v}
            else:
                endpoint[path] = req.json[path]
        return 200, endpoint

    def deploy(self, req: RecordedRequest) -> tuple[int, dict]:
        endpoint = self.endpoints[self._last(req)]
        spec = req.json["deployedModel"]
        deployed_id = str(next(self.ids))
        model_id, _, version = spec["model"].rsplit("/", 1)[-1].partition("@")
        # Vertex answers with the project number, not the id, in model names.
        endpoint["deployedModels"].append({"id": deployed_id, "model": f"projects/123456/locations/{REGION}/"
                                           f"models/{model_id}", "modelVersionId": version,
                                           "displayName": spec.get("displayName", ""),
                                           "createTime": TIME.format(next(self.clock))})
        split = {(deployed_id if k == "0" else k): v for k, v in req.json["trafficSplit"].items()}
        endpoint["trafficSplit"] = {k: v for k, v in split.items() if v}
        # The registered files, downloaded from the models bucket (fake-gcs-server) as the container does.
        artifact = self._find_version(model_id, version)["artifactUri"]
        self.servers[deployed_id] = fetch_model_dir(artifact, self.model_root / deployed_id)
        return self._lro("DeployModelResponse", {"deployedModel": {"id": deployed_id}})

    def undeploy(self, req: RecordedRequest) -> tuple[int, dict]:
        endpoint = self.endpoints[self._last(req)]
        gone = req.json["deployedModelId"]
        endpoint["deployedModels"] = [d for d in endpoint["deployedModels"] if d["id"] != gone]
        endpoint["trafficSplit"] = {k: v for k, v in req.json.get("trafficSplit", {}).items() if v}
        return self._lro("UndeployModelResponse", {})

    def predict(self, req: RecordedRequest) -> tuple[int, Any]:
        """Forward to the real prediction server for the deployed model that has the traffic."""
        endpoint = self.endpoints[self._last(req)]
        deployed_id = max(endpoint["trafficSplit"], key=endpoint["trafficSplit"].get)
        app = create_app([ServedModel(deployed_id, self.servers[deployed_id])])
        with running_server(app) as url:
            resp = httpx.post(f"{url}/predict", json=req.json, timeout=60)
        if resp.status_code != 200:
            # Vertex wraps a container's error answer in a Google API error carrying the container's message.
            return resp.status_code, {"error": {"code": resp.status_code, "message": resp.text,
                                                "status": "INTERNAL" if resp.status_code >= 500 else
                                                "INVALID_ARGUMENT"}}
        return 200, resp.json()

    def production_ids(self) -> set[str]:
        return {d["id"] for d in self.endpoints.get("ctloop-production", {}).get("deployedModels", [])}

    def traffic(self, endpoint_id: str) -> dict[str, int]:
        endpoint = self.endpoints[endpoint_id]
        split = endpoint["trafficSplit"]
        return {f"{d['model'].rsplit('/', 1)[-1]}@{d['modelVersionId']}": split.get(d["id"], 0)
                for d in endpoint["deployedModels"]}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "gs://ctloop-test-root/run-1/model": make_model_dir(root / "m1", seed=0),
        "gs://ctloop-test-root/run-2/model": make_model_dir(root / "m2", seed=1),
        "gs://ctloop-test-root/run-3/model": make_model_dir(root / "m3", seed=2),
        "gs://ctloop-test-root/run-bad/model": make_constant_model_dir(root / "bad", float("nan")),
    }


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """fake-gcs-server with the models bucket; the storage client finds it through STORAGE_EMULATOR_HOST."""
    from google.cloud import storage

    server = start_fake_gcs(tmp_path_factory.mktemp("fake-gcs"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", server.url)
        try:
            client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
            client.create_bucket(STAGING_BUCKET)
            yield client.create_bucket(MODEL_BUCKET)
        finally:
            server.process.stop()


@pytest.fixture
def vertex(recording_server: RecordingServer, gcs: Any, tmp_path: Path) -> FakeVertex:
    aiplatform.init(project=PROJECT, location=REGION, credentials=AnonymousCredentials(),
                    api_endpoint=recording_server.url, api_transport="rest")
    fake = FakeVertex(recording_server, tmp_path / "served")
    fake.install()
    return fake


@pytest.fixture(scope="module")
def test_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_split_dir(tmp_path_factory.mktemp("split") / "test", synthetic_frame(n=30, seed=4))


SERVING_SA = f"ctloop-serving@{PROJECT}.iam.gserviceaccount.com"


def _settings(**overrides: object) -> Settings:
    base = {"backend": "cloud", "gcp.project": PROJECT, "gcp.region": REGION, "gcp.serving_image": IMAGE,
            "gcp.model_bucket": MODEL_BUCKET, "gcp.serving_service_account": SERVING_SA,
            "deploy.smoke_instances": 3, "labels": {"app": "ctloop", "env": "Test"}}
    return Settings().with_overrides({**base, **overrides})


def _register(settings: Settings, run: str, model_dirs: dict[str, Path]):
    uri = f"gs://ctloop-test-root/{run}/model"
    lineage = {"training_data_checksum": "f" * 64, "git_sha": "abc1234", "model_type": "logistic_regression"}
    return run_register(settings, run, model_dirs[uri], uri, {"roc_auc": 0.8123}, lineage)


# -- register ----------------------------------------------------------------------------------------------


def _deploy(settings: Settings, run_id: str, model_name: str, version: str, test_split: Path):
    """Deploy as the pipeline does: against the champion that lookup_champion finds for the gate."""
    champion = find_champion(settings)
    return run_deploy(settings, run_id, model_name, version, test_split,
                      champion.version if champion is not None else None)


def _stored(run: str) -> str:
    """Where register copies ``run``'s model: the models bucket, keyed by model and the run's version alias."""
    return f"gs://{MODEL_BUCKET}/models/ctloop-churn/{run_alias(run)}"


def _fp(model_dirs: dict[str, Path], run: str) -> str:
    """The model-identity alias of the model that ``run`` registers."""
    return version_aliases(run, model_dirs[f"gs://ctloop-test-root/{run}/model"])[1]


def test_first_register_creates_the_model_with_a_fixed_id(vertex: FakeVertex, gcs: Any,
                                                         model_dirs: dict[str, Path]) -> None:
    result = _register(_settings(), "run-1", model_dirs)
    assert (result.model_name, result.version, result.created) == (f"{P}/models/ctloop-churn", "1", True)
    (upload,) = vertex.server.find("POST", rf"/v1/{P}/models:upload")
    body = upload.json
    assert "parentModel" not in body and body["modelId"] == resource_id("ctloop-churn") == "ctloop-churn"
    spec = body["model"]
    assert spec["displayName"] == "ctloop-churn"
    # The model files live in the models bucket, not the pipeline root (which may be cleaned up).
    assert spec["artifactUri"] == _stored("run-1") == result.artifact_uri
    source = model_dirs["gs://ctloop-test-root/run-1/model"]
    for name in ("model.joblib", "model_card.json"):
        blob = gcs.blob(f"models/ctloop-churn/{run_alias('run-1')}/{name}")
        assert blob.download_as_bytes() == (source / name).read_bytes()
    # Prediction logging is on by default (monitoring.sample_rate 0.1): the container gets its settings.
    assert spec["containerSpec"] == {"imageUri": IMAGE, "predictRoute": "/predict", "healthRoute": "/health",
                                     "ports": [{"containerPort": 8080}],
                                     "env": [{"name": "CTLOOP_PREDICTION_LOG_RATE", "value": "0.1"},
                                             {"name": "CTLOOP_PREDICTION_LOG_URI",
                                              "value": "gs://ctloop-dev-staging/prediction_log/ctloop-production"},
                                             {"name": "CTLOOP_FEATURE_VIEW", "value": FEATURE_VIEW}]}
    assert sorted(spec["versionAliases"]) == sorted(["default", "run-run-1", _fp(model_dirs, "run-1")])
    assert spec["labels"] == {"app": "ctloop", "env": "test", "ctloop-run": "run-1",
                              "ctloop-pipeline": "ctloop-training", "ctloop-data-checksum": "f" * 63,
                              "ctloop-git-sha": "abc1234", "ctloop-model-type": "logistic_regression"}
    assert "roc_auc=0.8123" in spec["versionDescription"]


def test_prediction_logging_settings_ride_on_the_serving_container(vertex: FakeVertex,
                                                                   model_dirs: dict[str, Path]) -> None:
    _register(_settings(**{"monitoring.sample_rate": 0.1, "gcp.staging_bucket": "ctloop-test-staging"}),
              "run-1", model_dirs)
    (upload,) = vertex.server.find("POST", rf"/v1/{P}/models:upload")
    env = {e["name"]: e["value"] for e in upload.json["model"]["containerSpec"]["env"]}
    assert env == {"CTLOOP_PREDICTION_LOG_RATE": "0.1",
                   "CTLOOP_PREDICTION_LOG_URI": "gs://ctloop-test-staging/prediction_log/ctloop-production",
                   "CTLOOP_FEATURE_VIEW": FEATURE_VIEW}


def test_with_prediction_logging_off_the_container_gets_no_log_settings(vertex: FakeVertex,
                                                                       model_dirs: dict[str, Path]) -> None:
    _register(_settings(**{"monitoring.sample_rate": 0}), "run-1", model_dirs)
    (upload,) = vertex.server.find("POST", rf"/v1/{P}/models:upload")
    # Only the online store's variable: nothing of the prediction log.
    assert upload.json["model"]["containerSpec"]["env"] == [{"name": "CTLOOP_FEATURE_VIEW", "value": FEATURE_VIEW}]


def test_next_register_is_a_non_default_version_of_the_parent(vertex: FakeVertex,
                                                              model_dirs: dict[str, Path]) -> None:
    _register(_settings(), "run-1", model_dirs)
    result = _register(_settings(), "run-2", model_dirs)
    assert (result.version, result.created) == ("2", True)
    body = vertex.server.find("POST", rf"/v1/{P}/models:upload")[-1].json
    assert body["parentModel"] == f"{P}/models/ctloop-churn"
    # not "default": deploy decides what serves
    assert body["model"]["versionAliases"] == ["run-run-2", _fp(model_dirs, "run-2")]
    assert body["model"]["artifactUri"] == _stored("run-2")


def test_register_is_idempotent_per_run(vertex: FakeVertex, model_dirs: dict[str, Path]) -> None:
    first = _register(_settings(), "run-1", model_dirs)
    again = _register(_settings(), "run-1", model_dirs)
    assert (again.model_name, again.version, again.created) == (first.model_name, first.version, False)
    assert len(vertex.server.find("POST", rf"/v1/{P}/models:upload")) == 1
    # The retry found the version by its run alias.
    assert vertex.server.find("GET", rf"/v1/{P}/models/ctloop-churn@{run_alias('run-1')}")


def test_register_race_on_the_first_model_becomes_a_version(vertex: FakeVertex,
                                                            model_dirs: dict[str, Path]) -> None:
    """Another run created the model between our list and our upload: 409, then upload as a version."""
    vertex.add_version("ctloop-churn", "ctloop-churn", "gs://elsewhere", ["run-other"])
    vertex.server.route("GET", rf"/v1/{P}/models", {})  # the list raced: it saw nothing
    result = _register(_settings(), "run-1", model_dirs)
    assert (result.version, result.created) == ("2", True)
    uploads = vertex.server.find("POST", rf"/v1/{P}/models:upload")
    assert [u.json.get("parentModel") for u in uploads] == [None, f"{P}/models/ctloop-churn"]
    assert uploads[1].json["model"]["versionAliases"] == ["run-run-1", _fp(model_dirs, "run-1")]


def test_models_go_to_the_staging_bucket_by_default_and_a_retried_copy_is_kept(
        vertex: FakeVertex, gcs: Any, model_dirs: dict[str, Path]) -> None:
    from ctloop.registry.vertex import VertexRegistry

    s = _settings(**{"gcp.model_bucket": "", "gcp.staging_bucket": STAGING_BUCKET})
    source = model_dirs["gs://ctloop-test-root/run-1/model"]
    registry = VertexRegistry(s)
    uri = f"gs://{STAGING_BUCKET}/models/ctloop-churn/{run_alias('run-1')}"
    assert registry.store_model(source, run_alias("run-1")) == uri
    assert registry.store_model(source, run_alias("run-1")) == uri  # a retried step: create-only, no error
    result = _register(s, "run-1", model_dirs)
    assert result.artifact_uri == uri
    (upload,) = vertex.server.find("POST", rf"/v1/{P}/models:upload")
    assert upload.json["model"]["artifactUri"] == uri


def test_label_values_are_made_valid() -> None:
    assert label_value("Run_2026-01-01T10:00:00.123Z") == "run_2026-01-01t10-00-00-123z"
    assert len(label_value("x" * 100)) == 63


# -- lookup ------------------------------------------------------------------------------------------------


def test_lookup_without_model_or_champion_is_empty(vertex: FakeVertex, model_dirs: dict[str, Path]) -> None:
    assert run_lookup_step(_settings().to_param(), "r") == ("", "")
    _register(_settings(), "run-1", model_dirs)
    assert find_champion(_settings()) is None
    assert vertex.server.find("GET", rf"/v1/{P}/models/ctloop-churn@champion")


# -- deploy ------------------------------------------------------------------------------------------------


def _deploy_bodies(vertex: FakeVertex, endpoint: str) -> list[dict]:
    return [r.json for r in vertex.server.find("POST", rf"/v1/{P}/endpoints/{endpoint}:deployModel")]


def test_first_deploy_staging_smoke_production_and_champion(vertex: FakeVertex, model_dirs: dict[str, Path],
                                                           test_split: Path) -> None:
    s = _settings()
    reg = _register(s, "run-1", model_dirs)
    result = _deploy(s, "run-1", reg.model_name, reg.version, test_split)

    creates = vertex.server.find("POST", rf"/v1/{P}/endpoints")
    assert [(c.query["endpointId"][0], c.json["displayName"]) for c in creates] == [
        ("ctloop-staging", "ctloop-staging"), ("ctloop-production", "ctloop-production")]
    (staging_deploy,) = _deploy_bodies(vertex, "ctloop-staging")
    assert staging_deploy["trafficSplit"] == {"0": 100}
    staged_id = next(d for d in vertex.servers if d not in vertex.production_ids())
    assert staging_deploy["deployedModel"] == {
        "model": f"{P}/models/ctloop-churn@1", "displayName": "ctloop-churn-v1",
        "dedicatedResources": {"machineSpec": {"machineType": "n1-standard-2"}, "minReplicaCount": 1,
                               "maxReplicaCount": 2},
        # The serving container runs as the serving SA, not as Vertex AI's own account.
        "serviceAccount": SERVING_SA}
    # Smoke test: one batch of 3, then 3 single instances, features only.
    predicts = vertex.server.find("POST", rf"/v1/{P}/endpoints/ctloop-staging:predict")
    assert [len(p.json["instances"]) for p in predicts] == [3, 1, 1, 1]
    assert sorted(predicts[0].json["instances"][0]) == ["contract_type", "monthly_charges", "tenure_months"]
    (prod_deploy,) = _deploy_bodies(vertex, "ctloop-production")
    assert prod_deploy["trafficSplit"] == {"0": 100}
    assert prod_deploy["deployedModel"]["serviceAccount"] == SERVING_SA
    assert vertex.traffic("ctloop-production") == {"ctloop-churn@1": 100}
    assert result.endpoint == f"{P}/endpoints/ctloop-production" and result.smoke.ok
    merges = vertex.server.find("POST", rf"/v1/{P}/models/ctloop-churn@1:mergeVersionAliases")
    assert [m.json for m in merges] == [{"versionAliases": ["champion"]}]
    champion = find_champion(s)
    assert (champion.version, champion.artifact_uri) == ("1", _stored("run-1"))
    # The candidate left staging after its smoke test: no serving node idles there.
    undeploys = vertex.server.find("POST", rf"/v1/{P}/endpoints/ctloop-staging:undeployModel")
    assert [u.json["deployedModelId"] for u in undeploys] == [staged_id]
    assert vertex.endpoints["ctloop-staging"]["deployedModels"] == []


def test_no_serving_account_leaves_the_choice_to_vertex(vertex: FakeVertex, model_dirs: dict[str, Path],
                                                       test_split: Path) -> None:
    """gcp.serving_service_account "" sends no serviceAccount: Vertex AI's own prediction account runs it."""
    s = _settings(**{"gcp.serving_service_account": ""})
    reg = _register(s, "run-1", model_dirs)
    _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    bodies = _deploy_bodies(vertex, "ctloop-staging") + _deploy_bodies(vertex, "ctloop-production")
    assert len(bodies) == 2 and all("serviceAccount" not in b["deployedModel"] for b in bodies)


def test_canary_waits_for_judgement_and_the_next_one_replaces_it(vertex: FakeVertex,
                                                                 model_dirs: dict[str, Path],
                                                                 test_split: Path) -> None:
    s = _settings(**{"deploy.canary_percent": 10, "deploy.keep_versions": 2})
    for run in ("run-1", "run-2"):
        reg = _register(s, run, model_dirs)
        _deploy(s, run, reg.model_name, reg.version, test_split)
    assert vertex.traffic("ctloop-production") == {"ctloop-churn@1": 90, "ctloop-churn@2": 10}
    v1_id = vertex.endpoints["ctloop-production"]["deployedModels"][0]["id"]
    assert _deploy_bodies(vertex, "ctloop-production")[-1]["trafficSplit"] == {v1_id: 90, "0": 10}
    assert vertex.traffic("ctloop-staging") == {}
    merges = vertex.server.find("POST", rf"/v1/{P}/models/ctloop-churn@2:mergeVersionAliases")
    assert [m.json for m in merges] == [{"versionAliases": ["canary"]}]  # not champion

    reg = _register(s, "run-3", model_dirs)
    result = _deploy(s, "run-3", reg.model_name, reg.version, test_split)
    v2_id = vertex.endpoints["ctloop-production"]["deployedModels"][1]["id"] if len(
        vertex.endpoints["ctloop-production"]["deployedModels"]) > 2 else None
    # The unjudged v2 gives its share back to the champion (left out of the split), then is undeployed.
    assert _deploy_bodies(vertex, "ctloop-production")[-1]["trafficSplit"] == {v1_id: 90, "0": 10}
    undeploys = vertex.server.find("POST", rf"/v1/{P}/endpoints/ctloop-production:undeployModel")
    assert len(undeploys) == 1 and undeploys[0].json["deployedModelId"] != v1_id and v2_id is None
    assert vertex.traffic("ctloop-production") == {"ctloop-churn@1": 90, "ctloop-churn@3": 10}
    assert result.canary and result.previous_champion == "1"
    versions = {v["versionId"]: sorted(v["versionAliases"]) for v in vertex.versions["ctloop-churn"]}
    fps = {run: _fp(model_dirs, run) for run in ("run-1", "run-2", "run-3")}
    assert versions == {"1": sorted(["default", "champion", "run-run-1", fps["run-1"]]),
                        "2": sorted(["run-run-2", fps["run-2"]]),
                        "3": sorted(["canary", "run-run-3", fps["run-3"]])}


def test_the_production_endpoint_logs_requests_and_responses_to_bigquery(vertex: FakeVertex,
                                                                         model_dirs: dict[str, Path],
                                                                         test_split: Path) -> None:
    s = _settings(**{"monitoring.sample_rate": 0.25})
    reg = _register(s, "run-1", model_dirs)
    _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    creates = {c.json["displayName"]: c.json for c in vertex.server.find("POST", rf"/v1/{P}/endpoints")}
    assert creates["ctloop-production"]["predictRequestResponseLoggingConfig"] == {
        "enabled": True, "samplingRate": 0.25,
        "bigqueryDestination": {"outputUri": f"bq://{PROJECT}.ctloop.endpoint_requests"}}
    assert "predictRequestResponseLoggingConfig" not in creates["ctloop-staging"]
    assert not vertex.server.find("PATCH", rf"/v1/{P}/endpoints/.*")  # created with it: nothing to patch


def test_a_production_endpoint_created_without_request_logging_gets_it(vertex: FakeVertex,
                                                                       model_dirs: dict[str, Path],
                                                                       test_split: Path) -> None:
    s = _settings()
    reg = _register(s, "run-1", model_dirs)
    _deploy(s.with_overrides({"canary.request_log_table": ""}), "run-1", reg.model_name, reg.version, test_split)
    assert not vertex.server.find("PATCH", rf"/v1/{P}/endpoints/.*")
    reg = _register(s, "run-2", model_dirs)
    _deploy(s, "run-2", reg.model_name, reg.version, test_split)
    (patch,) = vertex.server.find("PATCH", rf"/v1/{P}/endpoints/ctloop-production")
    assert patch.query["updateMask"] == ["predictRequestResponseLoggingConfig"]
    assert patch.json["predictRequestResponseLoggingConfig"] == {
        "enabled": True, "samplingRate": 0.1,
        "bigqueryDestination": {"outputUri": f"bq://{PROJECT}.ctloop.endpoint_requests"}}
    reg = _register(s, "run-3", model_dirs)
    _deploy(s, "run-3", reg.model_name, reg.version, test_split)
    assert len(vertex.server.find("PATCH", rf"/v1/{P}/endpoints/ctloop-production")) == 1  # logging already on


def _canary_log(champion_id: str, canary_id: str, canary_errors: float, n: int = 400) -> pd.DataFrame:
    """A prediction-log window as the serving containers write it (deployed ids are Vertex's)."""
    rng = np.random.default_rng(0)
    frames = []
    for dep, errors in ((champion_id, 0.0), (canary_id, canary_errors)):
        failed = rng.random(n) < errors
        frames.append(pd.DataFrame({DEPLOYED_MODEL_ID: dep, REQUEST_ID: [f"{dep}-{i}" for i in range(n)],
                                    ERROR: failed.astype(int), LATENCY_MS: rng.gamma(4.0, 1.0, n),
                                    PROBABILITY: np.where(failed, np.nan, rng.beta(2, 5, n))}))
    return pd.concat(frames, ignore_index=True)


def test_canary_analysis_moves_the_vertex_split_and_then_the_champion(vertex: FakeVertex,
                                                                      model_dirs: dict[str, Path],
                                                                      test_split: Path) -> None:
    s = _settings(**{"deploy.canary_percent": 10, "canary.min_requests": 100})
    for run in ("run-1", "run-2"):
        reg = _register(s, run, model_dirs)
        _deploy(s, run, reg.model_name, reg.version, test_split)
    v1_id, v2_id = (d["id"] for d in vertex.endpoints["ctloop-production"]["deployedModels"])
    registry = open_registry(s)

    first = run_canary(s, registry, log=_canary_log(v1_id, v2_id, 0.0))
    assert first.decision == "promote" and not first.became_champion
    (patch,) = vertex.server.find("PATCH", rf"/v1/{P}/endpoints/ctloop-production")
    assert patch.json["trafficSplit"] == {v2_id: 50, v1_id: 50}
    assert patch.query["updateMask"] == ["trafficSplit"]  # only the split changes
    assert not vertex.server.find("POST", rf"/v1/{P}/models/ctloop-churn@2:mergeVersionAliases")[1:]

    second = run_canary(s, registry, log=_canary_log(v1_id, v2_id, 0.0))
    assert second.became_champion
    patches = vertex.server.find("PATCH", rf"/v1/{P}/endpoints/ctloop-production")
    assert patches[-1].json["trafficSplit"] == {v2_id: 100, v1_id: 0}
    merges = vertex.server.find("POST", rf"/v1/{P}/models/ctloop-churn@2:mergeVersionAliases")
    assert [m.json for m in merges] == [{"versionAliases": ["canary"]}, {"versionAliases": ["champion"]}]
    undeploys = vertex.server.find("POST", rf"/v1/{P}/endpoints/ctloop-production:undeployModel")
    assert [u.json["deployedModelId"] for u in undeploys] == [v1_id]
    assert vertex.traffic("ctloop-production") == {"ctloop-churn@2": 100}


def test_canary_analysis_rolls_a_failing_canary_back_on_vertex(vertex: FakeVertex, model_dirs: dict[str, Path],
                                                               test_split: Path) -> None:
    s = _settings(**{"deploy.canary_percent": 10, "canary.min_requests": 100})
    for run in ("run-1", "run-2"):
        reg = _register(s, run, model_dirs)
        _deploy(s, run, reg.model_name, reg.version, test_split)
    v1_id, v2_id = (d["id"] for d in vertex.endpoints["ctloop-production"]["deployedModels"])
    outcome = run_canary(s, open_registry(s), log=_canary_log(v1_id, v2_id, 0.2))
    assert outcome.decision == "rollback"
    (undeploy,) = vertex.server.find("POST", rf"/v1/{P}/endpoints/ctloop-production:undeployModel")
    assert undeploy.json == {"deployedModelId": v2_id, "trafficSplit": {v1_id: 100}}
    assert vertex.traffic("ctloop-production") == {"ctloop-churn@1": 100}
    assert not vertex.server.find("PATCH", rf"/v1/{P}/endpoints/ctloop-production")
    assert find_champion(s).version == "1"


def test_deploying_the_deployed_champion_again_changes_nothing(vertex: FakeVertex,
                                                               model_dirs: dict[str, Path],
                                                               test_split: Path) -> None:
    s = _settings()
    reg = _register(s, "run-1", model_dirs)
    first = _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    posts_before = len([r for r in vertex.server.requests if r.method == "POST"])
    again = _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    assert not again.changed and (again.endpoint, again.deployed_model_id) == (first.endpoint,
                                                                                first.deployed_model_id)
    assert len([r for r in vertex.server.requests if r.method == "POST"]) == posts_before


def test_failed_smoke_test_rolls_back_staging_and_leaves_production(vertex: FakeVertex,
                                                                    model_dirs: dict[str, Path],
                                                                    test_split: Path) -> None:
    s = _settings()
    good = _register(s, "run-1", model_dirs)
    _deploy(s, "run-1", good.model_name, good.version, test_split)
    production_before = vertex.traffic("ctloop-production")
    undeploys_before = len(vertex.server.find("POST", rf"/v1/{P}/endpoints/ctloop-staging:undeployModel"))

    bad = _register(s, "run-bad", model_dirs)
    with pytest.raises(SmokeTestFailed, match="returned probability nan"):
        _deploy(s, "run-bad", bad.model_name, bad.version, test_split)
    undeploys = vertex.server.find("POST", rf"/v1/{P}/endpoints/ctloop-staging:undeployModel")
    assert len(undeploys) == undeploys_before + 1  # the failed candidate left staging
    assert vertex.traffic("ctloop-staging") == {}
    assert vertex.traffic("ctloop-production") == production_before
    assert len(_deploy_bodies(vertex, "ctloop-production")) == 1
    assert not vertex.server.find("POST", rf"/v1/{P}/models/ctloop-churn@2:mergeVersionAliases")
    assert find_champion(s).version == "1"


def test_a_cutover_undeploys_the_replaced_version(vertex: FakeVertex, model_dirs: dict[str, Path],
                                                  test_split: Path) -> None:
    s = _settings()  # canary_percent 100: the new version takes all traffic
    reg = _register(s, "run-1", model_dirs)
    _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    v1_id = vertex.endpoints["ctloop-production"]["deployedModels"][0]["id"]
    reg = _register(s, "run-2", model_dirs)
    _deploy(s, "run-2", reg.model_name, reg.version, test_split)
    undeploys = vertex.server.find("POST", rf"/v1/{P}/endpoints/ctloop-production:undeployModel")
    assert [u.json["deployedModelId"] for u in undeploys] == [v1_id]
    assert vertex.traffic("ctloop-production") == {"ctloop-churn@2": 100}
    assert vertex.traffic("ctloop-staging") == {}


def test_the_champion_is_read_again_right_before_it_moves(vertex: FakeVertex, model_dirs: dict[str, Path],
                                                          test_split: Path) -> None:
    s = _settings()
    for run in ("run-1", "run-2"):
        reg = _register(s, run, model_dirs)
        _deploy(s, run, reg.model_name, reg.version, test_split)
    requests = [(r.method, r.path) for r in vertex.server.requests]
    merge = requests.index(("POST", f"/v1/{P}/models/ctloop-churn@2:mergeVersionAliases"))
    assert requests[merge - 1] == ("GET", f"/v1/{P}/models/ctloop-churn@champion")
    merges = [(r.path.rsplit("/", 1)[-1], r.json) for r in vertex.server.requests
              if r.path.endswith(":mergeVersionAliases")]
    # One call per alias: Vertex moves an alias off the version that held it.
    assert merges[1:] == [("ctloop-churn@2:mergeVersionAliases", {"versionAliases": ["champion"]}),
                          ("ctloop-churn@1:mergeVersionAliases", {"versionAliases": ["previous-champion"]})]


def test_a_champion_changed_since_the_gate_stops_the_rollout(vertex: FakeVertex, model_dirs: dict[str, Path],
                                                             test_split: Path) -> None:
    s = _settings()
    for run in ("run-1", "run-2"):
        reg = _register(s, run, model_dirs)
        _deploy(s, run, reg.model_name, reg.version, test_split)
    posts = len([r for r in vertex.server.requests if r.method == "POST"])
    late = _register(s, "run-3", model_dirs)
    with pytest.raises(ChampionMoved, match="against champion version 1, but another run made version 2 the "
                                            "champion meanwhile"):
        run_deploy(s, "run-3", late.model_name, late.version, test_split, "1")
    # Only the upload of run-3's version: nothing was deployed, no alias moved.
    assert [r.path for r in vertex.server.requests if r.method == "POST"][posts:] == [f"/v1/{P}/models:upload"]


def test_a_champion_moved_during_the_rollout_rolls_the_candidate_back(vertex: FakeVertex,
                                                                      model_dirs: dict[str, Path],
                                                                      test_split: Path) -> None:
    """Another run moves the champion while this one deploys to production: the compare-and-set fails, the
    candidate leaves production with the previous split, and the other run's champion stays."""
    s = _settings()
    reg = _register(s, "run-1", model_dirs)
    _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    v1_id = vertex.endpoints["ctloop-production"]["deployedModels"][0]["id"]
    other = _register(s, "run-2", model_dirs)
    mine = _register(s, "run-3", model_dirs)

    def deploy_while_another_run_promotes(req: RecordedRequest) -> tuple[int, dict]:
        answer = vertex.deploy(req)
        vertex.set_alias("ctloop-churn", "champion", other.version)
        return answer

    vertex.server.route("POST", rf"/v1/{P}/endpoints/ctloop-production:deployModel",
                        deploy_while_another_run_promotes)
    with pytest.raises(ChampionMoved, match="another run made version 2 the champion"):
        _deploy(s, "run-3", mine.model_name, mine.version, test_split)
    (undeploy,) = vertex.server.find("POST", rf"/v1/{P}/endpoints/ctloop-production:undeployModel")
    assert undeploy.json["trafficSplit"] == {v1_id: 100}  # the split before this run, restored
    assert vertex.traffic("ctloop-production") == {"ctloop-churn@1": 100}
    assert not vertex.server.find("POST", rf"/v1/{P}/models/ctloop-churn@3:mergeVersionAliases")
    assert find_champion(s).version == "2"


def test_compiled_pipeline_carries_the_vertex_artifact_types(tmp_path: Path) -> None:
    """Vertex lineage links a run to its model through google.VertexModel / google.VertexEndpoint outputs."""
    import yaml
    from kfp import compiler

    from pipelines.training import training_pipeline

    compiler.Compiler().compile(training_pipeline, str(tmp_path / "training.yaml"))
    spec = yaml.safe_load((tmp_path / "training.yaml").read_text())
    outputs = {name: c.get("outputDefinitions", {}).get("artifacts", {})
               for name, c in spec["components"].items()}
    assert outputs["comp-register"]["vertex_model"]["artifactType"] == {"schemaTitle": "google.VertexModel",
                                                                       "schemaVersion": "0.0.1"}
    assert outputs["comp-deploy"]["vertex_endpoint"]["artifactType"] == {
        "schemaTitle": "google.VertexEndpoint", "schemaVersion": "0.0.1"}
    # deploy gets the champion version that lookup_champion found for the gate.
    (deploy_task,) = [c["dag"]["tasks"]["deploy"] for c in spec["components"].values()
                      if "deploy" in c.get("dag", {}).get("tasks", {})]
    assert deploy_task["inputs"]["parameters"]["champion_version"] == {
        "componentInputParameter": "pipelinechannel--lookup-champion-champion_version"}


def test_a_smoke_answer_from_another_deployment_fails_the_smoke_test(vertex: FakeVertex,
                                                                    model_dirs: dict[str, Path],
                                                                    test_split: Path) -> None:
    """Another run's candidate took the staging endpoint's traffic: its answers do not pass for this one's."""
    s = _settings()
    reg = _register(s, "run-1", model_dirs)

    def answered_by_another(req: RecordedRequest) -> tuple[int, dict]:
        n = len(req.json["instances"])
        return 200, {"predictions": [{"label": 0, "probability": 0.1}] * n, "deployedModelId": "4242"}

    vertex.server.route("POST", rf"/v1/{P}/endpoints/ctloop-staging:predict", answered_by_another)
    with pytest.raises(SmokeTestFailed, match="answered by deployed model '4242', not '1001'"):
        _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    assert vertex.traffic("ctloop-staging") == {}
    assert "ctloop-production" not in vertex.endpoints
