"""The local step server: local pipeline steps forked from one interpreter that has imported their modules, instead
of each step starting an interpreter that imports them again.

Why: a fresh step process spends 0.3-1.9 s on the interpreter and its imports (kfp's executor, ctloop,
scikit-learn, pandas, pyarrow, ONNX) before any work: more than a third of the local loop's wall time (bench/).

How: kfp's SubprocessRunner starts a lightweight component as ``sh -ec '... python3 -m kfp.dsl.executor_main ...'``
with ``python3`` replaced by ``sys.executable``. During a local run (``forked_steps``) ``sys.executable`` names the
server's launcher (ctloop/step_launcher.py, a script of built-in modules only): it hands the step's arguments,
environment, working directory and stdin/stdout/stderr to the server, which forks a child that runs the module
as ``python -m`` would, in a process group of its own. The launcher relays its signals to that group and ends as
the step ended; a launcher killed outright hangs up, and the server kills the step's group; a server that dies
takes its steps along. Where no server listens (the first run starts one at its start, which imports for a few
seconds) the launcher execs the interpreter: the step runs as a process of its own, as it always did.

One server per interpreter, code (the stamps of the project's and the installed packages' files: an edit gets a
new server), environment variables read while libraries load (``LOAD_TIME_ENV``) and idle setting. It stops after
``local.step_server_idle_seconds`` with no step (0: no server), or on ``python -m ctloop.local_daemon stop``. It
is single-threaded (one selector loop over its socket, the connections and the children's pidfds), so it forks
from a known state. A forked step differs from a fresh interpreter in that its libraries were loaded by the
server (under the same load-time environment); NumPy's global random state is reseeded from the OS in each step,
as a fresh process seeds it.

The protocol is in ctloop/step_launcher.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import marshal
import os
import pkgutil
import selectors
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Any

from ctloop.config import Settings
from ctloop.local_daemon import DaemonAddress, announce, locked, start_soon

KIND = "steps"
# Environment variables read while the interpreter starts (its flags, the locale of its stdio) and libraries load
# (OpenMP, BLAS, glibc's malloc, Arrow): a step forked from a server started under other values would not behave
# as a fresh process, so they are part of the server's identity.
LOAD_TIME_ENV = ("PYTHON", "LANG", "LC_", "TZ", "LD_", "MALLOC_", "OMP_", "GOMP_", "KMP_", "OPENBLAS_", "MKL_",
                 "BLIS_", "NUMEXPR_", "ARROW_")
# The packages whose files' stamps make the server's identity, besides the installed packages' folder.
SOURCE_PACKAGES = ("ctloop", "components", "pipelines")
# Imported once by the server, besides every component module: what the steps' bodies import on their way.
BODY_IMPORTS = ("kfp.dsl.executor", "ctloop.onnx_export", "onnxruntime", "pandas", "pyarrow.parquet",
                "pyarrow.dataset", "pyarrow.compute")


def server_address(settings: Settings) -> DaemonAddress:
    """The server for this interpreter, code, load-time environment and idle setting."""
    return DaemonAddress.of(KIND, {
        "python": sys.executable, "prefix": sys.prefix, "idle": settings.local.step_server_idle_seconds,
        "env": {k: v for k, v in os.environ.items() if k.startswith(LOAD_TIME_ENV)},
        "code": _code_stamps(),
    })


def _code_stamps() -> list[tuple[str, int, int]]:
    """(path, mtime, size) of the project's source files and of the installed packages' folder (an install or an
    uninstall changes its mtime); a few milliseconds, no import."""
    stamps = []
    for package in SOURCE_PACKAGES:
        spec = find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted(Path(folder).rglob("*.py")):
                st = path.stat()
                stamps.append((str(path), st.st_mtime_ns, st.st_size))
    site = Path(sysconfig.get_paths()["purelib"])
    stamps.append((str(site), site.stat().st_mtime_ns, 0))
    return stamps


@contextlib.contextmanager
def forked_steps(settings: Settings) -> Iterator[Path]:
    """For the steps the KFP local runner starts meanwhile: the server (started now if it neither runs nor is
    starting) and its launcher as ``sys.executable``, which the runner puts in each step's command."""
    address = server_address(settings)
    launcher = _write_launcher(address)
    start_soon(address, [sys.executable, "-m", "ctloop.step_server", "serve", "--socket", str(address.socket),
                         "--idle-seconds", str(settings.local.step_server_idle_seconds)])
    python, sys.executable = sys.executable, str(launcher)
    try:
        yield launcher
    finally:
        sys.executable = python


