"""Terraform checks that need no cloud and no provider download: fmt, checkov, and wiring read from the HCL.

`terraform validate`/`plan` need the google provider from the registry, which is unreachable here; the
wiring tests below cover the references that matter, and checkov runs from .venv-tools (`make test`).
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml
from hcl2.utils import SerializationOptions

ROOT = Path(__file__).resolve().parents[1]
TF_DIR = ROOT / "terraform"
TOOLS_BIN = ROOT / ".venv-tools" / "bin"

# Resource types this configuration uses, split by whether the provider gives them a `labels` argument.
# A new type must join one of the two sets (test_every_resource_type_is_classified): labelling is a decision.
LABELABLE = {
    "google_artifact_registry_repository",
    "google_bigquery_dataset",
    "google_bigquery_table",
    "google_cloudfunctions2_function",
    "google_pubsub_subscription",
    "google_pubsub_topic",
    "google_storage_bucket",
    "google_vertex_ai_feature_online_store",
    "google_vertex_ai_feature_online_store_featureview",
}
NOT_LABELABLE = {
    "google_artifact_registry_repository_iam_member",
    "google_bigquery_dataset_iam_member",
    "google_cloud_run_service_iam_member",
    "google_cloud_scheduler_job",
    "google_cloudbuild_trigger",  # has `tags`, not labels
    "google_compute_firewall",
    "google_compute_network",
    "google_compute_subnetwork",
    "google_project_iam_audit_config",
    "google_project_iam_member",
    "google_project_service",
    "google_pubsub_subscription_iam_member",
    "google_pubsub_topic_iam_member",
    "google_service_account",
    "google_service_account_iam_member",
    "google_storage_bucket_iam_member",
    "google_storage_bucket_object",
    "google_storage_notification",
}
REQUIRED_LABELS = {"app", "env", "component"}
PRIMITIVE_ROLES = re.compile(r"\broles/(owner|editor|viewer)\b")
PUBLIC_MEMBERS = re.compile(r"\b(allUsers|allAuthenticatedUsers)\b")


# --- loading -----------------------------------------------------------------------------------------------


_PLAIN = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)


def load_config(tf_dir: Path = TF_DIR) -> dict[str, Any]:
    """Every top-level block of every *.tf file, merged: {"resource": {type: {name: body}}, "data": ...}."""
    options = _PLAIN
    merged: dict[str, Any] = {"resource": {}, "data": {}, "variable": {}, "output": {}, "locals": {}}
    files = sorted(p for p in tf_dir.rglob("*.tf") if ".terraform" not in p.parts)
    assert files, f"no *.tf files under {tf_dir}"
    for path in files:
        with path.open() as handle:
            parsed = hcl2.load(handle, serialization_options=options)
        for kind in ("resource", "data"):
            for block in parsed.get(kind, []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        merged[kind].setdefault(rtype, {})[name] = body
        for kind in ("variable", "output"):
            for block in parsed.get(kind, []):
                merged[kind].update(block)
        for block in parsed.get("locals", []):
            merged["locals"].update(block)
    return merged


@pytest.fixture(scope="module")
def cfg() -> dict[str, Any]:
    return load_config()


def resources(cfg: dict[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return cfg["resource"].get(rtype, {})


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def referenced(expr: Any, rtype: str) -> set[str]:
    """Names of ``rtype`` resources an expression refers to ({"landing_events"} for google_pubsub_topic)."""
    found: set[str] = set()
    for text in strings(expr):
        found.update(re.findall(rf"(?<![\w.]){re.escape(rtype)}\.(\w+)", text))
    return found


def block(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The single nested block ``name`` of a resource body ({} when absent)."""
    value = body.get(name)
    if isinstance(value, list):
        return value[0] if value else {}
    return value or {}


def dynamic_block(body: dict[str, Any], name: str) -> dict[str, Any]:
    for dyn in body.get("dynamic", []):
        if name in dyn:
            return block(dyn[name], "content")
    return {}


# --- wiring checks (each returns the problems it finds, so the negative tests can prove it can fail) ----


