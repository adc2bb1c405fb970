"""The container engine, the images ``make images`` built, and a Docker API socket for kfp's DockerRunner."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from devtools import images

CONTAINER_WAIT_S = 120


class Containers:
    """Runs containers of the built images; a failure names the image, the step and the container's last lines."""

    def __init__(self, eng: images.Engine) -> None:
        self.engine = eng

    def run(self, image: str, step: str, args: Sequence[str], *, timeout: float = 900) -> str:
        """``run --rm`` to completion; returns the output, or fails the test with its last lines."""
        try:
            proc = self.engine.run(["run", "--rm", "--network", "host", *args], check=False, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"image {image}, step {step}: still running after {timeout:.0f} s")
            raise AssertionError from exc
        if proc.returncode != 0:
            pytest.fail(f"image {image}, step {step}: exit {proc.returncode}; last lines:\n{images.last_lines(proc)}")
        return (proc.stdout or b"").decode(errors="replace") + (proc.stderr or b"").decode(errors="replace")

    def start(self, image: str, name: str, args: Sequence[str]) -> None:
        """``run -d`` under ``name`` (removed by :meth:`stop`)."""
        self.engine.run(["rm", "-f", name], check=False)
        self.engine.run(["run", "-d", "--name", name, "--network", "host", *args])

    def running(self, name: str) -> bool:
        proc = self.engine.run(["inspect", "--format", "{{.State.Running}}", name], check=False)
        return proc.returncode == 0 and proc.stdout.decode().strip() == "true"

    def logs(self, name: str, lines: int = 30) -> str:
        proc = self.engine.run(["logs", "--tail", str(lines), name], check=False)
        return images.last_lines(proc, lines)

    def stop(self, name: str) -> None:
        self.engine.run(["rm", "-f", "-t", "2", name], check=False)


@pytest.fixture(scope="session")
def engine() -> images.Engine:
    eng = images.engine()
    missing = [tag for tag in (images.COMPONENT_IMAGE, images.SERVING_IMAGE, images.SCORING_IMAGE, images.LOCAL_BASE)
               if not eng.exists(tag)]
    if missing:
        pytest.fail(f"images missing: {', '.join(missing)}; build them first with `make images`")
    return eng


@pytest.fixture(scope="session")
def containers(engine: images.Engine) -> Containers:
    return Containers(engine)


@pytest.fixture(scope="session")
def docker_host(engine: images.Engine) -> Iterator[str]:
    """``DOCKER_HOST`` for the docker SDK: podman's Docker API service on a private socket, or Docker's own."""
    if not engine.is_podman:
        yield os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    sock = Path(tempfile.mkdtemp(prefix="ctloop-podman-")) / "podman.sock"
    log = (sock.parent / "service.log").open("wb")
    service = subprocess.Popen([engine.binary, "system", "service", "--time=0", f"unix://{sock}"],
                               env=engine.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if service.poll() is not None or time.monotonic() > deadline:
            service.kill()
            pytest.fail(f"podman system service did not start:\n{(sock.parent / 'service.log').read_text()[-2000:]}")
        time.sleep(0.2)
    try:
        yield f"unix://{sock}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
        log.close()


class _KeepContainers:
    """A docker client whose ``containers.run`` never sets ``auto_remove``, remembering what it started.

    kfp's DockerRunner starts each step with ``auto_remove=True``, then streams its logs and waits for its exit
    code. podman removes the container as it exits and then answers those calls with HTTP 500 "no such
    container" (not the 404 kfp tolerates), failing a step that succeeded; and where it answers 404, kfp
    assumes exit code 0. Kept until removed explicitly, the container always yields its logs and real exit code.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self.started: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    @property
    def containers(self) -> Any:
        outer, collection = self, self._client.containers

        class Containers:
            def __getattr__(self, name: str) -> Any:
                return getattr(collection, name)

            def run(self, *args: Any, **kwargs: Any) -> Any:
                container = collection.run(*args, **{**kwargs, "auto_remove": False})
                outer.started.append(container)
                return container

        return Containers()


@pytest.fixture()
def kfp_steps_removed_after_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """kfp's DockerRunner steps run without ``auto_remove``; each is removed once its exit code is read."""
    import docker
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container

    def run_docker_container(client: Any, *args: Any, **kwargs: Any) -> int:
        kept = _KeepContainers(client)
        try:
            return original(kept, *args, **kwargs)
        finally:
            for container in kept.started:
                with suppress(docker.errors.APIError):  # already gone: nothing left to clean up
                    container.remove(force=True)

    monkeypatch.setattr(docker_task_handler, "run_docker_container", run_docker_container)
