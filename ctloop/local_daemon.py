"""Long-lived local helper processes (the local Spark service, the local step server): where one listens, how it
is started once, reached, waited for and asked to stop.

A daemon is named by its kind and an identity (the interpreter, the settings and code it depends on): another
identity gets a daemon of its own. Its files share one stem in the temp folder: the Unix socket, the lock that
callers and the daemon take to start it or to stop it, its log, its description (``.json``, written once it
listens) and the process id of one started but not yet listening (``.starting``). A stop request is the line
``{"stop": true}``, answered with one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctloop.step_launcher import read_line  # built-in modules only: the launcher script carries it

_CONNECT_POLL_S = 0.05
_LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class DaemonAddress:
    """Where one daemon listens and keeps its lock, log and description (same stem, in the temp folder)."""

    socket: Path
    lock: Path
    log: Path
    info: Path
    starting: Path  # the process id of a daemon started but not yet listening

    @classmethod
    def of(cls, kind: str, identity: dict[str, Any]) -> DaemonAddress:
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        # A short path: a Unix socket's name is limited to 107 bytes.
        return cls.at(Path(tempfile.gettempdir()) / f"ctloop-{kind}-{os.getuid()}-{key}.sock")

    @classmethod
    def at(cls, socket_path: Path) -> DaemonAddress:
        """The address whose socket is ``socket_path`` (a daemon is told its socket, rather than work it out again)."""
        return cls(*(Path(socket_path).with_suffix(s) for s in (".sock", ".lock", ".log", ".json", ".starting")))


def connect(path: Path) -> socket.socket | None:
    """A connection to the daemon listening at ``path``, or None (no socket, or one left by a daemon that died)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """The daemon's lock, held by whoever starts it and by the daemon while it stops."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def spawn(address: DaemonAddress, argv: list[str]) -> int:
    """Start ``argv`` detached (a session of its own, output to the log), recorded as starting; under the lock."""
    address.socket.unlink(missing_ok=True)
    with open(address.log, "ab") as log_file:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True, close_fds=True,
            cwd=address.socket.parent)  # not the caller's folder, which may go before the daemon does
    address.starting.write_text(str(process.pid))
    return process.pid


def start_soon(address: DaemonAddress, argv: list[str]) -> None:
    """Start the daemon (``argv``) unless it listens or is starting, without waiting for it."""
    with locked(address.lock):
        conn = connect(address.socket)
        if conn is not None:
            conn.close()
        elif starting_pid(address) is None:
            spawn(address, argv)


def starting_pid(address: DaemonAddress) -> int | None:
    """The process id of a daemon that was started and is still alive but not listening yet, or None."""
    try:
        pid = int(address.starting.read_text())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def process_alive(pid: int) -> bool:
    """The process runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_listening(address: DaemonAddress, pid: int, timeout: float, error: type[Exception],
                   what: str) -> socket.socket:
    """A connection once the daemon ``pid`` listens; ``error`` naming ``what`` when it exits or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = connect(address.socket)
        if conn is not None:
            return conn
        if not process_alive(pid):
            raise error(f"{what}: process {pid} exited while starting; its log (last lines):\n{tail(address.log)}")
        time.sleep(_CONNECT_POLL_S)
    with contextlib.suppress(OSError):
        os.kill(pid, 9)
    raise error(f"{what}: not listening on {address.socket} after {timeout:.0f} s; its log: {address.log}")


def announce(address: DaemonAddress) -> None:
    """Called by the daemon once it listens: its description is written, it is no longer starting."""
    address.info.write_text(json.dumps({"pid": os.getpid(), "prefix": sys.prefix, "socket": str(address.socket)}))
    address.starting.unlink(missing_ok=True)


def daemon_pid(address: DaemonAddress) -> int | None:
    """The process id of the daemon listening at ``address`` (from its description), or None."""
    try:
        return int(json.loads(address.info.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:])
    except OSError:
        return "(no log)"


def stop_daemon(address: DaemonAddress) -> int | None:
    """Ask the daemon at ``address`` to stop once its work is done; its process id, None when none listens."""
    pid = daemon_pid(address)
    conn = connect(address.socket)
    if conn is None:
        return None
    with conn, contextlib.suppress(OSError):
        conn.sendall(b'{"stop": true}\n')
        if read_line(conn):
            return pid
    return None


def described(kind: str = "*", prefix: str | None = None) -> list[tuple[DaemonAddress, int]]:
    """The daemons of ``kind`` ("*": of any kind) of this user (of the environment at ``prefix``, when given) that
    wrote their description: each one's address and process id."""
    found = []
    for info_path in Path(tempfile.gettempdir()).glob(f"ctloop-{kind}-{os.getuid()}-*.json"):
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        if prefix is None or info.get("prefix") == prefix:
            found.append((DaemonAddress.at(info_path.with_suffix(".sock")), int(info["pid"])))
    return found


def stop_daemons(kind: str = "*", prefix: str | None = None) -> list[int]:
    """Ask every daemon of ``kind`` ("*": of any kind) of this user (of the environment at ``prefix``, when given)
    to stop once its work is done; returns their process ids."""
    stopped = [stop_daemon(address) for address, _ in described(kind, prefix)]
    return [pid for pid in stopped if pid is not None]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ctloop.local_daemon", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["stop"], help="stop this environment's daemons once their work is done")
    p.parse_args(argv)
    pids = stop_daemons("*", sys.prefix)
    print(f"stopping {len(pids)} local daemon(s) (Spark service, step server): {pids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