def check_notification_feeds_function(cfg: dict[str, Any]) -> list[str]:
    """Every landing notification (training data; the score prefix, terraform/scoring.tf) publishes to the one
    topic the function is triggered from, in both delivery modes."""
    problems: list[str] = []
    notifications = resources(cfg, "google_storage_notification")
    if "landing" not in notifications:
        return [f"expected the google_storage_notification 'landing', found {sorted(notifications)}"]
    topics: set[str] = set()
    for name, notification in sorted(notifications.items()):
        topics |= referenced(notification.get("topic"), "google_pubsub_topic")
        if notification.get("event_types") != ["OBJECT_FINALIZE"]:
            problems.append(f"notification {name} event_types: expected ['OBJECT_FINALIZE'], found "
                            f"{notification.get('event_types')}")
        if notification.get("payload_format") != "JSON_API_V1":
            problems.append(f"notification {name} payload_format: expected JSON_API_V1, found "
                            f"{notification.get('payload_format')}")
        if not notification.get("object_name_prefix"):
            problems.append(
                f"notification {name}: object_name_prefix is not set (every object in the bucket would trigger)"
            )
    if len(topics) != 1:
        return problems + [f"notification topic: expected one google_pubsub_topic reference, found {topics}"]

    functions = resources(cfg, "google_cloudfunctions2_function")
    if len(functions) != 1:
        return problems + [f"expected one google_cloudfunctions2_function, found {sorted(functions)}"]
    (fn_name,) = functions
    function = functions[fn_name]

    # Eventarc delivery: the function's own trigger.
    trigger = dynamic_block(function, "event_trigger") or block(function, "event_trigger")
    if referenced(trigger.get("pubsub_topic"), "google_pubsub_topic") != topics:
        problems.append(
            f"function event_trigger.pubsub_topic: expected {topics}, found {trigger.get('pubsub_topic')}"
        )
    if trigger.get("retry_policy") != "RETRY_POLICY_RETRY":
        problems.append(
            f"function event_trigger.retry_policy: expected RETRY_POLICY_RETRY, found "
            f"{trigger.get('retry_policy')}"
        )

    # Push delivery: the managed subscription on that topic, pushing to the function, with dead-lettering.
    pushes = {
        name: body
        for name, body in resources(cfg, "google_pubsub_subscription").items()
        if block(body, "push_config")
    }
    if len(pushes) != 1:
        return problems + [f"expected one push subscription, found {sorted(pushes)}"]
    (sub,) = pushes.values()
    if referenced(sub.get("topic"), "google_pubsub_topic") != topics:
        problems.append(f"push subscription topic: expected {topics}, found {sub.get('topic')}")
    push = block(sub, "push_config")
    if f"google_cloudfunctions2_function.{fn_name}.service_config[0].uri" not in push.get(
        "push_endpoint", ""
    ):
        problems.append(f"push endpoint is not the function's URL: {push.get('push_endpoint')}")
    if not block(push, "oidc_token").get("service_account_email"):
        problems.append("push subscription: no oidc_token (the function is not publicly invokable)")
    dead = block(sub, "dead_letter_policy")
    dead_topics = referenced(dead.get("dead_letter_topic"), "google_pubsub_topic")
    if not dead_topics or dead_topics & topics:
        problems.append(
            f"dead_letter_policy.dead_letter_topic: expected a separate topic, found {dead_topics}"
        )
    if not dead.get("max_delivery_attempts"):
        problems.append("dead_letter_policy.max_delivery_attempts is not set")
    if not block(sub, "retry_policy"):
        problems.append("push subscription: no retry_policy (no backoff between attempts)")
    return problems


def check_function_acts_as_pipeline(cfg: dict[str, Any]) -> list[str]:
    """The function's SA holds serviceAccountUser on the pipeline SA itself, and nowhere project-wide."""
    (function,) = resources(cfg, "google_cloudfunctions2_function").values()
    fn_sas = referenced(
        block(function, "service_config").get("service_account_email"), "google_service_account"
    )
    pipeline_sas = referenced(
        cfg["output"].get("pipeline_service_account", {}).get("value"), "google_service_account"
    )
    if len(fn_sas) != 1 or len(pipeline_sas) != 1:
        return [f"function SA {fn_sas} / pipeline SA {pipeline_sas}: expected one each"]
    (fn_sa,), (pipeline_sa,) = fn_sas, pipeline_sas
    if fn_sa == pipeline_sa:
        return [f"the function runs as the pipeline SA {pipeline_sa!r}: it needs its own service account"]
    problems = []
    granted = [
        body
        for body in resources(cfg, "google_service_account_iam_member").values()
        if body.get("role") == "roles/iam.serviceAccountUser"
        and referenced(body.get("service_account_id"), "google_service_account") == {pipeline_sa}
        and referenced(body.get("member"), "google_service_account") == {fn_sa}
    ]
    if not granted:
        problems.append(
            f"no roles/iam.serviceAccountUser binding on google_service_account.{pipeline_sa} "
            f"for google_service_account.{fn_sa}"
        )
    for name, body in resources(cfg, "google_project_iam_member").items():
        roles = [body.get("role", "")] + [
            s for s in strings(body.get("for_each", [])) if s.startswith("roles/")
        ]
        if any(r in ("roles/iam.serviceAccountUser", "roles/iam.serviceAccountTokenCreator") for r in roles):
            problems.append(f"google_project_iam_member.{name}: service-account roles granted project-wide")
    return problems