def _write_launcher(address: DaemonAddress) -> Path:
    """The launcher script for ``address``: its source, then the call with the socket and this interpreter."""
    path = address.socket.with_suffix(".launch")
    if not path.is_file():
        source = Path(__file__).with_name("step_launcher.py").read_text()
        text = (f"#!{sys.executable} -IS\n{source}\n\n"
                f"sys.exit(main({str(address.socket)!r}, {sys.executable!r}, sys.argv[1:]))\n")
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.chmod(0o755)
        partial.replace(path)  # atomic: a concurrent run never starts a half-written launcher
    return path


# --- server -------------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    # Plain writes, not logging: a configured root logger would follow every forked step into its stderr.
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=sys.stderr, flush=True)


def preload() -> list[str]:
    """Import every component module and what the steps' bodies import; returns what failed to import."""
    import components

    names = [m.name for m in pkgutil.iter_modules(components.__path__, "components.") if not m.ispkg]
    failed = []
    for name in [*BODY_IMPORTS, *names]:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a step that needs it imports it (and fails) as before
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    return failed


@dataclass
class _Connection:
    conn: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    pid: int = 0  # the step's process (and process group) once started
    pidfd: int = -1


class _Server:
    def __init__(self, address: DaemonAddress, idle_s: float) -> None:
        self.address = address
        self.idle_s = idle_s
        self.selector = selectors.DefaultSelector()
        self.steps: dict[int, _Connection] = {}  # by pidfd
        self.last_done = time.monotonic()
        self.stop_requested = False

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.address.socket))
        os.chmod(self.address.socket, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, self._accept)
        announce(self.address)
        _log(f"listening on {self.address.socket} (stops after {self.idle_s:.0f} s idle)")
        while not self._stopped():
            for key, _ in self.selector.select(timeout=min(5.0, max(self.idle_s / 4, 0.05))):
                key.data(key.fileobj)
        listener.close()
        _log("stopped")

    def _stopped(self) -> bool:
        if self.steps or not (self.stop_requested or time.monotonic() - self.last_done >= self.idle_s):
            return False
        # The callers' lock: none is starting a server while this one's socket goes.
        with locked(self.address.lock):
            self.address.socket.unlink(missing_ok=True)
            self.address.info.unlink(missing_ok=True)
        return True

    def _accept(self, listener: Any) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        conn.settimeout(10.0)  # a launcher sends its whole request at once
        client, fds, request = _Connection(conn), [], None
        try:
            head, fds, _flags, _addr = socket.recv_fds(conn, 4, 3)
            if len(fds) == 3:  # a launcher's: the length of its request, which follows
                request = marshal.loads(_read_exactly(conn, int.from_bytes(_read_exactly(conn, 4, head), "big")))
            elif head:  # a JSON line: a stop request (ctloop/local_daemon.py)
                client.buffer += head
                request = {"stop": True} if json.loads(self._read_line(client) or b"null") == {"stop": True} else None
        except (OSError, ValueError, EOFError, TypeError):
            request = None
        if not isinstance(request, dict):
            self._close_fds(fds)
            conn.close()
            return
        if request.get("stop"):
            self.stop_requested = True
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"accepted": os.getpid()}).encode() + b"\n")
            conn.close()
            return
        if self.stop_requested:
            self._close_fds(fds)
            conn.close()  # the launcher runs the step itself
            return
        self._start(client, request, fds)

    def _read_line(self, client: _Connection) -> bytes | None:
        while b"\n" not in client.buffer:
            chunk = client.conn.recv(65536)
            if not chunk:
                return None
            client.buffer += chunk
        line, _, rest = bytes(client.buffer).partition(b"\n")
        client.buffer = bytearray(rest)
        return line

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _start(self, client: _Connection, request: dict[str, Any], fds: list[int]) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # nothing of the server's output is left for the child to write again
        server = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: the launcher runs the step itself
            _log(f"could not fork a step: {exc}")
            self._close_fds(fds)
            client.conn.close()
            return
        if pid == 0:
            self._leave(client)
            _die_with(server)
            _run_step(request, fds)  # never returns
        with contextlib.suppress(OSError):  # the child may have done it already (and exited)
            os.setpgid(pid, pid)
        self._close_fds(fds)
        client.pid, client.pidfd = pid, os.pidfd_open(pid)
        self.steps[client.pidfd] = client
        self.selector.register(client.pidfd, selectors.EVENT_READ, self._ended)
        self.selector.register(client.conn, selectors.EVENT_READ, lambda _conn: self._from_launcher(client))
        client.conn.settimeout(None)
        with contextlib.suppress(OSError):
            client.conn.sendall(b"started %d\n" % pid)

    def _leave(self, client: _Connection) -> None:
        """In a forked child: close the server's socket, connections and pidfds (the step must not hold them)."""
        self.selector.close()
        self.listener.close()
        client.conn.close()
        for other in self.steps.values():
            other.conn.close()
            os.close(other.pidfd)

    def _from_launcher(self, client: _Connection) -> None:
        try:
            chunk = client.conn.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:  # the launcher is gone (killed): so is its step
            self.selector.unregister(client.conn)
            self._signal(client, signal.SIGKILL)
            return
        *lines, rest = bytes(client.buffer + chunk).split(b"\n")
        client.buffer = bytearray(rest)  # a line's start, its end still to come
        for line in lines:
            how, _, value = line.partition(b" ")
            if how == b"signal" and value.isdigit():
                self._signal(client, int(value))

    @staticmethod
    def _signal(client: _Connection, signum: int) -> None:
        try:
            os.killpg(client.pid, signum)
        except ProcessLookupError:  # before the child made its group: the child alone
            with contextlib.suppress(ProcessLookupError):
                os.kill(client.pid, signum)

    def _ended(self, pidfd: int) -> None:
        client = self.steps.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(client.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.conn)
        with contextlib.suppress(OSError):
            client.conn.sendall(b"signal %d\n" % -code if code < 0 else b"exit %d\n" % code)
        client.conn.close()
        self.last_done = time.monotonic()


