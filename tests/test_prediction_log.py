"""Prediction logging: the real server on 127.0.0.1 logs a sample of requests, in batches and on shutdown, with
bounded memory; the Cloud Storage sink sends one create per flush (real client, recording server); the drift
check reads the log back by time window."""

from __future__ import annotations

import json
import math
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from google.auth.credentials import AnonymousCredentials

from ctloop.config import Settings
from ctloop.prediction_log import LOGGED_AT, PROBABILITY, log_root, read_prediction_log
from serving.__main__ import ContainerEnv
from serving.app import ServedModel, create_app
from serving.background import running_server
from serving.prediction_log import (
    GcsJsonlSink,
    LocalParquetSink,
    PredictionLogConfig,
    PredictionLogger,
    config_from_settings,
)
from tests.recording_server import RecordingServer
from tests.serving_fixtures import CATEGORICAL, FEATURES, NUMERIC, make_model_dir, synthetic_frame


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "m1", threshold=0.4)


@pytest.fixture(scope="module")
def instances() -> list[dict[str, object]]:
    rows = synthetic_frame(n=400, seed=3)[FEATURES].to_dict(orient="records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def _serve(model_dir: Path, log: PredictionLogConfig | None):
    return create_app([ServedModel("dm-1", model_dir, 100, model="churn", version="4")], prediction_log=log)


def _all_rows(root: Path) -> pd.DataFrame:
    files = sorted(root.rglob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


def test_a_sample_of_requests_is_logged_with_the_features_and_answers(model_dir: Path, instances, tmp_path: Path):
    rate, n = 0.25, len(instances)
    log = PredictionLogConfig(uri=str(tmp_path / "log"), sample_rate=rate, flush_rows=10_000, flush_seconds=3600,
                              seed=11)
    answers = {}
    with running_server(_serve(model_dir, log)) as url, httpx.Client(base_url=url) as client:
        for i, inst in enumerate(instances):
            resp = client.post("/predict", json={"instances": [inst]})
            assert resp.status_code == 200
            answers[i] = resp.json()["predictions"][0]
        health = client.get("/health").json()["predictionLog"][0]
        assert not list((tmp_path / "log").rglob("*.parquet"))  # nothing written yet: buffered
    # Shutdown wrote the buffer: one file, in today's folder.
    files = list((tmp_path / "log").rglob("*.parquet"))
    assert len(files) == 1 and files[0].parent.name == f"date={datetime.now(UTC).date().isoformat()}"
    logged = _all_rows(tmp_path / "log")
    sampled = health["sampledRequests"]
    assert health["pendingRows"] == sampled and health["droppedRows"] == 0
    assert len(logged) == sampled
    # Binomial(400, 0.25): mean 100, sd 8.7; the seeded draw must land within 4 sd.
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(sampled - n * rate) <= 4 * sd, sampled
    print(f"\nlogged {sampled}/{n} requests at sample_rate={rate}")
    # Each logged row is one of the requests, as the model saw it, with the answer the client got.
    by_features = {json.dumps([inst[c] for c in FEATURES]): i for i, inst in enumerate(instances)}
    for row in logged.to_dict(orient="records"):
        key = json.dumps([None if isinstance(row[c], float) and math.isnan(row[c]) else row[c] for c in FEATURES])
        i = by_features[key]
        assert row[PROBABILITY] == answers[i]["probability"]
        assert row["__label"] == answers[i]["label"]
        assert (row["__deployed_model_id"], row["__model"], row["__model_version"]) == ("dm-1", "churn", "4")
    assert logged[NUMERIC].dtypes.tolist() == [np.float64] * len(NUMERIC)
    assert all(isinstance(v, str) or v is None for v in logged[CATEGORICAL[0]].tolist())


def test_full_batches_are_written_while_serving(model_dir: Path, instances, tmp_path: Path) -> None:
    log = PredictionLogConfig(uri=str(tmp_path / "log"), sample_rate=1.0, flush_rows=10, flush_seconds=3600)
    with running_server(_serve(model_dir, log)) as url, httpx.Client(base_url=url) as client:
        for inst in instances[:25]:
            assert client.post("/predict", json={"instances": [inst]}).status_code == 200
        deadline = time.monotonic() + 10
        while len(_all_rows(tmp_path / "log")) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        during = _all_rows(tmp_path / "log")
        assert len(during) >= 20  # two full batches were written without waiting for shutdown
        assert len(list((tmp_path / "log").rglob("*.parquet"))) >= 2
    assert len(_all_rows(tmp_path / "log")) == 25  # the rest on shutdown
    assert not [p for p in (tmp_path / "log").rglob("*") if p.name.startswith(".")]  # no temp files left


def test_multi_instance_requests_log_every_instance(model_dir: Path, instances, tmp_path: Path) -> None:
    log = PredictionLogConfig(uri=str(tmp_path / "log"), sample_rate=1.0)
    with running_server(_serve(model_dir, log)) as url:
        answer = httpx.post(f"{url}/predict", json={"instances": instances[:7]}).json()
    logged = _all_rows(tmp_path / "log")
    assert logged[PROBABILITY].tolist() == [p["probability"] for p in answer["predictions"]]


def test_logging_is_on_by_default_at_a_sampled_rate_and_off_at_zero(model_dir: Path, instances) -> None:
    default = config_from_settings(Settings(), "ctloop-production")
    assert default is not None and 0 < default.sample_rate < 1  # monitoring.sample_rate defaults to 0.1
    assert config_from_settings(Settings().with_overrides({"monitoring.sample_rate": 0}), "ctloop-production") is None
    app = _serve(model_dir, None)
    assert app.state.deployments[0].logger is None
    with running_server(app) as url:
        assert "predictionLog" not in httpx.get(f"{url}/health").json()


def test_settings_give_the_endpoint_its_own_log_root(tmp_path: Path) -> None:
    s = Settings().with_overrides({"local.workdir": str(tmp_path), "monitoring.sample_rate": 0.1})
    cfg = config_from_settings(s, "ctloop-production")
    assert cfg.uri == str(tmp_path / "prediction_log" / "ctloop-production") and cfg.sample_rate == 0.1
    cloud = s.with_overrides({"backend": "cloud"})
    assert log_root(cloud, "ep") == "gs://ctloop-dev-staging/prediction_log/ep"
    assert log_root(s.with_overrides({"monitoring.log_uri": "gs://b/logs/"}), "ep") == "gs://b/logs/ep"


class _BlockedSink:
    """A sink that waits until released: the writer thread is stuck, so the buffer has to hold or drop."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.rows = 0

    def write(self, table: pa.Table, day, name: str) -> str:
        self.entered.set()
        self.release.wait(30)
        self.rows += table.num_rows
        return name


def _columns(n: int) -> dict[str, list]:
    return {"tenure_months": list(range(n)), "monthly_charges": [1.5] * n, "contract_type": ["monthly"] * n}


def test_a_stuck_sink_bounds_memory_and_counts_dropped_rows() -> None:
    sink = _BlockedSink()
    cfg = PredictionLogConfig(uri="unused", sample_rate=1.0, flush_rows=5, flush_seconds=3600, max_pending_rows=50)
    logger = PredictionLogger(cfg, NUMERIC, CATEGORICAL, sink=sink)
    assert logger.offer(_columns(5), [0.5] * 5, 0.5, "dm")  # fills a batch: the writer takes it and blocks
    assert sink.entered.wait(10)
    accepted = sum(logger.offer(_columns(5), [0.5] * 5, 0.5, "dm") for _ in range(20))
    stats = logger.stats()
    assert accepted == 10 and stats["pendingRows"] == 50  # never more than max_pending_rows buffered
    assert stats["droppedRows"] == 50 and stats["sampledRequests"] == 21
    sink.release.set()
    logger.close()
    assert sink.rows == 55 and logger.stats()["loggedRows"] == 55


def test_a_failing_sink_never_fails_the_caller(capsys: pytest.CaptureFixture[str]) -> None:
    class Broken:
        def write(self, table, day, name):
            raise OSError("disk full")

    logger = PredictionLogger(PredictionLogConfig(uri="x", sample_rate=1.0), NUMERIC, CATEGORICAL, sink=Broken())
    assert logger.offer(_columns(3), [0.1, 0.2, 0.3], 0.5, "dm")
    logger.close()
    assert logger.stats()["writeErrors"] == 1 and logger.stats()["loggedRows"] == 0
    assert "could not write 3 rows to x: OSError: disk full" in capsys.readouterr().err


def test_the_hot_path_does_no_io() -> None:
    """Unsampled requests cost one random draw; sampled ones an append under a lock: below the flush size
    nothing reaches the sink. The cost per request is printed, not asserted (bench/ holds speed targets)."""
    cols, probs = _columns(1), [0.5]
    timings = {}
    for rate in (0.1, 1.0):
        sink = _BlockedSink()
        sink.release.set()
        logger = PredictionLogger(PredictionLogConfig(uri="x", sample_rate=rate, seed=1, flush_rows=10**9,
                                                      max_pending_rows=10**9), NUMERIC, CATEGORICAL, sink=sink)
        t0 = time.perf_counter()
        for _ in range(20_000):
            logger.offer(cols, probs, 0.5, "dm")
        timings[rate] = (time.perf_counter() - t0) / 20_000 * 1e6
        assert not sink.entered.is_set() and sink.rows == 0, rate
        sampled = logger.stats()["sampledRequests"]
        logger.close()
        assert sink.rows == sampled and (sampled == 20_000 if rate == 1.0 else 1_500 < sampled < 2_500)
    print(f"\noffer(): {', '.join(f'rate {k}: {v:.2f} µs' for k, v in timings.items())} per request")


# --- the Cloud Storage sink, real client against the recording server -------------------------------------


def test_gcs_sink_creates_one_jsonl_object_per_flush_that_never_overwrites(recording_server: RecordingServer,
                                                                            tmp_path: Path) -> None:
    from google.cloud import storage

    def created(req) -> tuple[int, dict]:
        return 200, {**_metadata(req.body), "bucket": "logs-bucket", "generation": "1"}

    recording_server.route("POST", r"/upload/storage/v1/b/logs-bucket/o", created)
    client = storage.Client(project="p", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": recording_server.url})
    sink = GcsJsonlSink("gs://logs-bucket/prediction_log/ctloop-production", client=client)
    logger = PredictionLogger(PredictionLogConfig(uri="gs://logs-bucket/prediction_log/ctloop-production",
                                                  sample_rate=1.0), NUMERIC, CATEGORICAL, sink=sink)
    cols = {"tenure_months": [3, None], "monthly_charges": [70.5, float("nan")], "contract_type": ["monthly", None]}
    logger.offer(cols, [0.25, 0.75], 0.5, "dm-9", "churn", "2")
    assert logger.flush() == 2
    logger.close()
    (req,) = recording_server.find("POST", r"/upload/storage/v1/b/logs-bucket/o")
    assert req.query["uploadType"] == ["multipart"] and req.query["ifGenerationMatch"] == ["0"]
    meta = _metadata(req.body)
    name = meta["name"]
    today = datetime.now(UTC).date().isoformat()
    assert name.startswith(f"prediction_log/ctloop-production/date={today}/part-") and name.endswith(".jsonl")
    assert "content-type: application/x-ndjson" in req.body.decode().lower()  # the content part's header
    # The multipart body: the object resource, then the content, one JSON object per line.
    rows = [json.loads(ln) for ln in req.body.decode().splitlines() if ln.startswith('{"__logged_at"')]
    assert [(r["tenure_months"], r["monthly_charges"], r["contract_type"], r["__probability"], r["__label"])
            for r in rows] == [(3.0, 70.5, "monthly", 0.25, 0), (None, None, None, 0.75, 1)]
    # The drift check reads that object through the /gcs/ mount: the same bytes in a folder read back the same.
    copy = tmp_path / "mount" / name
    copy.parent.mkdir(parents=True)
    copy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "mount" / "prediction_log" / "ctloop-production"
    now = datetime.now(UTC)
    back = read_prediction_log(str(root), now - timedelta(hours=1), now + timedelta(hours=1))
    assert back[PROBABILITY].tolist() == [0.25, 0.75] and back["contract_type"].tolist()[0] == "monthly"


def _metadata(body: bytes) -> dict:
    """The object resource: the multipart body's first JSON part."""
    return next(json.loads(ln) for ln in body.decode().splitlines() if ln.startswith('{"') and '"name"' in ln)


# --- reading the log back ----------------------------------------------------------------------------------


def test_the_reader_takes_the_window_across_day_folders_and_skips_temp_files(tmp_path: Path) -> None:
    sink = LocalParquetSink(tmp_path)
    midnight = datetime(2026, 3, 2, tzinfo=UTC)
    stamps = [midnight - timedelta(minutes=1), midnight + timedelta(minutes=1), midnight + timedelta(days=1)]
    for i, ts in enumerate(stamps):
        table = pa.table({LOGGED_AT: pa.array([ts], pa.timestamp("us", tz="UTC")), "x": [float(i)]})
        sink.write(table, ts.date(), f"part-{i}")
    (tmp_path / "date=2026-03-02" / ".part-9.parquet.tmp").write_bytes(b"half a file")
    rows = read_prediction_log(str(tmp_path), midnight - timedelta(hours=1), midnight + timedelta(hours=1))
    assert rows["x"].tolist() == [0.0, 1.0]
    assert read_prediction_log(str(tmp_path), midnight + timedelta(hours=1), midnight + timedelta(hours=2)).empty
    from ctloop.errors import DataValidationError

    with pytest.raises(DataValidationError, match="no such directory"):
        read_prediction_log(str(tmp_path / "nope"), midnight, midnight + timedelta(days=1))


def test_the_container_reads_its_logging_settings_from_the_environment() -> None:
    env = ContainerEnv.from_env({"AIP_STORAGE_URI": "gs://b/m", "CTLOOP_PREDICTION_LOG_RATE": "0.1",
                                 "CTLOOP_PREDICTION_LOG_URI": "gs://b/log/ep",
                                 "CTLOOP_PREDICTION_LOG_FLUSH_ROWS": "50"})
    assert env.prediction_log == PredictionLogConfig(uri="gs://b/log/ep", sample_rate=0.1, flush_rows=50)
    assert ContainerEnv.from_env({"AIP_STORAGE_URI": "gs://b/m"}).prediction_log is None
    with pytest.raises(ValueError, match="CTLOOP_PREDICTION_LOG_URI is not set"):
        ContainerEnv.from_env({"AIP_STORAGE_URI": "gs://b/m", "CTLOOP_PREDICTION_LOG_RATE": "0.5"})
    with pytest.raises(ValueError, match=r"CTLOOP_PREDICTION_LOG_RATE='often': expected a number"):
        ContainerEnv.from_env({"AIP_STORAGE_URI": "gs://b/m", "CTLOOP_PREDICTION_LOG_RATE": "often"})
    with pytest.raises(ValueError, match=r"sample_rate must be within \[0, 1\], found 2.0"):
        ContainerEnv.from_env({"AIP_STORAGE_URI": "gs://b/m", "CTLOOP_PREDICTION_LOG_RATE": "2",
                               "CTLOOP_PREDICTION_LOG_URI": "/tmp/x"})
