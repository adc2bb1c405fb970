"""Build the component, serving and scoring images on this machine: ``make images`` (``python -m devtools.images``).

The same Dockerfiles the release builds in Cloud Build, with the base image as a build argument. The release
uses the pinned python image; a machine that reaches no container registry uses a Debian bookworm base made
with debootstrap and imported into podman (built once, then reused). The engine is podman, or Docker where a
Docker daemon answers. podman gets its settings from ``build/containers/containers.conf`` (``CONTAINERS_CONF``):
cgroupfs and runc (crun refuses hybrid cgroups) and no default ulimits.

Builds reach the package index through the machine's TLS proxy: the machine's CA bundle is mounted into each
build, and the local base image points pip and uv at it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ctloop.errors import CtloopError

REPO = Path(__file__).resolve().parents[1]
BUILD_DIR = REPO / "build" / "containers"
CONTAINERS_CONF = """\
# Written by `make images`: podman's defaults fail on hosts with hybrid cgroups and fixed ulimits.
[containers]
default_ulimits = []
pids_limit = 0
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""
RELEASE_BASE = "python:3.11.14-slim-bookworm"
LOCAL_BASE = "localhost/ctloop-base:bookworm"
COMPONENT_IMAGE = "localhost/ctloop-component:local"
SERVING_IMAGE = "localhost/ctloop-serving:local"
SCORING_IMAGE = "localhost/ctloop-scoring:local"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
DEBIAN_PACKAGES = ("podman", "runc", "debootstrap")
# The local base behaves like the python image: `python`/`pip` on PATH, pip may install system-wide, and
# pip/uv trust the system CA store (which a build mounts from the host, proxy CA included).
_BASE_SETUP = """\
set -e
rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
ln -sf /usr/bin/python3 /usr/local/bin/python
ln -sf /usr/bin/pip3 /usr/local/bin/pip
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""
_BASE_ENV = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    f"ENV PIP_CERT={CA_BUNDLE}",
    f"ENV SSL_CERT_FILE={CA_BUNDLE}",
    'CMD ["python3"]',
)


class ImageError(CtloopError):
    """An image could not be built or run; the message names the image, the step and the last output lines."""


@dataclass(frozen=True)
class Image:
    """One image ``make images`` builds: its tag, Dockerfile and build arguments."""

    name: str
    tag: str
    dockerfile: str
    build_args: dict[str, str] = field(default_factory=dict)


def local_images(base: str) -> list[Image]:
    """The component image (with Java, for local Spark inside the container), the serving image and the scoring
    batch's Dataproc container (after the component image, whose lock layer it shares)."""
    return [
        Image("component", COMPONENT_IMAGE, "components/Dockerfile", {"PYTHON_IMAGE": base, "LOCAL_SPARK": "true"}),
        Image("serving", SERVING_IMAGE, "serving/Dockerfile", {"PYTHON_IMAGE": base}),
        Image("scoring", SCORING_IMAGE, "components/spark/Dockerfile", {"PYTHON_IMAGE": base}),
    ]


@dataclass(frozen=True)
class Engine:
    """The container engine CLI and the environment it runs with."""

    binary: str
    env: dict[str, str]

    @property
    def is_podman(self) -> bool:
        return Path(self.binary).name == "podman"

    def run(self, args: Sequence[str], *, check: bool = True, capture: bool = True,
            input_bytes: bytes | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.binary, *args], env=self.env, capture_output=capture, input=input_bytes,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise ImageError(f"{Path(self.binary).name} {' '.join(args[:2])} failed (exit {proc.returncode}):\n"
                             + last_lines(proc))
        return proc

    def exists(self, tag: str) -> bool:
        return self.run(["image", "inspect", tag], check=False).returncode == 0

    def size_mb(self, tag: str) -> float:
        out = self.run(["image", "inspect", "--format", "{{.Size}}", tag]).stdout.decode().strip()
        return int(out) / 1e6

    def ca_mount(self) -> list[str]:
        """The host's CA bundle (its TLS proxy's CA included) over the container's, for pip and uv.

        The bundle file only: a build that installs Java writes its keystore under /etc/ssl/certs/java.
        """
        return ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"] if self.is_podman and Path(CA_BUNDLE).is_file() else []