def check_no_public_members(cfg: dict[str, Any]) -> list[str]:
    return [
        f"{text!r} grants public access" for text in strings(cfg["resource"]) if PUBLIC_MEMBERS.search(text)
    ]


def check_no_primitive_roles(cfg: dict[str, Any]) -> list[str]:
    return [
        f"primitive role in {text!r}" for text in strings(cfg["resource"]) if PRIMITIVE_ROLES.search(text)
    ]


def check_labels(cfg: dict[str, Any]) -> list[str]:
    """Every labelable resource carries app, env (via local.labels) and its own component label."""
    local_labels = cfg["locals"].get("labels", {})
    problems = [] if {"app", "env"} <= set(local_labels) else [f"local.labels lacks app/env: {local_labels}"]
    for rtype in sorted(LABELABLE):
        for name, body in resources(cfg, rtype).items():
            labels = body.get("labels")
            if isinstance(labels, dict):
                keys = set(labels)
            elif isinstance(labels, str) and "local.labels" in labels:
                keys = {"app", "env"} | set(re.findall(r"(\w+)\s*=", labels))
            else:
                keys = set()
            missing = REQUIRED_LABELS - keys
            if missing:
                problems.append(f"{rtype}.{name}: labels missing {sorted(missing)} (found {labels!r})")
    return problems


def check_buckets_private(cfg: dict[str, Any]) -> list[str]:
    problems = []
    for name, body in resources(cfg, "google_storage_bucket").items():
        if body.get("public_access_prevention") != "enforced":
            problems.append(
                f"google_storage_bucket.{name}: public_access_prevention is "
                f"{body.get('public_access_prevention')!r}, expected 'enforced'"
            )
        if body.get("uniform_bucket_level_access") is not True:
            problems.append(f"google_storage_bucket.{name}: uniform_bucket_level_access is not true")
    return problems


# --- the checks on the real configuration, and proof that each can fail ------------------------------------


def test_notification_topic_is_the_function_trigger_topic(cfg: dict[str, Any]) -> None:
    assert check_notification_feeds_function(cfg) == []


def test_notification_check_catches_a_miswired_topic(cfg: dict[str, Any]) -> None:
    broken = copy.deepcopy(cfg)
    for notification in resources(broken, "google_storage_notification").values():
        notification["topic"] = "${google_pubsub_topic.dead_letter.id}"
    problems = check_notification_feeds_function(broken)
    assert any("event_trigger.pubsub_topic" in p for p in problems)
    assert any("push subscription topic" in p for p in problems)
    # One notification on another topic than the rest: the function would miss its objects.
    split = copy.deepcopy(cfg)
    resources(split, "google_storage_notification")["scoring"]["topic"] = "${google_pubsub_topic.dead_letter.id}"
    assert any("expected one google_pubsub_topic reference" in p for p in check_notification_feeds_function(split))


def test_function_sa_can_act_as_pipeline_sa(cfg: dict[str, Any]) -> None:
    assert check_function_acts_as_pipeline(cfg) == []


def test_act_as_check_catches_a_missing_binding(cfg: dict[str, Any]) -> None:
    broken = copy.deepcopy(cfg)
    bindings = resources(broken, "google_service_account_iam_member")
    for name in [
        n
        for n, b in bindings.items()
        if "google_service_account.trigger.email" in b.get("member", "")
        and "pipeline" in b.get("service_account_id", "")
    ]:
        del bindings[name]
    assert any(
        "no roles/iam.serviceAccountUser binding" in p for p in check_function_acts_as_pipeline(broken)
    )
    broken["resource"]["google_project_iam_member"]["wide"] = {
        "role": "roles/iam.serviceAccountUser",
        "member": "serviceAccount:x",
    }
    assert any("project-wide" in p for p in check_function_acts_as_pipeline(broken))


def test_no_public_members(cfg: dict[str, Any]) -> None:
    assert check_no_public_members(cfg) == []


def test_public_member_check_catches_all_users(cfg: dict[str, Any]) -> None:
    broken = copy.deepcopy(cfg)
    broken["resource"]["google_cloud_run_service_iam_member"]["open"] = {
        "role": "roles/run.invoker",
        "member": "allUsers",
    }
    assert check_no_public_members(broken) == ["'allUsers' grants public access"]


def test_no_primitive_roles(cfg: dict[str, Any]) -> None:
    assert check_no_primitive_roles(cfg) == []


def test_primitive_role_check_catches_editor(cfg: dict[str, Any]) -> None:
    broken = copy.deepcopy(cfg)
    broken["resource"]["google_project_iam_member"]["pipeline"]["for_each"] = '${toset(["roles/editor"])}'
    assert len(check_no_primitive_roles(broken)) == 1


