"""The prediction server: one FastAPI app for a local endpoint and for the Vertex AI custom container.

``POST <predict route>`` with ``{"instances": [{feature: value, ...}, ...]}`` answers
``{"predictions": [{"label": 0|1, "probability": p}, ...], "deployedModelId": ..., "model": ...,
"modelVersionId": ...}``. For a model with history features an instance is the entity id, the event time
(optional, default now) and the source features: the server looks the entity's history up in the online store
and derives the history features (serving/online.py); the prediction then carries ``onlineFeatures``, what was
looked up and how fresh it is. An instance with every model feature, history included, is scored as sent.
Bad requests get HTTP 400 naming the instance index and field (malformed or too deeply nested JSON included);
bodies over 1.5 MiB get 413 before they are read. The server never answers 500 for client input.

Speed: instances are validated in plain Python and pivoted to columns, which the model scores with ONNX Runtime
(no DataFrame) when the gate found its ONNX export to agree with scikit-learn, else with scikit-learn.
Requests that arrive while the model is busy are scored together in the next call, so throughput grows with
concurrency at no extra latency when idle.

One app serves all deployed models of an endpoint and honours its traffic split: each request picks one
deployed model at random, weighted by its traffic percentage.

Prediction logging (off unless a ``PredictionLogConfig`` is given): a sample of requests, with the features as
the model scored them, the answers, the request id (``X-Request-Id`` when the client sends one), the latency and
failures, written in batches by a background thread (serving/prediction_log.py).

Shadow deployments (``ServedModel.shadow``, 0% of the traffic) get a copy of each logged request once it has been
answered; their answers are logged under the live request's id, never returned.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request, Response

from ctloop.model_runtime import LoadedModel, load_model
from ctloop.online_store import OnlineStore, OnlineStoreUnavailable
from serving.model import Columns, InstanceError, InstanceValidator
from serving.online import fill_history
from serving.prediction_log import PredictionLogConfig, PredictionLogger

if TYPE_CHECKING:
    from ctloop.registry import LocalRegistry

DEFAULT_PREDICT_ROUTE = "/predict"
DEFAULT_HEALTH_ROUTE = "/health"
DEFAULT_MAX_INSTANCES = 1000
# Vertex AI online prediction's request size limit: larger bodies are rejected before they are read.
MAX_BODY_BYTES = 1_572_864
# Upper bound on rows scored in one model call when several requests are waiting.
MAX_BATCH_ROWS = 2048
_GATHER_TICKS = 2


@dataclass(frozen=True)
class ServedModel:
    """One deployed model of the endpoint this server stands for."""

    deployed_id: str
    model_dir: str | Path
    traffic_percent: int = 100
    model: str = ""
    version: str = ""
    runtime: str = "auto"  # "sklearn" skips the ONNX model (ctloop.model_runtime.load_model)
    shadow: bool = False  # scores a copy of the live requests (traffic_percent 0); answers logged, not returned


class PredictionError(RuntimeError):
    """The model failed or returned something that is not a probability."""


class _Deployed:
    """A loaded model plus the queue that coalesces concurrent requests into one model call."""

    def __init__(self, served: ServedModel, loaded: LoadedModel, log: PredictionLogConfig | None = None) -> None:
        self.served = served
        self.model = loaded
        self.validator = InstanceValidator(loaded.card)
        self.threshold = loaded.card.threshold
        self.logger = (PredictionLogger(log, loaded.card.numeric, loaded.card.categorical)
                       if log is not None and log.sample_rate > 0 else None)
        # One scoring thread per model: scikit-learn runs off the event loop, which keeps accepting requests.
        # An ONNX Runtime call on a request-sized batch takes about a tenth of a millisecond, less than handing
        # it to a thread and back: it runs on the event loop.
        self.inline = loaded.runtime == "onnx"
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[tuple[Columns, int, asyncio.Future[list[float]]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def score(self, columns: Columns, rows: int) -> list[float]:
        loop = asyncio.get_running_loop()
        # One worker per event loop: a server restarted in the same process gets a fresh queue.
        if self._worker is None or self._worker.done() or self._loop is not loop:
            self._loop = loop
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        assert self._queue is not None
        future: asyncio.Future[list[float]] = loop.create_future()
        self._queue.put_nowait((columns, rows, future))
        return await future

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self.logger is not None:
            # Writes what is still buffered; off the event loop, which may still be answering health checks.
            await asyncio.to_thread(self.logger.close)

    async def _run(self) -> None:
        assert self._queue is not None and self._executor is not None
        loop, executor = asyncio.get_running_loop(), self._executor
        while True:
            batch = [await self._queue.get()]
            rows = batch[0][1]
            # Let the loop finish parsing requests whose bytes arrived during the last model call, so they
            # join this batch (a few microseconds when idle).
            for _ in range(_GATHER_TICKS):
                await asyncio.sleep(0)
            while rows < MAX_BATCH_ROWS and not self._queue.empty():
                item = self._queue.get_nowait()
                batch.append(item)
                rows += item[1]
            try:
                if self.inline:
                    results = self._score_batch(batch)
                else:
                    results = await loop.run_in_executor(executor, self._score_batch, batch)
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                results = [exc] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _score_batch(self, batch: list[tuple[Columns, int, Any]]) -> list[list[float] | Exception]:
        if len(batch) == 1:
            return [self._score(batch[0][0])]
        merged: Columns = {name: [] for name in batch[0][0]}
        for columns, _, _ in batch:
            for name, values in columns.items():
                merged[name].extend(values)
        try:
            probs = self._score(merged)
        except Exception:  # noqa: BLE001
            # Score each request alone, so one request the model cannot handle fails only itself.
            return [self._safe_score(columns) for columns, _, _ in batch]
        out: list[list[float] | Exception] = []
        start = 0
        for _, rows, _ in batch:
            out.append(probs[start:start + rows])
            start += rows
        return out

    def _safe_score(self, columns: Columns) -> list[float] | Exception:
        try:
            return self._score(columns)
        except Exception as exc:  # noqa: BLE001
            return exc

    def _score(self, columns: Columns) -> list[float]:
        try:
            probs = self.model.probabilities(columns).tolist()
        except Exception as exc:
            raise PredictionError(f"model {self.served.deployed_id} failed to predict: "
                                  f"{type(exc).__name__}: {exc}") from exc
        for i, p in enumerate(probs):
            if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                raise PredictionError(f"model {self.served.deployed_id} returned probability {p} for row "
                                      f"{i}; expected a finite number in [0, 1]")
        return probs


async def _read_body(request: Request) -> bytes | None:
    """The request body, or None when it is larger than MAX_BODY_BYTES (judged from Content-Length when the
    client sends one, so such a body is never read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def _bad_request(message: str) -> Response:
    return _json_response({"error": message}, 400)


def parse_body(raw: bytes) -> Any:
    """The request's JSON. orjson parses it (a 100-instance body in a quarter of json's time); a body orjson
    refuses is parsed again by json, so what is wrong gets json's words (NaN, nesting too deep) and a number
    beyond a double's range reads as infinity, for the instance check to name its field."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def create_app(
    deployments: Sequence[ServedModel],
    *,
    predict_route: str = DEFAULT_PREDICT_ROUTE,
    health_route: str = DEFAULT_HEALTH_ROUTE,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    seed: int | None = None,
    prediction_log: PredictionLogConfig | None = None,
    online_store: OnlineStore | None = None,
) -> FastAPI:
    """Load every deployed model now (never per request) and build the app.

    Traffic percentages must sum to 100; a model with 0% stays loaded but receives no requests.
    ``prediction_log``: log a sample of requests there (each deployed model writes its own files).
    ``online_store``: where instances sent without their history features get them (serving/online.py).
    """
    if not deployments:
        raise ValueError("create_app: no deployed models to serve")
    ids = [d.deployed_id for d in deployments]
    if len(set(ids)) != len(ids):
        raise ValueError(f"create_app: deployed model ids must be unique, found {ids}")
    total = sum(d.traffic_percent for d in deployments)
    if total != 100 or any(d.traffic_percent < 0 for d in deployments):
        raise ValueError(f"create_app: traffic percentages must be >= 0 and sum to 100, found "
                         f"{ {d.deployed_id: d.traffic_percent for d in deployments} }")
    if max_instances < 1:
        raise ValueError(f"create_app: max_instances must be at least 1, found {max_instances}")

    if any(d.shadow and d.traffic_percent for d in deployments):
        raise ValueError("create_app: a shadow deployment takes no traffic (traffic_percent 0)")
    served = [_Deployed(d, load_model(d.model_dir, d.runtime), prediction_log) for d in deployments]
    live = [s for s in served if s.served.traffic_percent > 0]
    weights = [s.served.traffic_percent for s in live]
    shadows = [s for s in served if s.served.shadow]
    copies: set[asyncio.Task[None]] = set()  # shadow scoring in flight (a reference keeps each task alive)
    rng = random.Random(seed)

    def pick() -> _Deployed:
        return live[0] if len(live) == 1 else rng.choices(live, weights=weights)[0]

    async def shadow_copy(shadow: _Deployed, instances: list[Any], served_columns: Columns,
                          request_id: str) -> None:
        started = time.perf_counter()
        wanted = (*shadow.validator.numeric, *shadow.validator.categorical)
        try:
            # The live model's columns, history features derived from the online store, when they are the
            # shadow's too; else the instances as sent (they must then carry every feature the shadow needs).
            columns = ({n: served_columns[n] for n in wanted} if set(wanted) <= served_columns.keys()
                       else shadow.validator.columns(instances))
        except InstanceError:
            return  # a shadow with another feature contract cannot score this request: nothing to compare
        try:
            probs, error = await shadow.score(columns, len(instances)), False
        except PredictionError:
            probs, error = [math.nan] * len(instances), True
        assert shadow.logger is not None
        shadow.logger.record(columns, probs, shadow.threshold, shadow.served.deployed_id, shadow.served.model,
                             shadow.served.version, request_id=request_id,
                             latency_ms=(time.perf_counter() - started) * 1000, error=error)

    def copy_to_shadows(instances: list[Any], columns: Columns, request_id: str) -> None:
        for shadow in shadows:
            if shadow.logger is not None:
                task = asyncio.get_running_loop().create_task(shadow_copy(shadow, instances, columns, request_id))
                copies.add(task)
                task.add_done_callback(copies.discard)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # What the server holds by now (modules, models, the app) lives as long as it does: frozen, the
        # collector's full passes leave it out. Unfrozen, a full pass over it (25 ms) ran every quarter second
        # under load and stalled every request in flight: single-instance p99 went 4 -> 28 ms at 16 clients.
        gc.freeze()
        yield
        if copies:
            await asyncio.gather(*copies, return_exceptions=True)
        for s in served:
            await s.stop()

    app = FastAPI(title="ctloop prediction server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.deployments = served

    async def health() -> Response:
        body = {"status": "ok", "deployedModels": [
            {"deployedModelId": s.served.deployed_id, "model": s.served.model,
             "modelVersionId": s.served.version, "trafficPercent": s.served.traffic_percent,
             "runtime": s.model.runtime, "runtimeReason": s.model.runtime_reason} for s in served]}
        if prediction_log is not None:
            body["predictionLog"] = [s.logger.stats() for s in served if s.logger is not None]
        return _json_response(body)

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        raw = await _read_body(request)
        if raw is None:
            return _json_response({"error": f"request body: larger than {MAX_BODY_BYTES} bytes (1.5 MiB), the "
                                            f"limit of one prediction request"}, 413)
        try:
            body = parse_body(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return _bad_request(f"request body is not valid JSON: {exc}")
        except RecursionError:
            return _bad_request("request body: JSON nested too deeply; expected {\"instances\": [{...}, ...]}")
        if type(body) is not dict:
            return _bad_request('request body: expected an object {"instances": [...]}')
        extra = body.keys() - {"instances", "parameters"}
        if extra:
            return _bad_request(f"request body: unknown field(s) {sorted(extra)}; expected 'instances' "
                                f"(and optionally 'parameters')")
        instances = body.get("instances")
        if type(instances) is not list:
            found = "nothing" if "instances" not in body else type(instances).__name__
            return _bad_request(f"instances: expected a list of instance objects, found {found}")
        if not instances:
            return _bad_request("instances: empty list; send at least one instance")
        if len(instances) > max_instances:
            return _bad_request(f"instances: {len(instances)} instances in one request, the limit is "
                                f"{max_instances}")
        target = pick()
        try:
            parsed = target.validator.parse(instances, now_us=time.time_ns() // 1000)
            looked_up = await fill_history(parsed, len(instances), target.validator, online_store)
        except InstanceError as exc:
            return _bad_request(str(exc))
        except OnlineStoreUnavailable as exc:
            return _json_response({"error": str(exc)}, 503)
        columns = parsed.columns
        sampled = target.logger is not None and target.logger.draw()
        request_id = (request.headers.get("x-request-id") or uuid.uuid4().hex)[:128] if sampled else ""
        try:
            probs = await target.score(columns, len(instances))
        except PredictionError as exc:
            if sampled:
                target.logger.record(columns, [math.nan] * len(instances), target.threshold,
                                     target.served.deployed_id, target.served.model, target.served.version,
                                     request_id=request_id, latency_ms=(time.perf_counter() - started) * 1000,
                                     error=True)
            return _json_response({"error": str(exc)}, 500)
        threshold = target.threshold
        if sampled:
            target.logger.record(columns, probs, threshold, target.served.deployed_id, target.served.model,
                                 target.served.version, request_id=request_id,
                                 latency_ms=(time.perf_counter() - started) * 1000)
            if shadows:
                copy_to_shadows(instances, columns, request_id)
        predictions = [{"label": int(p >= threshold), "probability": p} for p in probs]
        for prediction, report in zip(predictions, looked_up, strict=True):
            if report is not None:
                prediction["onlineFeatures"] = report
        answer = {
            "predictions": predictions,
            "deployedModelId": target.served.deployed_id,
            "model": target.served.model,
            "modelVersionId": target.served.version,
        }
        return _json_response(answer)

    app.add_api_route(health_route, health, methods=["GET"])
    app.add_api_route(predict_route, predict, methods=["POST"])
    return app


def endpoint_deployments(registry: LocalRegistry, endpoint_name: str) -> list[ServedModel]:
    """The models deployed on a local endpoint, with their traffic, as the server needs them."""
    endpoint = registry.get_endpoint(endpoint_name)
    if endpoint is None:
        raise LookupError(f"endpoint {endpoint_name!r} does not exist in {registry.db_path}")
    if not endpoint.deployments:
        raise LookupError(f"endpoint {endpoint_name!r} has no deployed models; run a training pipeline first")
    from ctloop.registry import CANARY_ALIAS

    out = []
    for d in endpoint.deployments:
        version = registry.get_version(d.model, d.version)
        # A canary at 0% is in shadow: it scores a copy of the live requests.
        shadow = d.traffic_percent == 0 and CANARY_ALIAS in version.aliases
        out.append(ServedModel(deployed_id=d.deployed_model_id, model_dir=version.artifact_uri,
                               traffic_percent=d.traffic_percent, model=d.model, version=str(d.version),
                               shadow=shadow))
    return out


def serve_endpoint(registry: LocalRegistry, endpoint_name: str, host: str = "127.0.0.1",
                   port: int = 8080, prediction_log: PredictionLogConfig | None = None,
                   online_store: OnlineStore | None = None) -> None:
    """Serve a local endpoint's deployed models (its traffic split as of now) until interrupted.

    ``prediction_log``: e.g. ``serving.prediction_log.config_from_settings(settings, endpoint_name)``.
    """
    import uvicorn

    app = create_app(endpoint_deployments(registry, endpoint_name), prediction_log=prediction_log,
                     online_store=online_store)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
