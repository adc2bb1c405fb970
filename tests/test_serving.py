"""The prediction server over real HTTP on 127.0.0.1: contract, validation, traffic split, the Vertex entry
point and the serving image's pinned requirements."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

import httpx
import joblib
import numpy as np
import pandas as pd
import pytest
import sklearn
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ctloop.errors import ModelLoadError
from ctloop.model_runtime import load_model as load_model_dir
from ctloop.registry import LocalRegistry
from serving.__main__ import ContainerEnv
from serving.app import ServedModel, create_app, endpoint_deployments
from serving.background import running_server
from serving.model import fetch_model_dir
from tests.serving_fixtures import (
    CATEGORICAL,
    FEATURES,
    NUMERIC,
    approve_onnx,
    fit_pipeline,
    instance,
    make_constant_model_dir,
    make_failing_model_dir,
    make_model_dir,
    synthetic_frame,
    write_model_dir,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose ONNX export the gate found to agree with scikit-learn: served by ONNX Runtime."""
    directory = make_model_dir(tmp_path_factory.mktemp("model") / "m1", threshold=0.3)
    approve_onnx(directory)
    return directory


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    app = create_app([ServedModel("dm-1", model_dir, 100, model="churn", version="3")], max_instances=50)
    with running_server(app) as url:
        yield url


def _expected(model_dir: Path, instances: list[dict]) -> np.ndarray:
    """The pipeline's own answer on a DataFrame built the way training data looks."""
    pipe = joblib.load(model_dir / "model.joblib")
    types = {"tenure_months": float, "monthly_charges": float, "contract_type": "str"}
    frame = pd.DataFrame(instances, columns=FEATURES).astype(types)
    return pipe.predict_proba(frame)[:, 1]


def test_predict_returns_the_model_probabilities_and_thresholded_labels(server: str, model_dir: Path) -> None:
    instances = [instance(i) for i in range(12)]
    instances[3]["monthly_charges"] = None  # nulls are imputed by the model
    instances[4]["contract_type"] = None
    resp = httpx.post(f"{server}/predict", json={"instances": instances})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["deployedModelId"], body["model"], body["modelVersionId"]) == ("dm-1", "churn", "3")
    probs = [p["probability"] for p in body["predictions"]]
    np.testing.assert_allclose(probs, _expected(model_dir, instances), rtol=1e-12)
    assert [p["label"] for p in body["predictions"]] == [int(p >= 0.3) for p in probs]
    assert {p["label"] for p in body["predictions"]} == {0, 1}


def test_health(server: str) -> None:
    resp = httpx.get(f"{server}/health")
    assert resp.status_code == 200
    assert resp.json()["deployedModels"][0]["deployedModelId"] == "dm-1"


def _with(**changes: object) -> dict:
    return {**instance(0), **changes}


BAD_REQUESTS = [
    ({"instances": [_with(), _with(tenure_months="12")]},
     r"instances\[1\]\.tenure_months: expected a number or null, found string \"12\""),
    ({"instances": [_with(tenure_months=True)]}, r"instances\[0\]\.tenure_months: .*found boolean true"),
    ({"instances": [_with(contract_type=2)]},
     r"instances\[0\]\.contract_type: expected a string or null, found number 2"),
    ({"instances": [_with(contract_type=["monthly"])]}, r"instances\[0\]\.contract_type: .*found array"),
    ({"instances": [{k: v for k, v in instance(0).items() if k != "monthly_charges"}]},
     r"instances\[0\]\.monthly_charges: missing field\(s\) \['monthly_charges'\]"),
    ({"instances": [_with(), _with(), _with(churned=1)]},
     r"instances\[2\]\.churned: unknown field\(s\) \['churned'\]"),
    ({"instances": [_with(), [1, 2, 3]]},
     r"instances\[1\]: expected an object of feature values, found array"),
    ({"instances": ["x"]}, r"instances\[0\]: expected an object .* found string"),
    ({"instances": []}, r"instances: empty list"),
    ({"instances": [_with()] * 51}, r"instances: 51 instances in one request, the limit is 50"),
    ({"instances": {"a": 1}}, r"instances: expected a list of instance objects, found dict"),
    ({"rows": [_with()]}, r"request body: unknown field\(s\) \['rows'\]"),
    ({}, r"instances: expected a list of instance objects, found nothing"),
    ([_with()], r"request body: expected an object"),
]