def test_every_resource_type_is_classified(cfg: dict[str, Any]) -> None:
    used = set(cfg["resource"])
    assert used - LABELABLE - NOT_LABELABLE == set(), "classify new resource types as labelable or not"
    assert used >= LABELABLE, f"labelable types listed but unused: {sorted(LABELABLE - used)}"


def test_every_labelable_resource_is_labelled(cfg: dict[str, Any]) -> None:
    assert check_labels(cfg) == []


def test_label_check_catches_an_unlabelled_bucket(cfg: dict[str, Any]) -> None:
    broken = copy.deepcopy(cfg)
    del broken["resource"]["google_storage_bucket"]["staging"]["labels"]
    broken["resource"]["google_pubsub_topic"]["dead_letter"]["labels"] = "${local.labels}"
    problems = check_labels(broken)
    assert len(problems) == 2
    assert any("google_storage_bucket.staging" in p for p in problems)
    assert any("google_pubsub_topic.dead_letter: labels missing ['component']" in p for p in problems)


def test_buckets_enforce_public_access_prevention(cfg: dict[str, Any]) -> None:
    assert set(resources(cfg, "google_storage_bucket")) == {"landing", "pipeline_root", "staging"}
    assert check_buckets_private(cfg) == []


def test_bucket_check_catches_inherited_prevention(cfg: dict[str, Any]) -> None:
    broken = copy.deepcopy(cfg)
    broken["resource"]["google_storage_bucket"]["landing"]["public_access_prevention"] = "inherited"
    assert check_buckets_private(broken) == [
        "google_storage_bucket.landing: public_access_prevention is 'inherited', expected 'enforced'"
    ]


def test_bucket_roles_are_bucket_level(cfg: dict[str, Any]) -> None:
    for name, body in resources(cfg, "google_project_iam_member").items():
        assert "roles/storage." not in json.dumps(body), (
            f"google_project_iam_member.{name}: storage role project-wide"
        )
    owners = {
        body["bucket"]
        for body in resources(cfg, "google_storage_bucket_iam_member").values()
        if body["role"] in ("roles/storage.objectAdmin", "roles/storage.objectUser") and "pipeline" in body["member"]
    }
    pipeline_admin = resources(cfg, "google_storage_bucket_iam_member")["pipeline_owns_objects"]["for_each"]
    assert set(pipeline_admin) == {"pipeline_root", "staging"}, owners


def test_versioned_buckets_expire_old_versions_and_staging_expires_temp_output(cfg: dict[str, Any]) -> None:
    for name, body in resources(cfg, "google_storage_bucket").items():
        assert block(body, "versioning").get("enabled") is True, name
        conditions = [block(rule, "condition") for rule in body.get("lifecycle_rule", [])]
        assert any("days_since_noncurrent_time" in c for c in conditions), (
            f"{name}: old versions never expire"
        )
    staging_rules = resources(cfg, "google_storage_bucket")["staging"]["lifecycle_rule"]
    temp = [block(r, "condition") for r in staging_rules if block(r, "condition").get("matches_prefix")]
    assert temp and "tmp/" in temp[0]["matches_prefix"] and temp[0].get("age")


def test_function_source_is_the_trigger_bundle_named_by_content_hash(cfg: dict[str, Any]) -> None:
    archive = cfg["data"]["archive_file"]["trigger_source"]
    source_dir = archive["source_dir"].replace("${path.module}", str(TF_DIR))
    # The bundle (function + the ctloop modules it imports) is what `make trigger-bundle` writes.
    assert Path(source_dir).resolve() == ROOT / "build" / "trigger-function"
    makefile = (ROOT / "Makefile").read_text()
    assert "build/trigger-function" in makefile or "bundle_trigger" in makefile
    assert (ROOT / "cloud_functions" / "trigger" / "main.py").is_file()
    assert (ROOT / "cloud_functions" / "trigger" / "requirements.txt").is_file()
    obj = resources(cfg, "google_storage_bucket_object")["trigger_source"]
    assert "data.archive_file.trigger_source.output_md5" in obj["name"]
    (function,) = resources(cfg, "google_cloudfunctions2_function").values()
    storage = block(block(block(function, "build_config"), "source"), "storage_source")
    assert referenced(storage["object"], "google_storage_bucket_object") == {"trigger_source"}


def _entry_points(main_py: Path) -> set[str]:
    tree = ast.parse(main_py.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any("cloud_event" in ast.unparse(d) for d in node.decorator_list)
    }


def test_function_entry_point_and_env_match_the_function_code(cfg: dict[str, Any]) -> None:
    (function,) = resources(cfg, "google_cloudfunctions2_function").values()
    entry = block(function, "build_config")["entry_point"]
    assert entry in _entry_points(ROOT / "cloud_functions" / "trigger" / "main.py")
    settings_py = (ROOT / "cloud_functions" / "trigger" / "ctloop_trigger" / "settings.py").read_text()
    known = set(re.findall(r'_(?:env|list|number)\(environ, "(\w+)"', settings_py))
    env_expr = block(function, "service_config")["environment_variables"]
    names = set(re.findall(r"CTLOOP_TRIGGER_(\w+)\s*=", env_expr))
    assert {"BUCKET", "TEMPLATE", "CONFIG", "BACKEND", "PREFIX"} <= names
    assert names <= known, f"env vars the function does not read: {sorted(names - known)}"


