"""The Cloud Build configs, validated against the real Cloud Build API message, plus the two release scripts
(cloudbuild/upload_template.py against a recording server with the real kfp RegistryClient, and
cloudbuild/render_config.py with the release's own arguments)."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.cloud.devtools.cloudbuild_v1.types import Build
from google.protobuf import json_format

from cloudbuild import render_config, upload_template
from ctloop.config import Settings, load_settings
from tests.recording_server import RecordingServer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "cloudbuild.yaml", *sorted((ROOT / "cloudbuild").glob("*.yaml"))]
RELEASE = ROOT / "cloudbuild.yaml"
PR = ROOT / "cloudbuild" / "pr.yaml"

# Substitutions Cloud Build fills in itself (https://cloud.google.com/build/docs/configuring-builds/substitute-variable-values).
BUILTINS = {
    "PROJECT_ID",
    "PROJECT_NUMBER",
    "BUILD_ID",
    "LOCATION",
    "TRIGGER_NAME",
    "TRIGGER_BUILD_CONFIG_PATH",
    "COMMIT_SHA",
    "SHORT_SHA",
    "REVISION_ID",
    "BRANCH_NAME",
    "TAG_NAME",
    "REPO_NAME",
    "REPO_FULL_NAME",
    "REF_NAME",
    "SERVICE_ACCOUNT_EMAIL",
    "SERVICE_ACCOUNT",
    "_HEAD_BRANCH",
    "_BASE_BRANCH",
    "_HEAD_REPO_URL",
    "_PR_NUMBER",
}
# $NAME or ${NAME}, but not $$NAME (Cloud Build's escape for a literal `$` handed to the shell).
SUBSTITUTION = re.compile(r"(?<!\$)\$(?:\{(\w+)\}|([A-Za-z_]\w*))")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path}: expected a mapping"
    return doc


def step_strings(step: dict[str, Any]) -> list[str]:
    values = [step.get("name", ""), step.get("entrypoint", ""), step.get("dir", "")]
    return values + [str(a) for a in step.get("args", [])] + [str(e) for e in step.get("env", [])]


def flag(step: dict[str, Any], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` among a step's args."""
    args = [str(a) for a in step.get("args", [])]
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def step_by_id(doc: dict[str, Any], step_id: str) -> dict[str, Any]:
    matches = [s for s in doc["steps"] if s.get("id") == step_id]
    assert len(matches) == 1, f"expected one step {step_id!r}, found {len(matches)}"
    return matches[0]


# --- generic checks, each returning its problems ------------------------------------------------------------


def image_pinned(ref: str) -> bool:
    """True for ``name@sha256:<digest>`` or ``name:<tag>`` with a tag other than ``latest``."""
    if DIGEST.search(ref):
        return True
    last = ref.rsplit("/", 1)[-1]  # a registry port ("host:5000/x") is not a tag
    if ":" not in last:
        return False
    tag = last.rsplit(":", 1)[1]
    return bool(tag) and tag != "latest"


def unpinned_images(doc: dict[str, Any]) -> list[str]:
    return [step["name"] for step in doc.get("steps", []) if not image_pinned(step["name"])]


def bad_wait_for(doc: dict[str, Any]) -> list[str]:
    """waitFor entries that name no earlier step (Cloud Build only waits on steps defined before)."""
    problems, seen = [], set()
    for index, step in enumerate(doc["steps"]):
        for wanted in step.get("waitFor", []):
            if wanted != "-" and wanted not in seen:
                problems.append(f"step {step.get('id', index)}: waitFor {wanted!r} is not an earlier step id")
        if "id" in step:
            if step["id"] in seen:
                problems.append(f"step id {step['id']!r} is not unique")
            seen.add(step["id"])
    return problems


