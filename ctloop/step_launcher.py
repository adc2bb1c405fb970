"""The local step server's launcher: what kfp's SubprocessRunner starts as a step's Python (ctloop/step_server.py).

It hands the step (``-m <module> <args>``, its environment, working directory and stdin/stdout/stderr) to the
server, relays the signals it gets to the step's process group there, and ends as the step ended: its exit code,
or killed by its signal. With no server to take the step it execs the interpreter, and the step runs as a process
of its own. It uses the standard library only and runs as ``python -I -S``: the server writes it out, with its
socket and interpreter, as an executable script (``main`` is called at its end).
"""

import contextlib
import json
import os
import signal
import socket
import sys

RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def main(address: str, python: str, argv: list[str]) -> int:
    """Run ``python argv`` as a step forked by the server at ``address``, else exec it."""
    conn = _handed_over(address, argv)
    if conn is None:
        os.execv(python, [python, *argv])

    def relay(signum: int, _frame: object) -> None:
        # A server that is gone killed the step's group when it saw us hang up.
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"signal": signum}).encode() + b"\n")

    for signum in RELAYED_SIGNALS:
        signal.signal(signum, relay)
    line = read_line(conn)
    if not line:
        print(f"ctloop error: the local step server ({address}) stopped during the step", file=sys.stderr)
        return 1
    ended = json.loads(line)
    if "signal" in ended:  # end as the step did, so the runner sees the same status
        if ended["signal"] not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(ended["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), ended["signal"])
    return int(ended["exit"])


def _handed_over(address: str, argv: list[str]) -> socket.socket | None:
    """A connection on which the server started the step; None when no server took it (none, or stopping)."""
    if len(argv) < 2 or argv[0] != "-m":
        return None
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode() + b"\n"
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(address)
        # The descriptors ride on the first byte; the rest of the line follows.
        socket.send_fds(conn, [request[:1]], [0, 1, 2])
        conn.sendall(request[1:])
        started = read_line(conn)
    except OSError:
        started = b""
    if not started:
        conn.close()
        return None
    return conn


def read_line(conn: socket.socket) -> bytes:
    """One line from ``conn`` (b"" when it closed first); byte by byte, so nothing after the line is buffered."""
    out = bytearray()
    while not out.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            return b""
        out += chunk
    return bytes(out)