def test_function_is_internal_and_has_its_own_identity(cfg: dict[str, Any]) -> None:
    (function,) = resources(cfg, "google_cloudfunctions2_function").values()
    service = block(function, "service_config")
    assert service["ingress_settings"] == "ALLOW_INTERNAL_ONLY"
    assert referenced(service["service_account_email"], "google_service_account") == {"trigger"}
    invokers = [
        b
        for b in resources(cfg, "google_cloud_run_service_iam_member").values()
        if b["role"] in ("roles/run.invoker", "roles/run.servicesInvoker")
    ]
    assert [referenced(b["member"], "google_service_account") for b in invokers] == [{"trigger_invoker"}]


def _cloudbuild_substitutions(path: Path) -> set[str]:
    return set(yaml.safe_load(path.read_text())["substitutions"])


def test_trigger_substitutions_match_the_build_configs(cfg: dict[str, Any]) -> None:
    """substitutionOption MUST_MATCH: a trigger passing an undeclared (or missing a declared) key fails."""
    triggers = resources(cfg, "google_cloudbuild_trigger")
    release_keys = set(cfg["locals"]["release_substitutions"])
    assert triggers["release"]["filename"] == "cloudbuild.yaml"
    assert release_keys == _cloudbuild_substitutions(ROOT / "cloudbuild.yaml")
    assert triggers["pr_checks"]["filename"] == "cloudbuild/pr.yaml"
    assert set(triggers["pr_checks"]["substitutions"]) == _cloudbuild_substitutions(
        ROOT / "cloudbuild" / "pr.yaml"
    )
    pr_push = block(block(triggers["pr_checks"], "github"), "push")
    assert pr_push["branch"] == "^main$" and pr_push["invert_regex"] is True
    for trigger in triggers.values():
        assert referenced(trigger["service_account"], "google_service_account") == {"build"}


def test_environment_files() -> None:
    variables = load_config()["variable"]
    required = {name for name, body in variables.items() if "default" not in body}
    for env in ("dev", "prod"):
        tfvars = hcl2.loads((TF_DIR / "envs" / f"{env}.tfvars").read_text(), serialization_options=_PLAIN)
        assert tfvars["env"] == env
        assert required <= set(tfvars), f"envs/{env}.tfvars lacks {sorted(required - set(tfvars))}"
        assert set(tfvars) <= set(variables), (
            f"envs/{env}.tfvars sets unknown {sorted(set(tfvars) - set(variables))}"
        )
        backend = hcl2.loads(
            (TF_DIR / "envs" / f"{env}.gcs.tfbackend").read_text(), serialization_options=_PLAIN
        )
        assert set(backend) == {"bucket", "prefix"} and env in backend["prefix"]


def test_outputs_cover_the_ctloop_settings() -> None:
    outputs = load_config()["output"]
    for name in (
        "landing_bucket",
        "pipeline_root",
        "staging_bucket",
        "bq_dataset",
        "bq_table",
        "images_repository",
        "templates_repository",
        "pipeline_service_account",
        "notification_topic",
        "ctloop_settings",
    ):
        assert name in outputs, f"output {name} missing"


def test_serving_account_flows_from_terraform_into_the_settings(cfg: dict[str, Any]) -> None:
    """Deployed models run as the Terraform-made serving SA: the release renders it into the triggered runs'
    settings, and the settings output names it for manual runs."""
    sa = "google_service_account.serving"
    assert sa.split(".")[1] in cfg["resource"]["google_service_account"]
    assert sa in cfg["locals"]["release_substitutions"]["_SERVING_SA"]
    assert sa in json.dumps(cfg["output"]["ctloop_settings"]["value"])
    (render,) = [s for s in yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())["steps"]
                 if s.get("id") == "render-config"]
    assert "--set=gcp.serving_service_account=${_SERVING_SA}" in render["args"]


# --- tools ----------------------------------------------------------------------------------------------


def _terraform() -> str:
    path = shutil.which("terraform")
    assert path, "terraform is not on PATH (CI copies it from the pinned hashicorp/terraform image)"
    return path


def _tool(name: str) -> Path:
    path = TOOLS_BIN / name
    assert path.is_file(), f"{path} is missing: `make test` installs .venv-tools from requirements-tools.lock"
    return path


