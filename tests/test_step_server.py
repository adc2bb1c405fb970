"""The local step server (ctloop/step_server.py): a step forked by it ends, prints and sees its environment as the
process it replaces would, signals reach it, a killed launcher takes its step along, and with no server the
launcher runs the step itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctloop.config import Settings
from ctloop.local_daemon import DaemonAddress, connect, daemon_pid, process_alive, starting_pid, stop_daemon
from ctloop.step_server import forked_steps, server_address

PROBE = '''
import json, os, sys, time
mode = sys.argv[1]
if mode == "report":
    import numpy
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "path0": sys.path[0], "ppid": os.getppid(),
                      "value": os.environ.get("PROBE_VALUE"), "random": float(numpy.random.random()),
                      "name": __name__, "pgid": os.getpgid(0), "pid": os.getpid()}))
    print("to stderr", file=sys.stderr)
elif mode == "exit":
    sys.exit(int(sys.argv[2]))
elif mode == "kill":
    os.kill(os.getpid(), int(sys.argv[2]))
elif mode == "interrupt":
    raise KeyboardInterrupt
elif mode == "sleep":
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(120)
'''


def _settings(idle: float) -> Settings:
    # A server of the tests' own: the idle setting is part of its identity.
    return Settings().with_overrides({"local.step_server_idle_seconds": idle})


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _start(settings: Settings) -> tuple[DaemonAddress, Path]:
    with forked_steps(settings) as launcher:
        assert sys.executable == str(launcher)
    assert sys.executable != str(launcher)  # restored after the run
    address = server_address(settings)

    def listening() -> bool:
        conn = connect(address.socket)
        if conn is not None:
            conn.close()
        return conn is not None

    _wait(listening, 120, "the step server to listen")
    return address, launcher


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[DaemonAddress, Path]]:
    address, launcher = _start(_settings(600 + time.time_ns() % 100_000 / 1000))
    yield address, launcher
    pid = stop_daemon(address)
    _wait(lambda: pid is None or not process_alive(pid), 30, "the step server to stop")


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    (tmp_path / "probe.py").write_text(PROBE)
    return tmp_path


def _launch(launcher: Path, cwd: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROBE_VALUE": "from the launcher", "_KFP_RUNTIME": "true"}
    return subprocess.run([str(launcher), "-m", "probe", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, **kwargs)  # type: ignore[call-overload]


def test_a_forked_step_runs_as_its_own_process_would(server: tuple[DaemonAddress, Path], probe_dir: Path) -> None:
    address, launcher = server
    first = _launch(launcher, probe_dir, "report", "x y")
    second = _launch(launcher, probe_dir, "report", "x y")
    assert first.returncode == 0, first.stderr
    report, other = json.loads(first.stdout), json.loads(second.stdout)
    assert report["ppid"] == daemon_pid(address)  # forked by the server, not run by the launcher
    assert report["pgid"] == report["pid"]  # a process group of its own, which the server signals
    assert report["argv"] == ["report", "x y"] and report["name"] == "__main__"
    assert report["cwd"] == str(probe_dir) and report["path0"] == str(probe_dir)  # as `python -m` sets it
    assert report["value"] == "from the launcher"
    assert first.stderr.strip() == "to stderr"
    assert report["random"] != other["random"]  # NumPy reseeded in each step, as in a fresh process


@pytest.mark.parametrize(("args", "returncode"), [
    (("exit", "3"), 3), (("kill", str(int(signal.SIGTERM))), -signal.SIGTERM), (("interrupt",), -signal.SIGINT)])
def test_the_launcher_ends_as_its_step_ended(server: tuple[DaemonAddress, Path], probe_dir: Path,
                                             args: tuple[str, ...], returncode: int) -> None:
    result = _launch(server[1], probe_dir, *args)
    assert result.returncode == returncode, result.stderr
    if args[0] == "interrupt":
        assert "KeyboardInterrupt" in result.stderr


def _sleeping_step(launcher: Path, probe_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    pid_file = probe_dir / "step.pid"
    env = {**os.environ, "_KFP_RUNTIME": "true"}
    proc = subprocess.Popen([str(launcher), "-m", "probe", "sleep", str(pid_file)], cwd=probe_dir, env=env,
                            stderr=subprocess.PIPE)
    _wait(pid_file.exists, 30, "the step to start")
    return proc, int(pid_file.read_text())


def test_a_signal_to_the_launcher_reaches_the_step(server: tuple[DaemonAddress, Path], probe_dir: Path) -> None:
    proc, step = _sleeping_step(server[1], probe_dir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    _wait(lambda: not process_alive(step), 10, "the step to end")


def test_a_killed_launcher_takes_its_step_along(server: tuple[DaemonAddress, Path], probe_dir: Path) -> None:
    proc, step = _sleeping_step(server[1], probe_dir)
    assert process_alive(step)
    proc.kill()
    proc.wait(timeout=10)
    _wait(lambda: not process_alive(step), 10, "the server to kill the step")


def test_with_no_server_the_launcher_runs_the_step_itself(tmp_path: Path, probe_dir: Path) -> None:
    # A launcher whose server does not run: the step runs in the launcher's process (it execs the interpreter).
    settings = _settings(600 + time.time_ns() % 100_000 / 1000)
    address, launcher = _start(settings)
    pid = stop_daemon(address)
    assert pid is not None
    _wait(lambda: not process_alive(pid), 30, "the step server to stop")
    assert not address.socket.exists()
    result = _launch(launcher, probe_dir, "report", "alone")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ppid"] == os.getpid() and report["argv"] == ["report", "alone"]


def test_an_idle_server_stops_and_the_identity_follows_the_load_time_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(0.5 + time.time_ns() % 100_000 / 1e9)
    with forked_steps(settings):
        pass
    address = server_address(settings)
    pid = starting_pid(address)
    assert pid is not None
    _wait(lambda: not process_alive(pid), 120, "the idle server to stop")
    log = address.log.read_text()
    assert "listening on" in log and log.rstrip().endswith("stopped")
    assert not address.socket.exists() and not address.info.exists()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # read as OpenMP loads: a server of its own
    assert server_address(settings) != address


def test_a_step_ends_with_its_server_and_its_launcher_says_so(probe_dir: Path) -> None:
    address, launcher = _start(_settings(600 + time.time_ns() % 100_000 / 1000))
    proc, step = _sleeping_step(launcher, probe_dir)
    os.kill(daemon_pid(address), signal.SIGKILL)  # type: ignore[arg-type]
    assert proc.wait(timeout=30) == 1
    assert proc.stderr is not None
    assert proc.stderr.read().decode().strip() == (
        f"ctloop error: the local step server ({address.socket}) stopped during the step")
    _wait(lambda: not process_alive(step), 10, "the step to die with its server")
