"""A closed-loop HTTP load generator: ``concurrency`` threads, each with its own keep-alive httpx client,
POST pre-encoded bodies back to back until a request count or a time limit is reached (loopback only)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    elapsed_s: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def rate(self) -> float:
        """Successful requests per second over the whole run."""
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"load generator: only loopback targets are allowed, found host {host!r} in {url}")


def closed_loop(url: str, bodies: Sequence[bytes], *, concurrency: int, max_requests: int,
                max_seconds: float) -> LoadResult:
    """Send ``bodies`` round robin; stop after ``max_requests`` sent or ``max_seconds``, whichever first."""
    import httpx

    check_loopback(url)
    if not bodies:
        raise ValueError("load generator: no request bodies")
    if concurrency < 1 or max_requests < 1 or max_seconds <= 0:
        raise ValueError(f"load generator: concurrency, max_requests and max_seconds must be positive, found "
                         f"{concurrency}, {max_requests}, {max_seconds}")
    result = LoadResult()
    lock = threading.Lock()
    tickets = itertools.count()
    deadline = time.perf_counter() + max_seconds
    headers = {"content-type": "application/json"}

    def worker(offset: int) -> None:
        latencies: list[float] = []
        errors, first_error = 0, ""
        with httpx.Client(timeout=30.0) as client:
            i = offset
            while next(tickets) < max_requests and time.perf_counter() < deadline:
                body = bodies[i % len(bodies)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    resp = client.post(url, content=body, headers=headers)
                    ok = resp.status_code == 200
                    if not ok and not first_error:
                        first_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    ok = False
                    first_error = first_error or f"{type(exc).__name__}: {exc}"
                if ok:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1
        with lock:
            result.latencies_ms.extend(latencies)
            result.errors += errors
            result.first_error = result.first_error or first_error

    threads = [threading.Thread(target=worker, args=(k,), name=f"load-{k}") for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.elapsed_s = time.perf_counter() - t0
    return result