def test_terraform_fmt_is_clean() -> None:
    run = subprocess.run(
        [_terraform(), "fmt", "-check", "-recursive", "-diff", str(TF_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, f"terraform fmt would change:\n{run.stdout}{run.stderr}"


def test_terraform_fmt_check_fails_on_unformatted_code(tmp_path: Path) -> None:
    (tmp_path / "bad.tf").write_text('variable "x" {\ntype=string\n}\n')
    run = subprocess.run(
        [_terraform(), "fmt", "-check", "-recursive", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0


def _checkov(directory: Path, *extra: str) -> dict[str, Any]:
    run = subprocess.run(
        [
            str(_tool("checkov")),
            "-d",
            str(directory),
            "--framework",
            "terraform",
            "--skip-download",
            "--output",
            "json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.stdout.strip(), f"checkov printed nothing (exit {run.returncode}):\n{run.stderr[-2000:]}"
    report = json.loads(run.stdout)
    return report[0] if isinstance(report, list) else report


@pytest.fixture(scope="module")
def checkov_report() -> dict[str, Any]:
    return _checkov(TF_DIR)


def test_checkov_passes_with_only_justified_skips(checkov_report: dict[str, Any]) -> None:
    summary = checkov_report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in checkov_report["results"].get("failed_checks", [])]
    assert summary["failed"] == 0, f"checkov failures: {failed}"
    assert summary["parsing_errors"] == 0
    assert summary["passed"] >= 40, summary
    for check in checkov_report["results"].get("skipped_checks", []):
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) >= 20, (
            f"{check['check_id']} on {check['resource']}: skip needs a reason, found {reason!r}"
        )


def test_checkov_fails_a_public_bucket(tmp_path: Path) -> None:
    (tmp_path / "main.tf").write_text(
        'resource "google_storage_bucket" "b" {\n  name     = "b"\n  location = "EU"\n}\n'
        'resource "google_storage_bucket_iam_member" "m" {\n  bucket = "b"\n'
        '  role   = "roles/storage.objectViewer"\n  member = "allUsers"\n}\n'
    )
    report = _checkov(tmp_path, "--check", "CKV_GCP_28,CKV_GCP_114")
    failed = {c["check_id"] for c in report["results"]["failed_checks"]}
    assert failed == {"CKV_GCP_28", "CKV_GCP_114"}


# --- deployment prerequisites: network, apply order, build identity, batch markers, audited skips ----------


def check_dataproc_network(cfg: dict[str, Any]) -> list[str]:
    """A custom-mode network, a subnetwork with Private Google Access, an ingress rule open inside it, the
    Compute API enabled, and the subnetwork in the settings Terraform hands to ctloop."""
    problems = []
    services = set(re.findall(r"([\w.]+\.googleapis\.com)", str(cfg["locals"].get("services", ""))))
    if "compute.googleapis.com" not in services:
        problems.append("compute.googleapis.com is not enabled (local.services)")
    networks = resources(cfg, "google_compute_network")
    if not networks or any(n.get("auto_create_subnetworks") is not False for n in networks.values()):
        problems.append("expected a custom-mode google_compute_network (auto_create_subnetworks = false)")
    # The Dataproc agent reaches its control API (and Private Google Access its APIs) by the default route.
    if any(n.get("delete_default_routes_on_create") for n in networks.values()):
        problems.append("the network deletes its default route: Dataproc's agent needs it")
    subnets = resources(cfg, "google_compute_subnetwork")
    if len(subnets) != 1:
        return problems + [f"expected one google_compute_subnetwork, found {sorted(subnets)}"]
    (subnet_name, subnet), = subnets.items()
    if subnet.get("private_ip_google_access") is not True:
        problems.append(f"google_compute_subnetwork.{subnet_name}: private_ip_google_access is not true")
    intra = [
        f for f in resources(cfg, "google_compute_firewall").values()
        if f.get("direction", "INGRESS") == "INGRESS"
        and f.get("source_ranges") == [f"${{google_compute_subnetwork.{subnet_name}.ip_cidr_range}}"]
        and any(block_item.get("protocol") == "all" for block_item in f.get("allow", []))
        and referenced(f.get("network"), "google_compute_network") == referenced(subnet.get("network"),
                                                                                  "google_compute_network")
    ]
    if not intra:
        problems.append(f"no ingress firewall rule allowing all protocols from google_compute_subnetwork."
                        f"{subnet_name}'s own range on its network")
    settings = cfg["output"].get("ctloop_settings", {}).get("value", "")
    if f"google_compute_subnetwork.{subnet_name}" not in json.dumps(settings):
        problems.append("output ctloop_settings does not set gcp.dataproc_subnetwork")
    if f"google_compute_subnetwork.{subnet_name}" not in json.dumps(cfg["locals"]["release_substitutions"]):
        problems.append("the release build is not handed the subnetwork (local.release_substitutions)")
    return problems


def test_dataproc_runs_on_its_own_subnetwork(cfg: dict[str, Any]) -> None:
    assert check_dataproc_network(cfg) == []


def test_network_check_catches_missing_private_google_access(cfg: dict[str, Any]) -> None:
    broken = copy.deepcopy(cfg)
    broken["resource"]["google_compute_subnetwork"]["dataproc"]["private_ip_google_access"] = False
    broken["resource"]["google_compute_firewall"]["dataproc_internal"]["source_ranges"] = ["0.0.0.0/0"]
    assert check_dataproc_network(broken) == [
        "google_compute_subnetwork.dataproc: private_ip_google_access is not true",
        "no ingress firewall rule allowing all protocols from google_compute_subnetwork.dataproc's own range on "
        "its network",
    ]


def test_release_settings_carry_the_subnetwork() -> None:
    release = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    (render,) = [s for s in release["steps"] if s["id"] == "render-config"]
    assert "--set=gcp.dataproc_subnetwork=${_DATAPROC_SUBNETWORK}" in render["args"]


# Apply order: BigQuery reads the files behind an external table when it autodetects its schema or infers
# partition keys; over a bucket this same apply creates, there are none.
READS_FILES = {"autodetect": True}
INFERRING_PARTITION_MODES = {"AUTO", "STRINGS"}


def check_apply_reads_nothing_it_creates_empty(cfg: dict[str, Any]) -> list[str]:
    problems = []
    created = set(resources(cfg, "google_storage_bucket"))
    for name, table in resources(cfg, "google_bigquery_table").items():
        external = block(table, "external_data_configuration")
        if not external or not referenced(external.get("source_uris"), "google_storage_bucket") & created:
            continue
        if external.get("autodetect") is not False:
            problems.append(f"google_bigquery_table.{name}: autodetect over a bucket created in the same apply "
                            "(declare the schema)")
        if not external.get("schema") and not table.get("schema"):
            problems.append(f"google_bigquery_table.{name}: no declared schema")
        partitioning = dynamic_block(external, "hive_partitioning_options") or block(
            external, "hive_partitioning_options")
        if partitioning.get("mode") in INFERRING_PARTITION_MODES:
            problems.append(f"google_bigquery_table.{name}: hive partitioning mode {partitioning['mode']} infers "
                            "keys from files that do not exist yet (use CUSTOM)")
    return problems


def test_apply_reads_nothing_it_creates_empty(cfg: dict[str, Any]) -> None:
    assert check_apply_reads_nothing_it_creates_empty(cfg) == []


def test_apply_order_check_catches_autodetect(cfg: dict[str, Any]) -> None:
    broken = copy.deepcopy(cfg)
    external = block(broken["resource"]["google_bigquery_table"]["events"], "external_data_configuration")
    external["autodetect"] = True
    del external["schema"]
    dynamic_block(external, "hive_partitioning_options")["mode"] = "AUTO"
    assert len(check_apply_reads_nothing_it_creates_empty(broken)) == 3


def test_landing_schema_is_the_one_the_settings_roles_give() -> None:
    """terraform/landing_schema.json is what cloudbuild/landing_schema.py renders from ctloop.yaml."""
    from cloudbuild import landing_schema
    from ctloop.config import load_settings

    settings = load_settings(ROOT / "ctloop.yaml", [])
    committed = (TF_DIR / "landing_schema.json").read_text()
    assert committed == landing_schema.render(settings), "regenerate: python cloudbuild/landing_schema.py"
    fields = {f["name"]: f["type"] for f in json.loads(committed)}
    cols = settings.columns
    assert list(fields)[:3] == cols.role_columns
    assert fields[cols.timestamp_column] == "TIMESTAMP"
    assert set(fields) == {*cols.role_columns, *cols.numeric_features, *cols.categorical_features}
    assert all(fields[c] == "STRING" for c in cols.categorical_features)
    assert all(fields[c] in ("INT64", "FLOAT64") for c in cols.numeric_features)


def test_landing_schema_names_a_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cloudbuild import landing_schema

    pq.write_table(pa.table({"customer_id": ["a"], "event_ts": [1]}), tmp_path / "x.parquet")
    code = landing_schema.main(["--parquet", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "s.json")])
    assert code == 1
    err = capsys.readouterr().err
    assert "column 'churned'" in err and "not in the Parquet schema" in err
    assert not (tmp_path / "s.json").exists()


def test_function_builds_with_its_own_account_that_deployers_can_act_as(cfg: dict[str, Any]) -> None:
    (function,) = resources(cfg, "google_cloudfunctions2_function").values()
    build_sa = referenced(block(function, "build_config").get("service_account"), "google_service_account")
    assert len(build_sa) == 1, "build_config.service_account is not set: the project's default build account runs"
    (build_sa_name,) = build_sa
    roles = {b["role"] for b in resources(cfg, "google_project_iam_member").values()
             if referenced(b.get("member"), "google_service_account") == {build_sa_name}}
    assert roles & {"roles/run.builder", "roles/cloudbuild.builds.builder"}, roles
    deployers = {
        next(iter(referenced(b["member"], "google_service_account")))
        for b in resources(cfg, "google_service_account_iam_member").values()
        if b["role"] == "roles/iam.serviceAccountUser"
        and referenced(b.get("service_account_id"), "google_service_account") == {build_sa_name}
    }
    # The release build redeploys the function (cloudbuild.yaml deploy-function), naming the build account.
    assert "build" in deployers
    release = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    (deploy,) = [s for s in release["steps"] if s["id"] == "deploy-function"]
    assert "--build-service-account=" in deploy["args"][-1]
    assert f"google_service_account.{build_sa_name}" in cfg["locals"]["release_substitutions"]["_FUNCTION_BUILD_SA"]


def test_function_starts_one_run_per_batch() -> None:
    """The function runs in batch mode: CTLOOP_TRIGGER_MARKERS is set, and to what the function accepts."""
    import sys

    cfg = load_config()
    (function,) = resources(cfg, "google_cloudfunctions2_function").values()
    env_expr = block(function, "service_config")["environment_variables"]
    assert re.search(r"CTLOOP_TRIGGER_MARKERS\s*=\s*\$?\{?join\(\",\", var\.batch_markers\)", env_expr), env_expr
    markers = cfg["variable"]["batch_markers"]["default"]
    assert markers, "no default batch marker: each file of a batch would start its own run"
    sys.path.insert(0, str(ROOT / "cloud_functions" / "trigger"))
    try:
        from ctloop_trigger.settings import load_settings as trigger_settings
    finally:
        sys.path.pop(0)
    settings = trigger_settings({
        "CTLOOP_TRIGGER_BUCKET": "ctloop-dev-landing", "CTLOOP_TRIGGER_TEMPLATE": "https://x-kfp.pkg.dev/p/r/t/latest",
        "CTLOOP_TRIGGER_MARKERS": ",".join(markers),
    })
    assert settings.batch_mode and settings.markers == tuple(markers)


# Each checkov skip's reason is a claim; the claims that can be checked in the configuration are checked here.
def check_skip_claims(cfg: dict[str, Any], sources: dict[str, str]) -> list[str]:
    problems = []
    skips = [(path, m.group(1), m.group(2)) for path, text in sources.items()
             for m in re.finditer(r"#checkov:skip=(CKV_\w+):(.*)", text)]
    audits = {
        body.get("service"): {block_item.get("log_type") for block_item in body.get("audit_log_config", [])}
        for body in resources(cfg, "google_project_iam_audit_config").values()
    }
    for path, check, reason in skips:
        if check == "CKV_GCP_62":
            if not {"DATA_READ", "DATA_WRITE"} <= audits.get("storage.googleapis.com", set()):
                problems.append(f"{path}: CKV_GCP_62 skip says Data Access audit logs, but no "
                                "google_project_iam_audit_config logs DATA_READ and DATA_WRITE for storage")
            if "google_project_iam_audit_config" not in reason:
                problems.append(f"{path}: CKV_GCP_62 skip should name the audit config it relies on")
    # The skips in bigquery.tf speak for the tables defined there (another file's tables carry their own).
    bigquery_tf = set(re.findall(r'resource "google_bigquery_table" "(\w+)"', sources.get("bigquery.tf", "")))
    for name, table in resources(cfg, "google_bigquery_table").items():
        text = json.dumps(table)
        if name not in bigquery_tf:
            continue
        if "CKV_GCP_80" in sources.get("bigquery.tf", "") and not block(table, "external_data_configuration"):
            problems.append(f"google_bigquery_table.{name}: CKV_GCP_80 skip says external table, it is not")
        if "CKV_GCP_121" in sources.get("bigquery.tf", "") and "!var.force_destroy" not in text:
            problems.append(f"google_bigquery_table.{name}: CKV_GCP_121 skip says protection follows "
                            "var.force_destroy, it does not")
    return problems


def _sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(TF_DIR.glob("*.tf"))}


def test_checkov_skip_reasons_are_true(cfg: dict[str, Any]) -> None:
    sources = _sources()
    assert sum(text.count("checkov:skip=CKV_GCP_62") for text in sources.values()) == 3
    assert check_skip_claims(cfg, sources) == []


def test_skip_claim_check_catches_missing_audit_logs(cfg: dict[str, Any]) -> None:
    broken = copy.deepcopy(cfg)
    del broken["resource"]["google_project_iam_audit_config"]
    problems = check_skip_claims(broken, _sources())
    assert len(problems) == 3 and all("no google_project_iam_audit_config" in p for p in problems)