@pytest.mark.parametrize("body,message", BAD_REQUESTS)
def test_bad_requests_are_400_naming_the_instance_and_field(server: str, body: object, message: str) -> None:
    resp = httpx.post(f"{server}/predict", json=body)
    assert resp.status_code == 400, resp.text
    assert re.search(message, resp.json()["error"]), resp.json()["error"]


@pytest.mark.parametrize("raw,message", [
    (b'{"instances": [', "request body is not valid JSON"),
    (b'{"instances": [{"tenure_months": NaN, "monthly_charges": 1, "contract_type": "x"}]}',
     "NaN is not valid JSON"),
    (b'{"instances": [{"tenure_months": 1e400, "monthly_charges": 1, "contract_type": "x"}]}',
     r"instances\[0\]\.tenure_months: expected a finite number or null, found inf"),
    (b"\xff\xfe", "request body is not valid JSON"),
])
def test_malformed_json_is_400(server: str, raw: bytes, message: str) -> None:
    resp = httpx.post(f"{server}/predict", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert re.search(message, resp.json()["error"])


def test_deeply_nested_json_is_400_not_500(server: str) -> None:
    raw = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = httpx.post(f"{server}/predict", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert "nested too deeply" in resp.json()["error"]


def test_bodies_over_one_and_a_half_mib_are_413_before_parsing(server: str) -> None:
    big = json.dumps({"instances": [_with()] * 20_000}).encode()
    assert len(big) > 1_572_864
    resp = httpx.post(f"{server}/predict", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "larger than 1572864 bytes" in resp.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for i in range(0, len(big), 65_536):
            yield big[i:i + 65_536]

    resp = httpx.post(f"{server}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413
    # Just under the limit is parsed (and rejected for its instance count, a 400).
    fits = json.dumps({"instances": [_with()] * 60}).encode()
    assert httpx.post(f"{server}/predict", content=fits).status_code == 400


def test_served_by_onnx_when_the_gate_approved_it_else_by_sklearn(model_dir: Path, tmp_path: Path) -> None:
    instances = [instance(i) for i in range(40)]
    instances[2]["tenure_months"] = None
    instances[5]["contract_type"] = None
    instances[6]["contract_type"] = "never-seen"
    unchecked = make_model_dir(tmp_path / "unchecked", threshold=0.3)
    apps = [ServedModel("onnx", model_dir, 50), ServedModel("forced", model_dir, 25, runtime="sklearn"),
            ServedModel("unchecked", unchecked, 25)]
    with running_server(create_app(apps, seed=1)) as url:
        health = {d["deployedModelId"]: d for d in httpx.get(f"{url}/health").json()["deployedModels"]}
        assert health["onnx"]["runtime"] == "onnx"
        assert (health["forced"]["runtime"], health["forced"]["runtimeReason"]) == ("sklearn",
                                                                                    "scikit-learn requested")
        assert health["unchecked"]["runtime"] == "sklearn"
        assert "has not been checked against scikit-learn" in health["unchecked"]["runtimeReason"]
        seen = set()
        for _ in range(30):
            body = httpx.post(f"{url}/predict", json={"instances": instances}).json()
            seen.add(body["deployedModelId"])
            got = [p["probability"] for p in body["predictions"]]
            np.testing.assert_allclose(got, _expected(model_dir, instances), rtol=0, atol=1e-6)
        assert seen == {"onnx", "forced", "unchecked"}


def test_a_model_served_by_onnx_loads_and_scores_without_scikit_learn(model_dir: Path, tmp_path: Path) -> None:
    """Its pickle is read on first use only: a fresh process (a deploy step, a server) skips scikit-learn's
    import; a pickle that cannot be read still fails with its path, when it is used."""
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    (broken / "model.joblib").write_bytes(b"not a pickle")
    script = """
import json, sys
from ctloop.errors import ModelLoadError
from ctloop.model_runtime import load_model
out = {}
for name in sys.argv[1:]:
    model = load_model(name)
    columns = {"tenure_months": [3.0, None], "monthly_charges": [70.0, 20.0], "contract_type": ["monthly", None]}
    out[name] = {"runtime": model.runtime, "p": model.probabilities(columns).tolist()}
out["sklearn imported"] = "sklearn" in sys.modules
try:
    load_model(sys.argv[-1]).pipeline
except ModelLoadError as exc:
    out["error"] = str(exc)
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", script, str(model_dir), str(broken)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out[str(model_dir)]["runtime"] == out[str(broken)]["runtime"] == "onnx"
    assert out[str(model_dir)]["p"] == out[str(broken)]["p"]
    assert out["sklearn imported"] is False
    assert out["error"].startswith(f"{broken / 'model.joblib'}: cannot load (")
    expected = _expected(model_dir, [{"tenure_months": 3.0, "monthly_charges": 70.0, "contract_type": "monthly"},
                                     {"tenure_months": None, "monthly_charges": 20.0, "contract_type": None}])
    np.testing.assert_allclose(out[str(model_dir)]["p"], expected, rtol=0, atol=1e-6)


def test_a_started_server_freezes_what_it_loaded_out_of_the_collectors_full_passes(model_dir: Path) -> None:
    """Modules, models and the app live as long as the server: full collections (which stall every request in
    flight) must not walk them under load."""
    script = """
import gc, sys, httpx
from serving.app import ServedModel, create_app
from serving.background import running_server
app = create_app([ServedModel("d", sys.argv[1], 100)])
before = gc.get_freeze_count()
with running_server(app) as url:
    ok = httpx.get(f"{url}/health").status_code == 200
    print(before, gc.get_freeze_count(), len(gc.get_objects()), ok)
"""
    run = subprocess.run([sys.executable, "-c", script, str(model_dir)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    before, frozen, tracked, ok = run.stdout.split()
    assert ok == "True" and before == "0"
    # Nearly everything is frozen: what the collector still walks is a small fraction of it.
    assert int(frozen) > 20 * int(tracked), (frozen, tracked)


def test_parameters_field_is_accepted_like_vertex_sends_it(server: str) -> None:
    resp = httpx.post(f"{server}/predict", json={"instances": [_with()], "parameters": {}})
    assert resp.status_code == 200


def test_concurrent_requests_each_get_their_own_answers(server: str, model_dir: Path) -> None:
    """Requests scored together in one model call must come back split correctly."""
    instances = [instance(i) for i in range(60)]
    expected = _expected(model_dir, instances)

    async def fire() -> list[dict]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            calls = [client.post("/predict", json={"instances": instances[i:i + 1 + i % 3]})
                     for i in range(0, 57)]
            return [r.json() for r in await asyncio.gather(*calls)]

    for i, body in enumerate(asyncio.run(fire())):
        got = [p["probability"] for p in body["predictions"]]
        np.testing.assert_allclose(got, expected[i:i + 1 + i % 3], rtol=1e-12)


def test_traffic_split_is_honoured(tmp_path: Path) -> None:
    low = make_constant_model_dir(tmp_path / "low", 0.2)
    high = make_constant_model_dir(tmp_path / "high", 0.8)
    served = [ServedModel("low", low, 80), ServedModel("high", high, 20), ServedModel("off", high, 0)]
    app = create_app(served, seed=7)
    n = 400
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        answers = [client.post("/predict", json={"instances": [instance(0)]}).json() for _ in range(n)]
    counts = Counter(a["deployedModelId"] for a in answers)
    # 80% of 400 = 320, sd = 8: 5 sd either side.
    assert 280 <= counts["low"] <= 360 and counts["low"] + counts["high"] == n, counts
    assert counts["off"] == 0
    # The answer comes from the model that was named.
    assert all(a["predictions"][0]["probability"] == (0.2 if a["deployedModelId"] == "low" else 0.8)
               for a in answers)


@pytest.mark.parametrize("kind,message", [
    ("failing", "failed to predict: RuntimeError: this model cannot predict"),
    ("nan", "returned probability nan"),
])
def test_a_broken_model_is_a_500_with_the_reason(tmp_path: Path, kind: str, message: str) -> None:
    model = (make_failing_model_dir(tmp_path / "m") if kind == "failing"
             else make_constant_model_dir(tmp_path / "m", float("nan")))
    with running_server(create_app([ServedModel("bad", model)])) as url:
        resp = httpx.post(f"{url}/predict", json={"instances": [instance(0)]})
        assert resp.status_code == 500
        assert message in resp.json()["error"]
        # Bad input is still a 400, not a 500, on a broken model.
        assert httpx.post(f"{url}/predict", json={"instances": []}).status_code == 400


def test_create_app_checks_its_deployments(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sum to 100"):
        create_app([ServedModel("a", model_dir, 60), ServedModel("b", model_dir, 30)])
    with pytest.raises(ValueError, match="unique"):
        create_app([ServedModel("a", model_dir, 50), ServedModel("a", model_dir, 50)])
    with pytest.raises(ValueError, match="no deployed models"):
        create_app([])
    with pytest.raises(ModelLoadError, match="model_card.json not found"):
        create_app([ServedModel("a", tmp_path)])


def test_model_card_problems_name_the_file_and_field(model_dir: Path, tmp_path: Path) -> None:
    card = json.loads((model_dir / "model_card.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.joblib").write_bytes((model_dir / "model.joblib").read_bytes())
    for broken, field in [({**card, "threshold": 1.5}, "'threshold'"),
                          ({**card, "features": {"numeric": "x"}}, "'features'"),
                          ({**card, "features": [{"name": "x", "type": "text"}]}, "'features[0]'"),
                          ({k: v for k, v in card.items() if k != "label"}, "'label'")]:
        (bad / "model_card.json").write_text(json.dumps(broken))
        with pytest.raises(ModelLoadError, match=f"model_card.json: .*{re.escape(field)}"):
            load_model_dir(bad)
    (bad / "model_card.json").write_text(json.dumps({**card, "versions": {"sklearn": "0.24.2"}}))
    with pytest.raises(ModelLoadError, match=r"saved with scikit-learn 0\.24\.2, installed is .*major\.minor"):
        load_model_dir(bad)
    # Extra card fields are fine.
    (bad / "model_card.json").write_text(json.dumps({**card, "metrics": {"auc": 0.9}, "notes": "x"}))
    data = load_model_dir(bad).card.data
    assert data["metrics"] == {"auc": 0.9} and data["notes"] == "x"


def test_one_card_format(tmp_path: Path) -> None:
    """The train step's card is the only format: the old ``{"numeric": [...], "categorical": [...]}`` features
    object and a top-level ``sklearn_version`` are rejected, naming the field."""
    pipe = fit_pipeline(synthetic_frame())
    card = load_model_dir(write_model_dir(tmp_path / "a", pipe, 0.4)).card
    assert (card.numeric, card.categorical) == (tuple(NUMERIC), tuple(CATEGORICAL))
    assert (card.label, card.threshold, card.sklearn_version) == ("churned", 0.4, sklearn.__version__)
    data = json.loads((tmp_path / "a" / "model_card.json").read_text())
    old = {**data, "features": {"numeric": NUMERIC, "categorical": CATEGORICAL}}
    (tmp_path / "a" / "model_card.json").write_text(json.dumps(old))
    with pytest.raises(ModelLoadError, match="field 'features' must be a list"):
        load_model_dir(tmp_path / "a")
    old = {**{k: v for k, v in data.items() if k != "versions"}, "sklearn_version": sklearn.__version__}
    (tmp_path / "a" / "model_card.json").write_text(json.dumps(old))
    with pytest.raises(ModelLoadError, match="missing field 'versions.sklearn'"):
        load_model_dir(tmp_path / "a")


def test_endpoint_deployments_come_from_the_registry(model_dir: Path, tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "r.sqlite")
    reg.register_version("churn", str(model_dir), run_key="a")
    reg.register_version("churn", str(model_dir), run_key="b")
    reg.ensure_endpoint("prod")
    reg.deploy("prod", "churn", 1, 100)
    reg.deploy("prod", "churn", 2, 25)
    served = endpoint_deployments(reg, "prod")
    assert [(s.deployed_id, s.traffic_percent, s.version) for s in served] == [("churn-v1", 75, "1"),
                                                                                ("churn-v2", 25, "2")]
    assert all(Path(s.model_dir) == model_dir for s in served)
    with pytest.raises(LookupError, match="'nope' does not exist"):
        endpoint_deployments(reg, "nope")


# -- the Vertex container entry point -------------------------------------------------------------------


def test_container_env_defaults_and_errors() -> None:
    env = ContainerEnv.from_env({"AIP_STORAGE_URI": "gs://b/m"})
    assert (env.port, env.predict_route, env.health_route, env.deployed_model_id) == (8080, "/predict",
                                                                                        "/health", "0")
    with pytest.raises(ValueError, match="AIP_STORAGE_URI is not set"):
        ContainerEnv.from_env({})
    with pytest.raises(ValueError, match="AIP_HTTP_PORT='x': expected an integer"):
        ContainerEnv.from_env({"AIP_STORAGE_URI": "/m", "AIP_HTTP_PORT": "x"})


@pytest.fixture(scope="module")
def gcs(model_dir: Path) -> Iterator[str]:
    """fake-gcs-server holding the model under gs://models/churn/7/."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from devtools.emulators import start_fake_gcs

    server = start_fake_gcs(model_dir.parent / "fake-gcs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", server.url)
        try:
            client = storage.Client(project="test", credentials=AnonymousCredentials())
            bucket = client.create_bucket("models")
            for name in ("model.joblib", "model_card.json", "model.onnx", "onnx_check.json"):
                bucket.blob(f"churn/7/{name}").upload_from_filename(str(model_dir / name))
            yield server.url
        finally:
            server.process.stop()


def test_fetch_model_dir_downloads_both_files(gcs: str, tmp_path: Path, model_dir: Path) -> None:
    local = fetch_model_dir("gs://models/churn/7/", tmp_path / "dl")
    assert sorted(p.name for p in local.iterdir()) == ["model.joblib", "model.onnx", "model_card.json",
                                                       "onnx_check.json"]
    assert (local / "model_card.json").read_text() == (model_dir / "model_card.json").read_text()
    assert (local / "model.onnx").read_bytes() == (model_dir / "model.onnx").read_bytes()
    with pytest.raises(ModelLoadError, match="gs://models/churn/8: missing model_card.json"):
        fetch_model_dir("gs://models/churn/8", tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_python_m_serving_follows_the_vertex_contract(gcs: str, model_dir: Path, free_port: int) -> None:
    env = {**os.environ, "AIP_STORAGE_URI": "gs://models/churn/7", "AIP_HTTP_PORT": str(free_port),
           "AIP_PREDICT_ROUTE": "/v1/endpoints/e/deployedModels/d:predict", "AIP_HEALTH_ROUTE": "/ready",
           "AIP_DEPLOYED_MODEL_ID": "1234", "STORAGE_EMULATOR_HOST": gcs, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "serving"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{free_port}"
    try:
        _wait_ready(proc, f"{base}/ready")
        route = f"{base}/v1/endpoints/e/deployedModels/d:predict"
        resp = httpx.post(route, json={"instances": [instance(5)]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["deployedModelId"] == "1234"
        np.testing.assert_allclose(resp.json()["predictions"][0]["probability"],
                                   _expected(model_dir, [instance(5)])[0], rtol=1e-12)
        assert httpx.post(f"{base}/predict", json={"instances": [instance(5)]}).status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_python_m_serving_exits_with_a_clear_error_without_a_model(tmp_path: Path) -> None:
    env = {**os.environ, "AIP_STORAGE_URI": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "serving"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert f"serving: model directory {tmp_path}: model_card.json not found" in done.stderr


@pytest.fixture
def free_port() -> int:
    from ctloop.ports import free_port

    return free_port()


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout}s")


# -- the serving image -----------------------------------------------------------------------------------

# What the server imports (pyyaml and pydantic for ctloop.config, which ctloop.modeling imports); the image
# must hold these and everything they need.
SERVING_ROOTS = ["fastapi", "uvicorn", "scikit-learn", "pandas", "pyarrow", "numpy", "joblib",
                 "google-cloud-storage", "pyyaml", "pydantic", "onnxruntime", "orjson",
                 "google-cloud-aiplatform",  # FeatureOnlineStoreServiceClient (ctloop/online_store_vertex.py)
                 "httptools", "uvloop",
                 "sniffio"]  # anyio imports it when present: pinned so the image matches what is tested


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_serving_requirements_pin_exactly_the_lock_versions() -> None:
    serving = _pins(ROOT / "serving" / "requirements.txt")
    lock = _pins(ROOT / "requirements.lock")
    mismatched = {n: (v, lock.get(n)) for n, v in serving.items() if lock.get(n) != v}
    assert not mismatched, f"serving/requirements.txt pins differ from requirements.lock: {mismatched}"


def test_serving_requirements_cover_the_whole_dependency_closure() -> None:
    """--no-deps installs only the listed packages, so the list must hold every transitive dependency."""
    serving = _pins(ROOT / "serving" / "requirements.txt")
    needed, stack = set(), list(SERVING_ROOTS)
    while stack:
        name = canonicalize_name(stack.pop())
        if name in needed:
            continue
        needed.add(name)
        for spec in distribution(name).requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    assert sorted(needed - serving.keys()) == []
    assert sorted(serving.keys() - needed) == []


def test_serving_a_model_imports_only_what_the_image_installs(model_dir: Path) -> None:
    """The image holds serving/, ctloop/ and serving/requirements.txt. Loading and scoring a model the way the
    server does must import nothing else (the pickle refers to ctloop.modeling's input coercions)."""
    code = (
        "import json, sys\n"
        "startup = set(sys.modules)\n"
        "from ctloop.model_runtime import load_model\n"
        "from serving.model import InstanceValidator\n"
        "import serving.app, serving.__main__\n"
        f"m = load_model({str(model_dir)!r})\n"
        f"m.probabilities(InstanceValidator(m.card).columns([{instance(0)!r}]))\n"
        "print(json.dumps({n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())\n"
        "                  if n not in startup}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    installed = set(_pins(ROOT / "serving" / "requirements.txt")) | {"ctloop"}
    owners = packages_distributions()
    site_dirs = [Path(p) for p in sys.path if p.endswith("site-packages")]
    outside = {}
    for name, file in json.loads(out.stdout).items():
        path = Path(file).resolve() if file else None
        if path is None or path.is_relative_to(ROOT / "serving") or path.is_relative_to(ROOT / "ctloop"):
            continue
        site = next((d for d in site_dirs if path.is_relative_to(d)), None)
        if site is None:
            continue  # the standard library
        top = path.relative_to(site).parts[0].split(".")[0]
        dists = {canonicalize_name(d) for d in owners.get(top, [])}
        if not dists & installed:
            outside[name] = sorted(dists) or top
    assert outside == {}, f"modules imported from packages the serving image does not install: {outside}"


def test_dockerfile_is_pinned_non_root_and_runs_the_server() -> None:
    text = (ROOT / "serving" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    arg = re.fullmatch(r"\$\{(\w+)\}", base)  # the base as a build argument: its default is the release base
    if arg:
        base = re.search(rf"^ARG {arg.group(1)}=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "serving/requirements.txt" in text and "--no-deps" in text
    assert re.search(r'^CMD \["python", "-m", "serving"\]$', text, re.M)


def test_synthetic_training_data_has_both_classes() -> None:
    """Guards the fixtures: a one-class frame would make every probability test trivial."""
    assert set(synthetic_frame()["churned"]) == {0, 1}


def test_a_pipeline_without_onnx_form_is_served_by_sklearn(tmp_path: Path) -> None:
    model = make_constant_model_dir(tmp_path / "m", 0.25)  # a classifier skl2onnx knows nothing about
    card = json.loads((model / "model_card.json").read_text())
    assert card["onnx"]["file"] is None and card["onnx"]["reason"].startswith("ONNX export failed")
    assert not (model / "model.onnx").exists()
    loaded = load_model_dir(model)
    assert loaded.runtime == "sklearn" and "no model.onnx in the model directory (ONNX export failed" in \
        loaded.runtime_reason
    with running_server(create_app([ServedModel("c", model)])) as url:
        body = httpx.post(f"{url}/predict", json={"instances": [instance(0)]}).json()
        assert body["predictions"][0]["probability"] == 0.25
