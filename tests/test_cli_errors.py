"""Expected conditions at the command line: one line naming the problem, a non-zero exit, never a traceback.

Each case runs the real ``ctloop`` entry point in its own process, as a user would.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ctloop.config import Settings
from ctloop.registry import LocalRegistry

REPO = Path(__file__).resolve().parents[1]


def _ctloop(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "--workdir", str(workdir), *args],
                          capture_output=True, text=True, cwd=workdir, timeout=120)


def _one_line_failure(done: subprocess.CompletedProcess, code: int = 1) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    (line,) = done.stderr.strip().splitlines()
    return line


@pytest.mark.parametrize(("args", "message"), [
    (("--config", "nope.yaml", "registry"), "Error: settings file nope.yaml does not exist"),
    (("--set", "model.typo=1", "registry"), "Error: settings: model.typo: Extra inputs are not permitted"),
    (("--set", "modle.type=x", "registry"), "Error: override 'modle.type': 'modle' is not a settings section"),
    (("--set", "resources.trian.cpu=2", "registry"), "Error: override 'resources.trian.cpu': 'trian' is not a "
                                                      "settings section"),
    (("extract", "--out", "out"), "Error: ctloop-dev.ctloop.events: expected Parquet files under "),
    (("serve", "--port", "0"), "Error: endpoint 'ctloop-production': no model is deployed to it yet"),
])
def test_expected_conditions_are_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    assert _one_line_failure(_ctloop(tmp_path, *args)).startswith(message)


def test_an_empty_registry_and_no_endpoints_are_said_plainly(tmp_path: Path) -> None:
    registry = _ctloop(tmp_path, "registry")
    assert registry.returncode == 0 and registry.stdout.startswith("no models registered yet in "), registry
    endpoints = _ctloop(tmp_path, "endpoints")
    assert endpoints.returncode == 0, endpoints
    assert endpoints.stdout.splitlines() == ["ctloop-staging  (nothing deployed)",
                                             "ctloop-production  (nothing deployed)"]


def test_serving_on_a_port_in_use_names_the_port(tmp_path: Path) -> None:
    settings = Settings().with_overrides({"local.workdir": str(tmp_path)})
    registry = LocalRegistry(settings.local.registry_db)
    registry.register_version("m", str(tmp_path / "model"), run_key="r1")
    registry.ensure_endpoint(settings.deploy.production_endpoint)
    registry.deploy(settings.deploy.production_endpoint, "m", 1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_line_failure(_ctloop(tmp_path, "serve", "--port", str(port)))
    assert line.startswith(f"Error: serve: cannot listen on 127.0.0.1:{port} (")
    assert line.endswith("); choose another --port")


@pytest.mark.slow
def test_a_run_without_landing_data_says_where_it_looked(tmp_path: Path) -> None:
    done = _ctloop(tmp_path, "run", "--run-id", "no-data")
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr, done
    last = done.stdout.strip().splitlines()[-1]
    assert last == (f"error: extract: ctloop-dev.ctloop.events: expected Parquet files under "
                    f"{tmp_path.resolve()}/landing/ctloop/events, found none (write sample data with "
                    f"`ctloop sample-data`)")
