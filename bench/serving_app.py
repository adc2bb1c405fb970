"""The prediction server as the serving suite runs it: the product's ``create_app`` over one model directory.

Two ways to start it, both with ``CTLOOP_BENCH_MODEL_DIR`` set:
- ``uvicorn bench.serving_app:create --factory [--workers N]``: uvicorn's own command line;
- ``python -m bench.serving_app --port P --workers N``: uvicorn's worker supervisor over a listening socket
  created with ``IPPROTO_TCP``. asyncio sets TCP_NODELAY only on sockets whose protocol says TCP, and the
  socket ``uvicorn --workers`` binds says 0, so there every keep-alive response (headers and body written
  separately) waits for the client's delayed ACK, ~40 ms. This variant shows the same workers without that.
"""

from __future__ import annotations

import argparse
import os
import socket

from fastapi import FastAPI

from serving.app import ServedModel, create_app

MODEL_DIR_ENV = "CTLOOP_BENCH_MODEL_DIR"
RUNTIME_ENV = "CTLOOP_BENCH_RUNTIME"  # "auto" (default) or "sklearn"
FACTORY = "bench.serving_app:create"


def create() -> FastAPI:
    model_dir = os.environ.get(MODEL_DIR_ENV)
    if not model_dir:
        raise RuntimeError(f"{MODEL_DIR_ENV} is not set: expected a model directory (model.joblib + card)")
    runtime = os.environ.get(RUNTIME_ENV) or "auto"
    return create_app([ServedModel(deployed_id="bench", model_dir=model_dir, traffic_percent=100, runtime=runtime)])


def tcp_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) IPv4 socket whose protocol is TCP, inheritable by worker processes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    p = argparse.ArgumentParser(prog="python -m bench.serving_app", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    config = uvicorn.Config(FACTORY, factory=True, host=args.host, port=args.port, workers=args.workers,
                            log_level="warning", access_log=False)
    Multiprocess(config, sockets=[tcp_socket(args.host, args.port)]).run()


if __name__ == "__main__":
    main()
