"""A closed-loop HTTP load generator: ``concurrency`` threads, each with its own keep-alive connection, POST
pre-encoded bodies back to back until a request count or a time limit is reached (loopback only).

Requests are written as pre-built HTTP/1.1 bytes on a plain socket and responses read by Content-Length: an
HTTP client library costs about a millisecond of CPU per request, which on a small machine shared with the
server would measure the client more than the server.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ctloop.traffic import check_loopback


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


class _Connection:
    """One keep-alive HTTP/1.1 connection that POSTs bodies and returns (status, response body)."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.address, self.path = (host, port), path
        self.head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        self.sock: socket.socket | None = None
        self.buffer = b""

    def post(self, body: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=30.0)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        try:
            self.sock.sendall(f"{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            return self._response()
        except OSError:
            self.close()
            raise

    def _response(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while b"0\r\n\r\n" not in rest:
                rest += self._recv()
            body, _, self.buffer = rest.partition(b"0\r\n\r\n")
        else:
            length = int(headers.get(b"content-length", b"0"))
            while len(rest) < length:
                rest += self._recv()
            body, self.buffer = rest[:length], rest[length:]
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, body

    def _recv(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("server closed the connection")
        return data

    def _fill(self) -> None:
        self.buffer += self._recv()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def closed_loop(url: str, bodies: Sequence[bytes], *, concurrency: int, max_requests: int,
                max_seconds: float) -> LoadResult:
    """Send ``bodies`` round robin; stop after ``max_requests`` sent or ``max_seconds``, whichever first."""
    check_loopback(url)
    if not bodies:
        raise ValueError("load generator: no request bodies")
    if concurrency < 1 or max_requests < 1 or max_seconds <= 0:
        raise ValueError(f"load generator: concurrency, max_requests and max_seconds must be positive, found "
                         f"{concurrency}, {max_requests}, {max_seconds}")
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    result = LoadResult()
    lock = threading.Lock()
    tickets = itertools.count()
    deadline = time.perf_counter() + max_seconds

    def worker(offset: int) -> None:
        latencies: list[float] = []
        errors, first_error = 0, ""
        conn = _Connection(host, port, path)
        i = offset
        try:
            while next(tickets) < max_requests and time.perf_counter() < deadline:
                body = bodies[i % len(bodies)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    status, answer = conn.post(body)
                    ok = status == 200
                    if not ok and not first_error:
                        first_error = f"HTTP {status}: {answer[:200].decode(errors='replace')}"
                except (OSError, ValueError) as exc:
                    ok = False
                    first_error = first_error or f"{type(exc).__name__}: {exc}"
                if ok:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1
        finally:
            conn.close()
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