def substitution_problems(doc: dict[str, Any]) -> list[str]:
    """Used substitutions that are neither built in nor declared, declared ones never used, bad names."""
    declared = set(doc.get("substitutions", {}))
    texts = [t for step in doc["steps"] for t in step_strings(step)]
    texts += [str(v) for v in doc.get("substitutions", {}).values()]
    used = {a or b for text in texts for a, b in SUBSTITUTION.findall(text)}
    problems = [
        f"user substitution {name!r} must start with '_'"
        for name in sorted(declared)
        if not name.startswith("_")
    ]
    problems += [
        f"{name!r} is used but neither built in nor declared" for name in sorted(used - declared - BUILTINS)
    ]
    problems += [
        f"{name!r} is declared but never used (MUST_MATCH fails the build)"
        for name in sorted(declared - used)
    ]
    return problems


# --- every config ---------------------------------------------------------------------------------------


def test_top_level_config_exists() -> None:
    assert RELEASE.is_file()
    assert PR in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_build_message(path: Path) -> None:
    doc = load(path)
    build = Build.from_json(json.dumps(doc), ignore_unknown_fields=False)
    assert len(build.steps) == len(doc["steps"]) > 0
    # The protobuf parser agrees field by field (camelCase JSON names).
    json_format.ParseDict(doc, Build.pb(Build()), ignore_unknown_fields=False)


def test_unknown_fields_are_rejected() -> None:
    doc = load(RELEASE)
    doc["steps"][0]["waitfor"] = doc["steps"][0].pop("waitFor")
    with pytest.raises(json_format.ParseError, match="waitfor"):
        Build.from_json(json.dumps(doc), ignore_unknown_fields=False)
    doc = load(RELEASE)
    doc["option"] = doc.pop("options")
    with pytest.raises(json_format.ParseError, match="option"):
        json_format.ParseDict(doc, Build.pb(Build()), ignore_unknown_fields=False)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_step_images_are_pinned(path: Path) -> None:
    assert unpinned_images(load(path)) == []


