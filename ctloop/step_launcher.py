"""The local step server's launcher: what kfp's SubprocessRunner starts as a step's Python (ctloop/step_server.py).

It hands the step (``-m <module> <args>``, its environment, working directory and stdin/stdout/stderr) to the
server, relays the signals it gets to the step's process group there, and ends as the step ended: its exit code,
or killed by its signal. With no server to take the step it execs the interpreter, and the step runs as a process
of its own. The server writes it out, with its socket and interpreter, as an executable script run as
``python -I -S`` (``main`` is called at its end). It imports only built-in modules (``_socket``, ``_signal``,
``marshal``): their Python wrappers and ``json`` would double its start-up, which every step pays.

Protocol: the launcher sends a 4-byte big-endian length with its descriptors 0-2, then its request (``marshal``:
``{"argv", "env", "cwd"}``); the server answers ``started <pid>``; the launcher sends any number of ``signal <n>``;
the server ends with ``exit <code>`` or ``signal <n>`` (ASCII lines).
"""

import _signal
import _socket
import marshal
import os
import sys

RELAYED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)


def main(address: str, python: str, argv: list[str]) -> int:
    """Run ``python argv`` as a step forked by the server at ``address``, else exec it."""
    conn = _handed_over(address, argv)
    if conn is None:
        os.execv(python, [python, *argv])

    def relay(signum: int, _frame: object) -> None:
        try:  # noqa: SIM105 - contextlib is one more import for every step
            conn.sendall(b"signal %d\n" % signum)
        except OSError:
            pass  # the server is gone: it killed the step's group when it saw us hang up

    for signum in RELAYED_SIGNALS:
        _signal.signal(signum, relay)
    ended = read_line(conn).split()
    if len(ended) != 2:
        print(f"ctloop error: the local step server ({address}) stopped during the step", file=sys.stderr)
        return 1
    how, value = ended[0], int(ended[1])
    if how == b"signal":  # end as the step did, so the runner sees the same status
        if value not in (_signal.SIGKILL, _signal.SIGSTOP):
            _signal.signal(value, _signal.SIG_DFL)
        os.kill(os.getpid(), value)
    return value


def _handed_over(address: str, argv: list[str]) -> "_socket.socket | None":
    """A connection on which the server started the step; None when no server took it (none, or stopping)."""
    if len(argv) < 2 or argv[0] != "-m":
        return None
    request = marshal.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()})
    descriptors = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))  # C ints
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.connect(address)
        conn.sendmsg([len(request).to_bytes(4, "big")], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, descriptors)])
        conn.sendall(request)
        started = read_line(conn)
    except OSError:
        started = b""
    if not started.startswith(b"started "):
        conn.close()
        return None
    return conn


def read_line(conn: "_socket.socket") -> bytes:
    """One line from ``conn`` (b"" when it closed first); byte by byte, so nothing after the line is buffered."""
    out = bytearray()
    while not out.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            return b""
        out += chunk
    return bytes(out)
