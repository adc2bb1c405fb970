"""A local HTTP server that records what the real Google client libraries send and answers canned JSON.

Routes are (METHOD, regex over the percent-decoded path) -> handler(request) -> (status, json body). Each test
registers the answers it needs; every request is recorded, matched or not, so tests assert on exact requests.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class RecordedRequest:
    method: str
    path: str  # percent-decoded
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


Answer = tuple[int, Any]
Handler = Callable[[RecordedRequest], Answer]


@dataclass
class RecordingServer:
    routes: list[tuple[str, re.Pattern[str], Handler]] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def route(self, method: str, pattern: str, answer: Handler | Answer | Any) -> None:
        """Answer ``method`` requests whose decoded path fully matches ``pattern``; later routes win."""
        if callable(answer):
            handler = answer
        elif isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], int):
            handler = lambda _r, a=answer: a  # noqa: E731
        else:
            handler = lambda _r, a=answer: (200, a)  # noqa: E731
        self.routes.insert(0, (method.upper(), re.compile(pattern), handler))

    def find(self, method: str, pattern: str) -> list[RecordedRequest]:
        rx = re.compile(pattern)
        return [r for r in self.requests if r.method == method.upper() and rx.fullmatch(r.path)]

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RecordingServer:
        outer = self

        class _H(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                req = RecordedRequest(
                    method=self.command,
                    path=unquote(parts.path),
                    query=parse_qs(parts.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                outer.requests.append(req)
                status, payload = 404, {"error": {"code": 404, "message": f"no route for {req.method} {req.path}"}}
                for method, rx, handler in outer.routes:
                    if method == req.method and rx.fullmatch(req.path):
                        status, payload = handler(req)
                        break
                data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