def test_image_pin_rule() -> None:
    assert not image_pinned("python")
    assert not image_pinned("python:latest")
    assert not image_pinned("localhost:5000/builder")
    assert image_pinned("python:3.11.14-bookworm")
    assert image_pinned("gcr.io/kaniko-project/executor@sha256:" + "a" * 64)
    assert unpinned_images({"steps": [{"name": "ubuntu"}, {"name": "alpine:3.20"}]}) == ["ubuntu"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_wait_for_names_earlier_steps(path: Path) -> None:
    doc = load(path)
    assert bad_wait_for(doc) == []
    assert all("id" in step for step in doc["steps"]), "every step needs an id to be waited on"


def test_wait_for_rule() -> None:
    doc = {"steps": [{"id": "a", "waitFor": ["b"]}, {"id": "b", "waitFor": ["-", "a"]}, {"id": "a"}]}
    assert bad_wait_for(doc) == ["step a: waitFor 'b' is not an earlier step id", "step id 'a' is not unique"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_substitutions_are_declared_and_used(path: Path) -> None:
    doc = load(path)
    assert substitution_problems(doc) == []
    assert doc["options"]["substitutionOption"] == "MUST_MATCH"
    assert doc["options"]["logging"] == "CLOUD_LOGGING_ONLY"


def test_substitution_rule() -> None:
    doc = {
        "steps": [{"name": "x:1", "args": ["$_MISSING", "$$HOME", "${_USED}", "$SHORT_SHA", "${TYPO}"]}],
        "substitutions": {"_USED": "1", "_IDLE": "2", "NOPREFIX": "$PROJECT_ID"},
    }
    assert substitution_problems(doc) == [
        "user substitution 'NOPREFIX' must start with '_'",
        "'TYPO' is used but neither built in nor declared",
        "'_MISSING' is used but neither built in nor declared",
        "'NOPREFIX' is declared but never used (MUST_MATCH fails the build)",
        "'_IDLE' is declared but never used (MUST_MATCH fails the build)",
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_secrets_in_substitutions(path: Path) -> None:
    for key, value in load(path).get("substitutions", {}).items():
        assert not re.search(r"(?i)secret|token|password|key", key), (
            f"{key}: secrets belong in Secret Manager"
        )
        assert not re.search(r"(?i)-----BEGIN|AIza[0-9A-Za-z_-]{20}", str(value)), key


# --- the image the template names is the image the build produces ---------------------------------------


def kaniko_steps(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Dockerfile path -> kaniko step."""
    return {flag(s, "--dockerfile"): s for s in doc["steps"] if "kaniko-project/executor" in s["name"]}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_compile_pins_the_component_image_this_build_produces(path: Path) -> None:
    doc = load(path)
    builds = kaniko_steps(doc)
    assert set(builds) == {"components/Dockerfile", "serving/Dockerfile", "components/spark/Dockerfile"}
    component = flag(builds["components/Dockerfile"], "--destination")
    compile_step = step_by_id(doc, "compile")
    assert flag(compile_step, "--component-image") == component
    for dockerfile, step in builds.items():
        destination = flag(step, "--destination")
        assert destination and re.search(r":\$(SHORT_SHA|COMMIT_SHA)$", destination), destination
        assert flag(step, "--cache") == "true" and flag(step, "--cache-repo"), f"{dockerfile}: no layer cache"
        assert (ROOT / dockerfile).is_file(), f"{dockerfile} (built by {path.name}) does not exist"


def test_release_pushes_and_pr_does_not() -> None:
    for step in kaniko_steps(load(RELEASE)).values():
        assert "--no-push" not in step["args"]
    for step in kaniko_steps(load(PR)).values():
        assert "--no-push" in step["args"]


def test_release_settings_name_the_pushed_images() -> None:
    doc = load(RELEASE)
    builds = kaniko_steps(doc)
    render = step_by_id(doc, "render-config")
    overrides = dict(a.removeprefix("--set=").split("=", 1) for a in render["args"] if a.startswith("--set="))
    assert overrides["gcp.component_image"] == flag(builds["components/Dockerfile"], "--destination")
    assert overrides["gcp.serving_image"] == flag(builds["serving/Dockerfile"], "--destination")
    assert overrides["gcp.scoring_image"] == flag(builds["components/spark/Dockerfile"], "--destination")
    publish = step_by_id(doc, "publish-config")
    assert set(publish["waitFor"]) >= {"render-config", "build-component-image", "build-serving-image",
                                       "build-scoring-image"}
    upload = step_by_id(doc, "upload-template")
    assert {"compile", "publish-config"} <= set(upload["waitFor"])
    # The monitoring pipeline launches the training template this build uploads, by its commit tag.
    host = next(a.removeprefix("--host=") for a in upload["args"] if a.startswith("--host="))
    tags = next(a.removeprefix("--tags=") for a in upload["args"] if a.startswith("--tags=")).split(",")
    assert overrides["monitoring.training_template"] == f"{host}/ctloop-training/$SHORT_SHA"
    assert "$SHORT_SHA" in tags


def _expand(text: str, doc: dict[str, Any], extra: dict[str, str]) -> str:
    values = {**extra, **doc["substitutions"]}
    for _ in range(3):  # substitution defaults may refer to built-ins (dynamicSubstitutions)
        text = SUBSTITUTION.sub(lambda m: values[m.group(1) or m.group(2)], text)
    return text


def test_release_render_step_produces_valid_settings(tmp_path: Path) -> None:
    """The release's render-config arguments, with the default substitutions, give valid cloud settings."""
    doc = load(RELEASE)
    builtins = {"PROJECT_ID": "ctloop-dev", "SHORT_SHA": "0123abc", "COMMIT_SHA": "0123abc" * 5}
    args = [_expand(str(a), doc, builtins) for a in step_by_id(doc, "render-config")["args"][1:]]
    args = [a.replace("--out=build/", f"--out={tmp_path}/") if a.startswith("--out=") else a for a in args]
    args = [a.replace("--base=", f"--base={ROOT}/") if a.startswith("--base=") else a for a in args]
    assert render_config.main(args) == 0
    rendered = load_settings(tmp_path / "ctloop.cloud.yaml")
    assert rendered.backend == "cloud"
    assert rendered.gcp.component_image == "europe-west4-docker.pkg.dev/ctloop-dev/ctloop/component:0123abc"
    assert rendered.gcp.service_account == "ctloop-pipeline@ctloop-dev.iam.gserviceaccount.com"
    assert rendered.gcp.pipeline_root == "gs://ctloop-dev-pipeline-root/runs"
    assert rendered.monitoring.training_template == (
        "https://europe-west4-kfp.pkg.dev/ctloop-dev/ctloop-pipelines/ctloop-training/0123abc")
    # Everything not overridden comes from ctloop.yaml unchanged.
    assert rendered.model == load_settings(ROOT / "ctloop.yaml").model


def test_render_config_rejects_unknown_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.yaml"
    assert render_config.main([f"--base={ROOT / 'ctloop.yaml'}", f"--out={out}", "--set=gcp.projekt=x"]) == 1
    assert "gcp.projekt" in capsys.readouterr().err
    assert not out.exists()
    assert render_config.main([f"--base={tmp_path / 'missing.yaml'}", f"--out={out}"]) == 1
    assert "missing.yaml" in capsys.readouterr().err


def test_render_config_writes_atomically(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "ctloop.yaml"
    render_config.write_settings(Settings(), out)
    assert Settings.from_param(out.read_text()) == Settings()
    assert [p.name for p in out.parent.iterdir()] == ["ctloop.yaml"]


# --- the function deploy step deploys the function as written -------------------------------------------


def test_deploy_step_matches_the_function_source() -> None:
    """The function deploys the bundle (cloud_functions/trigger + the runtime modules it imports) built here."""
    doc = load(RELEASE)
    step = step_by_id(doc, "deploy-function")
    script = step["args"][-1]
    source = re.search(r"--source=(\S+)", script).group(1)
    entry = re.search(r"--entry-point=(\S+)", script).group(1)
    bundle = step_by_id(doc, "bundle-trigger")
    assert bundle["args"] == ["cloudbuild/bundle_trigger.py", "--out", source]
    assert "bundle-trigger" in step["waitFor"]
    main_py = ROOT / "cloud_functions" / "trigger" / "main.py"
    assert main_py.is_file() and (main_py.parent / "requirements.txt").is_file()
    tree = ast.parse(main_py.read_text())
    assert entry in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "--gen2" in script and "--service-account=" in script
    assert "--trigger-topic=" in script and "--retry" in script


# --- upload_template.py against a recording server, with the real kfp RegistryClient --------------------


TEMPLATE = {
    "pipelineInfo": {"name": "ctloop-training"},
    "root": {"dag": {"tasks": {}}},
    "schemaVersion": "2.1.0",
}


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "pipelines" / "training.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(TEMPLATE))
    return path


def _registry(server: RecordingServer, upload_status: int = 200, tag_status: int = 200) -> str:
    host = f"{server.url}/kfp/ctloop-dev/ctloop-pipelines"
    server.route(
        "POST",
        "/kfp/ctloop-dev/ctloop-pipelines",
        (upload_status, b"ctloop-training/sha256:feed" if upload_status == 200 else {"error": "no"}),
    )
    server.route("POST", "/kfp/ctloop-dev/ctloop-pipelines/packages/ctloop-training/tags", (tag_status, {}))
    server.route("PATCH", r"/kfp/ctloop-dev/ctloop-pipelines/packages/ctloop-training/tags/[^/]+", {})
    return host


def test_upload_template_uploads_and_tags(recording_server: RecordingServer, template: Path) -> None:
    host = _registry(recording_server)
    assert (
        upload_template.main([f"--host={host}", f"--template={template.parent}", "--tags=0123abc,latest"])
        == 0
    )
    (upload,) = recording_server.find("POST", "/kfp/ctloop-dev/ctloop-pipelines")
    assert upload.headers["content-type"].startswith("multipart/form-data")
    assert template.read_bytes() in upload.body
    tags = recording_server.find("POST", "/kfp/ctloop-dev/ctloop-pipelines/packages/ctloop-training/tags")
    assert [t.query["tagId"] for t in tags] == [["0123abc"], ["latest"]]
    assert [t.json for t in tags] == [
        {"name": "", "version": "packages/ctloop-training/versions/sha256:feed"}
    ] * 2


def test_upload_template_moves_existing_tags(recording_server: RecordingServer, template: Path) -> None:
    host = _registry(recording_server, tag_status=409)
    assert upload_template.main([f"--host={host}", f"--template={template}", "--tags=latest"]) == 0
    (patch,) = recording_server.find("PATCH", r".*/packages/ctloop-training/tags/latest")
    assert patch.query["updateMask"] == ["version"]
    assert patch.json["version"] == "packages/ctloop-training/versions/sha256:feed"


def test_upload_template_retried_upload_uses_the_content_digest(
    recording_server: RecordingServer, template: Path
) -> None:
    host = _registry(recording_server, upload_status=409)
    assert upload_template.main([f"--host={host}", f"--template={template}", "--tags=latest"]) == 0
    (tag,) = recording_server.find("POST", r".*/packages/ctloop-training/tags")
    digest = hashlib.sha256(template.read_bytes()).hexdigest()
    assert tag.json["version"] == f"packages/ctloop-training/versions/sha256:{digest}"


def test_upload_template_reports_refusals(
    recording_server: RecordingServer, template: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = _registry(recording_server, upload_status=403)
    assert upload_template.main([f"--host={host}", f"--template={template}", "--tags=latest"]) == 1
    assert "upload refused: HTTP 403" in capsys.readouterr().err
    assert recording_server.find("POST", r".*/tags") == []


def test_upload_template_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_compiled = tmp_path / "x.yaml"
    not_compiled.write_text("a: 1\n")
    assert upload_template.main(["--host=http://127.0.0.1:9", f"--template={not_compiled}"]) == 1
    assert (
        f"{not_compiled}: expected a compiled KFP pipeline with pipelineInfo.name" in capsys.readouterr().err
    )
    assert upload_template.main(["--host=http://127.0.0.1:9", f"--template={tmp_path / 'none'}"]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    assert (
        upload_template.main(["--host=http://127.0.0.1:9", f"--template={tmp_path}", "--tags=sha256:x"]) == 1
    )
    assert "'sha256:x' is not a valid tag" in capsys.readouterr().err


# --- every step finds its tools in its own image ------------------------------------------------------------

# What each step image provides on PATH. Sources: the python image is docker-library's python:3.11-bookworm
# (FROM buildpack-deps:bookworm: make, git, curl, apt); hashicorp/terraform is Alpine with /bin/terraform;
# kaniko's executor image has no shell, only its entrypoint; google-cloud-cli images are Google's
# cloud-sdk-docker builds: `-slim` has gcloud and Python, `-emulators` adds a Java runtime and the Pub/Sub,
# Datastore, Firestore and Bigtable emulators (cloud-sdk-docker emulators/Dockerfile).
_POSIX = {"sh", "cp", "mkdir", "test", "cat", "ls", "rm", "mv", "env"}
IMAGE_TOOLS: dict[str, set[str]] = {
    "python:3.11.14-bookworm": _POSIX | {"bash", "apt-get", "make", "python", "python3", "pip", "git", "curl"},
    "hashicorp/terraform:1.11.4": _POSIX | {"terraform"},
    "gcr.io/kaniko-project/executor:v1.23.2": {"/kaniko/executor"},
    "gcr.io/google.com/cloudsdktool/google-cloud-cli:502.0.0-slim": _POSIX | {"bash", "gcloud", "python3"},
    "gcr.io/google.com/cloudsdktool/google-cloud-cli:502.0.0-emulators": _POSIX | {"bash", "gcloud", "java"},
}
# Images whose Cloud CLI holds the Pub/Sub emulator jar.
PUBSUB_EMULATOR_IMAGES = {"gcr.io/google.com/cloudsdktool/google-cloud-cli:502.0.0-emulators"}
# apt packages a step may install for itself, and the commands they add.
APT_PROVIDES = {"openjdk-17-jre-headless": {"java"}, "default-jre-headless": {"java"}}
# `make test` runs the whole suite: the Spark and Pub/Sub emulator tests need java, tests/test_terraform.py needs
# terraform, the trigger-chain and demo tests need the emulator jar (devtools/emulators.py).
MAKE_TEST_NEEDS = {"java", "terraform", "pubsub-emulator-jar", "python3"}
# Shell keywords keep the next word in command position; builtins are commands the shell itself provides.
SHELL_KEYWORDS = {"if", "then", "else", "elif", "fi", "esac", "do", "done", "while", "until", "{", "}", "!", "in"}
SHELL_BUILTINS = {"echo", "exit", "cd", "export", "set", "true", "false", "test", "[", "local", "read", "printf"}
SEPARATORS = {"&&", "||", ";", ";;", "|", "(", ")", "&"}
_COMMAND = re.compile(r"^[\w./-]+$")


def script_commands(script: str) -> list[str]:
    """The commands a shell script runs: the first word of every simple command, ``$(...)`` included."""
    commands: list[str] = []
    for line in re.sub(r"\\\n", " ", script).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        tokens = list(lexer)
        at_command, skip_to_in = True, False
        for i, token in enumerate(tokens):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            if skip_to_in:
                skip_to_in = token != "in"
                continue
            if token in SEPARATORS:
                at_command = True
            elif not at_command:
                continue
            elif token in ("case", "for"):
                skip_to_in = True
            elif token in SHELL_KEYWORDS or nxt == ")" or re.match(r"^\w+=", token) or not _COMMAND.match(token):
                continue  # keyword, case pattern, assignment, or a word that cannot name a command
            elif token.startswith("-"):
                continue
            else:
                if token not in SHELL_BUILTINS:
                    commands.append(token)
                at_command = False
    return commands


def _ancestors(doc: dict[str, Any], step: dict[str, Any]) -> list[dict[str, Any]]:
    """Steps that finish before ``step`` starts (waitFor, transitively; no waitFor = every earlier step)."""
    steps = doc["steps"]
    index = steps.index(step)
    wanted = step.get("waitFor")
    direct = steps[:index] if wanted is None else [s for s in steps[:index] if s.get("id") in wanted]
    found: list[dict[str, Any]] = []
    for parent in direct:
        for s in [*_ancestors(doc, parent), parent]:
            if s not in found:
                found.append(s)
    return found


def _script(step: dict[str, Any]) -> str:
    args = [str(a) for a in step.get("args", [])]
    if step.get("entrypoint") in ("bash", "sh") and "-c" in " ".join(args[:-1]):
        return args[-1]
    return ""


def _produces(step: dict[str, Any], path: str) -> bool:
    script = _script(step)
    if path.startswith("/workspace/.venv/"):
        return bool(re.search(r"^\s*make (setup|test)\b", script, re.M))
    return bool(re.search(rf"(^|\s){re.escape(path)}(\s|$)", script, re.M))


def step_tool_problems(doc: dict[str, Any]) -> list[str]:
    """Commands a step runs that neither its image, an earlier install in the step, nor a finished step
    provides; for `make test`, the suite's own needs."""
    problems = []
    for step in doc["steps"]:
        sid, image = step.get("id", "?"), step["name"]
        if image not in IMAGE_TOOLS:
            problems.append(f"step {sid}: image {image} is not in IMAGE_TOOLS (record what it provides)")
            continue
        env = dict(str(e).split("=", 1) for e in step.get("env", []))
        path_dirs = env.get("PATH", "").split(":")
        before = _ancestors(doc, step)
        tools = set(IMAGE_TOOLS[image])
        for directory in path_dirs:
            if directory.startswith("/builder/home/"):
                for tool in ("terraform", "java", "gcloud"):
                    if any(_produces(s, f"{directory}/{tool}") for s in before):
                        tools.add(tool)
        script = _script(step)
        for package, provided in APT_PROVIDES.items():
            if re.search(rf"apt-get install\b.*\b{re.escape(package)}\b", script):
                tools |= provided
        commands = [step["entrypoint"]] if step.get("entrypoint") and not script else []
        commands += script_commands(script)
        for command in commands:
            if command.startswith(("/workspace/", "/builder/home/")):
                if not any(_produces(s, command) for s in before):
                    problems.append(f"step {sid}: runs {command}, which no step it waits for creates")
            elif command.startswith(".venv/"):
                if not any(_produces(s, "/workspace/" + command) for s in before):
                    problems.append(f"step {sid}: runs {command}, which no step it waits for creates")
            elif command not in tools:
                problems.append(f"step {sid}: {command!r} is not in image {image}")
        if re.search(r"^\s*make test\b", script, re.M):
            have = set(tools)
            jar = env.get("CTLOOP_PUBSUB_EMULATOR_JAR", "")
            if image in PUBSUB_EMULATOR_IMAGES or (jar and any(_produces(s, jar) for s in before)):
                have.add("pubsub-emulator-jar")
            for need in sorted(MAKE_TEST_NEEDS - have):
                problems.append(f"step {sid}: `make test` needs {need}, which step image {image} lacks")
    return problems


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_step_finds_its_tools_in_its_image(path: Path) -> None:
    doc = load(path)
    assert step_tool_problems(doc) == []
    test_steps = [s for s in doc["steps"] if re.search(r"^\s*make test\b", _script(s), re.M)]
    assert len(test_steps) == 1, "exactly one step runs the test suite"


def test_emulator_step_copies_the_jar_the_test_step_reads() -> None:
    for path in (RELEASE, PR):
        doc = load(path)
        emulator, test = step_by_id(doc, "pubsub-emulator"), step_by_id(doc, "test")
        assert emulator["name"] in PUBSUB_EMULATOR_IMAGES
        jar = dict(str(e).split("=", 1) for e in test["env"])["CTLOOP_PUBSUB_EMULATOR_JAR"]
        assert _produces(emulator, jar) and "pubsub-emulator" in test["waitFor"]
        assert "platform/pubsub-emulator/lib/cloud-pubsub-emulator-*-all.jar" in _script(emulator)
        from devtools.emulators import PUBSUB_JAR_GLOB

        assert PUBSUB_JAR_GLOB in _script(emulator), "the step copies the jar devtools/emulators.py looks for"


def test_script_commands_parses_the_deploy_step() -> None:
    script = step_by_id(load(RELEASE), "deploy-function")["args"][-1]
    assert set(script_commands(script)) == {"gcloud"}
    assert script_commands("root=$(gcloud info)\nmkdir -p x && cp a b | tee c") == ["gcloud", "mkdir", "cp", "tee"]


def test_tool_check_catches_the_test_step_without_the_emulator() -> None:
    doc = load(RELEASE)
    test = step_by_id(doc, "test")
    test["env"] = [e for e in test["env"] if not e.startswith("CTLOOP_PUBSUB_EMULATOR_JAR=")]
    assert step_tool_problems(doc) == [
        "step test: `make test` needs pubsub-emulator-jar, which step image python:3.11.14-bookworm lacks"
    ]


def test_tool_check_catches_missing_tools_and_ordering() -> None:
    doc = load(RELEASE)
    step_by_id(doc, "publish-config")["name"] = "python:3.11.14-bookworm"  # gcloud is not in the python image
    step_by_id(doc, "compile")["waitFor"] = ["-"]  # .venv/bin/ctloop does not exist yet
    test = step_by_id(doc, "test")
    test["args"][-1] = test["args"][-1].replace("openjdk-17-jre-headless", "curl")
    problems = step_tool_problems(doc)
    assert "step publish-config: 'gcloud' is not in image python:3.11.14-bookworm" in problems
    assert "step compile: runs /workspace/.venv/bin/ctloop, which no step it waits for creates" in problems
    assert "step test: `make test` needs java, which step image python:3.11.14-bookworm lacks" in problems
