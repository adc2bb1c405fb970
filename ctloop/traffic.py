"""A bounded, loopback-only traffic generator for the local production endpoint: what lets the canary analysis
run locally on real prediction-log traffic.

``drive`` sends at most ``requests`` requests of one instance each, at most ``max_per_second``, to a server on
127.0.0.1 / localhost / ::1 only; each carries an ``X-Request-Id`` so the labels of the rows it sent can be
filed as "arrived" (``write_labels``) for the canary's label-based check.
"""

import itertools
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from ctloop.canary import LABEL_COLUMN, LABELS_DIR
from ctloop.config import Settings
from ctloop.prediction_log import REQUEST_ID, local_path, log_root

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class TrafficResult:
    sent: int = 0
    failed: int = 0  # non-200 answers
    request_ids: list[str] = field(default_factory=list)  # the i-th sent instances[i % len(instances)]
    answered_by: dict[str, int] = field(default_factory=dict)  # deployed model id -> requests


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"traffic generator: only loopback targets are allowed, found host {host!r} in {url}")


def drive(url: str, instances: Sequence[dict[str, Any]], requests: int, max_per_second: float,
          route: str = "/predict", concurrency: int = 4) -> TrafficResult:
    """POST ``requests`` single-instance requests, cycling through ``instances``, no faster than the rate, from
    ``concurrency`` connections."""
    import socket

    import httpx

    check_loopback(url)
    if requests < 0 or max_per_second <= 0 or not instances or concurrency < 1:
        raise ValueError(f"traffic generator: expected requests >= 0, a positive rate, some instances and a "
                         f"positive concurrency, found {requests}, {max_per_second}, {len(instances)} instances, "
                         f"{concurrency}")
    result, gap, started = TrafficResult(request_ids=[""] * requests), 1.0 / max_per_second, time.monotonic()
    lock, counter = threading.Lock(), itertools.count()

    def worker() -> None:
        # TCP_NODELAY: without it each request waits for the server's delayed ACK (about 40 ms on Linux).
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        with httpx.Client(base_url=url, timeout=30.0, transport=transport) as client:
            while (i := next(counter)) < requests:
                wait = started + i * gap - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                request_id = uuid.uuid4().hex
                try:
                    resp = client.post(route, json={"instances": [instances[i % len(instances)]]},
                                       headers={"X-Request-Id": request_id})
                    who = resp.json().get("deployedModelId", "") if resp.status_code == 200 else None
                except httpx.HTTPError:
                    who = None
                with lock:
                    result.sent += 1
                    result.request_ids[i] = request_id
                    if who is None:
                        result.failed += 1
                    else:
                        result.answered_by[who] = result.answered_by.get(who, 0) + 1

    threads = [threading.Thread(target=worker, name=f"traffic-{n}") for n in range(min(concurrency, requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result


def write_labels(settings: Settings, request_ids: Sequence[str], labels: Sequence[int]) -> Path:
    """File the labels of sent requests under the production log's ``labels/`` folder (they have "arrived")."""
    folder = local_path(log_root(settings, settings.deploy.production_endpoint)) / LABELS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"labels-{uuid.uuid4().hex[:12]}.parquet"
    pd.DataFrame({REQUEST_ID: list(request_ids), LABEL_COLUMN: list(labels)}).to_parquet(target, index=False)
    return target


@contextmanager
def serving_production(settings: Settings, seed: int | None = None) -> Iterator[str]:
    """The local production endpoint (its split as of now, shadows included) on 127.0.0.1 with the prediction log
    the settings configure; the log is written out when the block ends. ``seed`` fixes the traffic split's draws."""
    from ctloop.registry import LocalRegistry
    from serving.app import create_app, endpoint_deployments
    from serving.background import running_server
    from serving.prediction_log import config_from_settings

    name = settings.deploy.production_endpoint
    app = create_app(endpoint_deployments(LocalRegistry(settings.local.registry_db), name),
                     prediction_log=config_from_settings(settings, name), seed=seed)
    with running_server(app) as url:
        yield url