def last_lines(proc: subprocess.CompletedProcess, lines: int = 30) -> str:
    """The last ``lines`` of a finished process's output (stdout then stderr)."""
    text = b"".join(x for x in (proc.stdout, proc.stderr) if x).decode(errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def say(text: str) -> None:
    print(f"[images] {text}", flush=True)


def write_containers_conf(build_dir: Path = BUILD_DIR) -> Path:
    """``build/containers/containers.conf``, the podman settings this machine kind needs."""
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / "containers.conf"
    if not path.is_file() or path.read_text() != CONTAINERS_CONF:
        path.write_text(CONTAINERS_CONF)
    return path


def _docker_answers() -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    return subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0


def install_debian_packages(packages: Sequence[str]) -> None:
    """``apt-get install`` ``packages`` (root only), saying so first."""
    say(f"installing {', '.join(packages)} from Debian (apt-get); needs root")
    if os.geteuid() != 0:
        raise ImageError(f"{', '.join(packages)} missing and not root: install them with "
                         f"`sudo apt-get install -y {' '.join(packages)}`, or install Docker")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        proc = subprocess.run(cmd, env=env, capture_output=True)
        if proc.returncode != 0:
            raise ImageError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{last_lines(proc)}")


def engine(prefer: str | None = None) -> Engine:
    """podman (installed from Debian when missing) or, where a Docker daemon answers, docker."""
    prefer = prefer or os.environ.get("CTLOOP_CONTAINER_ENGINE")
    if prefer not in (None, "podman", "docker"):
        raise ImageError(f"CTLOOP_CONTAINER_ENGINE: expected podman or docker, found {prefer!r}")
    if prefer == "docker" or (prefer is None and not shutil.which("podman") and _docker_answers()):
        if not _docker_answers():
            raise ImageError("docker: no Docker daemon answers `docker info`")
        return Engine(shutil.which("docker") or "docker", dict(os.environ))
    missing = [p for p in ("podman", "runc") if not shutil.which(p) and not Path(f"/usr/sbin/{p}").exists()]
    if missing:
        install_debian_packages(missing)
    env = {**os.environ, "CONTAINERS_CONF": str(write_containers_conf())}
    return Engine(shutil.which("podman") or "/usr/bin/podman", env)


def _unmount_under(root: Path) -> None:
    """Unmount what debootstrap left mounted inside ``root`` (its /proc), deepest first."""
    prefix = str(root.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def ensure_local_base(eng: Engine, tag: str = LOCAL_BASE, rebuild: bool = False) -> str:
    """A Debian bookworm base with Python 3.11 made with debootstrap and imported as ``tag``; reused once built."""
    if eng.exists(tag) and not rebuild:
        say(f"base {tag}: present, reused")
        return tag
    debootstrap = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists()
                                                  else None)
    if debootstrap is None:
        install_debian_packages(["debootstrap"])
        debootstrap = "/usr/sbin/debootstrap"
    rootfs = BUILD_DIR / "base-rootfs"
    _unmount_under(rootfs)
    # debootstrap removes its /debootstrap work folder when it completes: a finished tree is reused.
    if rebuild or not (rootfs / "usr/bin/python3").exists() or (rootfs / "debootstrap").exists():
        if rootfs.exists():
            shutil.rmtree(rootfs)
        say(f"base {tag}: debootstrap bookworm (minbase, python3) into {rootfs}")
        proc = subprocess.run([debootstrap, "--variant=minbase",
                               "--include=python3,python3-venv,python3-pip,ca-certificates",
                               "bookworm", str(rootfs), "http://deb.debian.org/debian"], capture_output=True)
        _unmount_under(rootfs)
        if proc.returncode != 0:
            raise ImageError(f"image base, step debootstrap (exit {proc.returncode}):\n{last_lines(proc)}")
    proc = subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", _BASE_SETUP], capture_output=True)
    _unmount_under(rootfs)
    if proc.returncode != 0:
        raise ImageError(f"image base, step setup (exit {proc.returncode}):\n{last_lines(proc)}")
    changes = [arg for change in _BASE_ENV for arg in ("--change", change)]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--exclude=./proc/*", "--exclude=./sys/*", "-c", "."],
                           stdout=subprocess.PIPE)
    imported = subprocess.run([eng.binary, "import", *changes, "-", tag], stdin=tar.stdout, env=eng.env,
                              capture_output=True)
    tar.wait()
    if imported.returncode != 0 or tar.returncode != 0:
        raise ImageError(f"image base, step import (exit {imported.returncode}):\n{last_lines(imported)}")
    shutil.rmtree(rootfs)
    say(f"base {tag}: imported, {eng.size_mb(tag):.0f} MB")
    return tag


def build(eng: Engine, image: Image) -> float:
    """Build ``image`` from the repository root (layers cached by the engine); returns its size in MB."""
    args = ["build", "-f", image.dockerfile, "-t", image.tag, *eng.ca_mount()]
    for key, value in image.build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    log = write_containers_conf().parent / f"{image.name}.build.log"
    say(f"{image.name}: building {image.tag} from {image.dockerfile} (log: {log.relative_to(REPO)})")
    with log.open("wb") as out:
        proc = subprocess.run([eng.binary, *args, str(REPO)], env=eng.env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").rstrip().splitlines()[-30:])
        raise ImageError(f"image {image.name} ({image.dockerfile}), build failed (exit {proc.returncode}):\n{tail}")
    return eng.size_mb(image.tag)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.images", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="local",
                        help=f"base image: 'local' (debootstrapped bookworm, {LOCAL_BASE}), 'release' "
                             f"({RELEASE_BASE}) or any image reference")
    parser.add_argument("--engine", choices=("podman", "docker"), default=None)
    parser.add_argument("--rebuild-base", action="store_true", help="debootstrap the local base again")
    args = parser.parse_args(argv)
    try:
        eng = engine(args.engine)
        base = {"local": None, "release": RELEASE_BASE}.get(args.base, args.base)
        if base is None:
            base = ensure_local_base(eng, rebuild=args.rebuild_base)
        sizes = {image.tag: build(eng, image) for image in local_images(base)}
    except ImageError as exc:
        print(f"make images: {exc}", file=sys.stderr)
        return 1
    for tag, size in sizes.items():
        say(f"{tag}: {size:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