def _read_exactly(conn: socket.socket, size: int, head: bytes = b"") -> bytes:
    """``size`` bytes from ``conn``, of which ``head`` were received already."""
    out = bytearray(head)
    while len(out) < size:
        chunk = conn.recv(size - len(out))
        if not chunk:
            raise EOFError(f"the connection closed {size - len(out)} bytes short")
        out += chunk
    return bytes(out)


def _die_with(server: int) -> None:
    """In a forked child: be killed when the server dies, as its launcher then reports the step failed."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:  # it died before the request took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _run_step(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the step's process (as ``python -m`` would start it), run it, exit."""
    code = 1
    try:
        os.setpgid(0, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            if fd > 2:
                os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path.insert(0, request["cwd"])
        tempfile.tempdir = None  # found again from this step's environment (TMPDIR), as a fresh process would
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # a fresh process seeds it from the OS; a fork would share ours
        _option, module, *args = request["argv"]
        sys.argv = ["-m", *args]  # run_module puts the module's path first
        code = _run_module(module)
    except BaseException:  # noqa: BLE001 - the child must reach os._exit whatever happens
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(code)


def _run_module(module: str) -> int:
    """Run ``module`` as ``__main__`` and end as the interpreter would: returns the exit code, or dies of SIGINT
    after an uncaught KeyboardInterrupt."""
    import atexit
    import runpy

    interrupted, code = False, 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted, code = True, 1
    except BaseException:  # noqa: BLE001 - printed as the interpreter prints an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    # What the interpreter does before it exits: wait for the threads that are not daemons, run atexit.
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _exit_code(code: object) -> int:
    """SystemExit's code as the interpreter exits with it: None is 0, another object is printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None, stdout: IO[str] = sys.stdout) -> int:
    p = argparse.ArgumentParser(prog="python -m ctloop.step_server", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a server (a local run starts one: there is no need to)")
    serve.add_argument("--socket", required=True, type=Path, help="where to listen (its identity's address)")
    serve.add_argument("--idle-seconds", required=True, type=float, help="stop after this long with no step")
    args = p.parse_args(argv)
    sys.path.pop(0)  # our working folder (the temp folder), which ``-m`` put first
    os.environ["_KFP_RUNTIME"] = "true"  # as the steps run: kfp.dsl without its compile-time half
    started = time.monotonic()
    failed = preload()
    gc.collect()
    gc.freeze()  # the steps' collections leave the shared, imported objects alone (and their pages unshared)
    _log(f"imported {len(sys.modules)} modules in {time.monotonic() - started:.2f} s"
         + "".join(f"\n  not imported: {f}" for f in failed))
    _Server(DaemonAddress.at(args.socket), args.idle_seconds).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
