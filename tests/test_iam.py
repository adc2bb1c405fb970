"""IAM sufficiency by test: the bindings in terraform/ against the table of calls (terraform/iam/calls.yaml),
with Google's own role and method data (terraform/iam/gcp_iam_subset.json); and the table against the code."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from pipelines import iam_table
from pipelines.iam_table import Identity, load_iam_data, load_table
from pipelines.iam_terraform import Grant, covers, grants, load_resources, member_of, roles_in_terraform

ROOT = Path(__file__).resolve().parents[1]
# Google's full IAM reference data, where the machine has it (outside the repo; CI has only the subset).
FULL_DATA = [ROOT.parent / "shared" / "gcp-iam" / "gcp-iam.json", ROOT.parent.parent / "shared" / "gcp-iam" /
             "gcp-iam.json"]


@pytest.fixture(scope="module")
def data() -> dict:
    return load_iam_data()


@pytest.fixture(scope="module")
def table(data: dict) -> dict[str, Identity]:
    return load_table(iam_data=data)


@pytest.fixture(scope="module")
def tf_grants() -> list[Grant]:
    return grants(load_resources())


def role_permissions(data: dict, role: str) -> set[str]:
    assert role in data["roles"], f"{role} is not in the IAM data (regenerate the subset)"
    return set(data["roles"][role]["permissions"])


def missing_permissions(table: dict[str, Identity], tf_grants: list[Grant], data: dict) -> list[str]:
    """Every permission of every call that no binding to that identity grants on a covering scope."""
    problems = []
    for name, ident in table.items():
        if not ident.account:
            continue
        mine = [g for g in tf_grants if member_of(g, ident.account)]
        mine += [Grant("(granted by Google)", ident.account, r, "project") for r in ident.google_granted]
        for call in ident.calls:
            for perm in call.permissions:
                if not any(covers(g.scope, call.scope) and perm in role_permissions(data, g.role) for g in mine):
                    problems.append(f"{name}: {perm} on {call.scope} ({call.method}, {', '.join(call.code)}): "
                                    "no binding grants it")
    return problems


def grantable_alternative(data: dict, role: str) -> bool:
    """A role worth recommending instead: generally available, not a legacy or service-agent role."""
    body = data["roles"][role]
    return body.get("stage") == "GA" and ".legacy" not in role and "serviceagent" not in role.lower()


def broader_than_needed(table: dict[str, Identity], tf_grants: list[Grant], data: dict) -> list[str]:
    """Bindings whose role grants nothing the table needs, or where a narrower predefined role covers the same
    calls (a role whose permissions are a strict subset of it and include every permission it serves)."""
    problems = []
    for g in tf_grants:
        accounts = {i.account for i in table.values() if i.account and member_of(g, i.account)}
        if not accounts:
            problems.append(f"{g.address}: {g.member} is no identity of the table")
            continue
        needed = {p for i in table.values() if i.account in accounts
                  for scope, perms in i.needs().items() if covers(g.scope, scope) for p in perms}
        perms = role_permissions(data, g.role)
        used = needed & perms
        if not used:
            problems.append(f"{g.address}: {g.role} on {g.scope} grants nothing the table needs")
            continue
        narrower = sorted((len(role_permissions(data, r)), r) for r in data["roles"]
                          if grantable_alternative(data, r)
                          and role_permissions(data, r) < perms and used <= role_permissions(data, r))
        if narrower:
            problems.append(f"{g.address}: {g.role} on {g.scope}: {narrower[0][1]} covers the same calls "
                            f"({sorted(used)})")
    return problems


def test_every_identity_holds_every_permission_it_needs(table, tf_grants, data) -> None:
    assert missing_permissions(table, tf_grants, data) == []


def test_no_role_is_broader_than_the_calls_need(table, tf_grants, data) -> None:
    assert broader_than_needed(table, tf_grants, data) == []


def test_dataproc_worker_alone_cannot_create_batches(table, tf_grants, data) -> None:
    """The deployment blocker: roles/dataproc.worker has no dataproc.batches.create or .get."""
    without = [g for g in tf_grants if g.role != "roles/dataproc.serverlessEditor"]
    problems = missing_permissions(table, without, data)
    assert any("pipeline: dataproc.batches.create on project" in p for p in problems)
    assert any("pipeline: dataproc.batches.get on project" in p for p in problems)


def test_coverage_respects_scope(table, tf_grants, data) -> None:
    """A bucket-level grant does not reach another bucket; a prefix-conditioned one not outside its prefix."""
    moved = [Grant(g.address, g.member, g.role, "bucket:landing") if g.address.endswith("trigger_reads_config")
             else g for g in tf_grants]
    assert missing_permissions(table, moved, data) == [
        "trigger: storage.objects.get on bucket:staging/config/ (storage.objects.get, "
        "cloud_functions/trigger/ctloop_trigger/ctloop_config.py): no binding grants it"
    ]
    assert covers("bucket:staging", "bucket:staging/config/")
    assert not covers("bucket:staging/config/", "bucket:staging")
    assert not covers("bucket:staging", "bucket:staging_other")


def test_broad_role_is_flagged(table, tf_grants, data) -> None:
    broad = [*tf_grants, Grant("google_project_iam_member.x", "serviceAccount:${google_service_account.trigger"
                               ".email}", "roles/storage.objectUser", "bucket:staging")]
    problems = broader_than_needed(table, broad, data)
    assert len(problems) == 1 and "roles/storage.objectViewer covers the same calls" in problems[0], problems
    unused = [*tf_grants, Grant("google_project_iam_member.y", "serviceAccount:${google_service_account.trigger"
                                ".email}", "roles/pubsub.publisher", "project")]
    assert broader_than_needed(table, unused, data) == [
        "google_project_iam_member.y: roles/pubsub.publisher on project grants nothing the table needs"
    ]


SCOPE_TYPES = {"bucket": "google_storage_bucket", "dataset": "google_bigquery_dataset",
               "repository": "google_artifact_registry_repository", "service_account": "google_service_account",
               "topic": "google_pubsub_topic", "subscription": "google_pubsub_subscription",
               "run_service": "google_cloudfunctions2_function"}


def test_table_scopes_name_terraform_resources(table) -> None:
    resources = load_resources()
    for ident in table.values():
        for call in ident.calls:
            if call.scope == "project":
                continue
            kind, _, rest = call.scope.partition(":")
            name = rest.split("/", 1)[0]
            assert kind in SCOPE_TYPES, f"{ident.name}: {call.method}: unknown scope kind in {call.scope!r}"
            assert name in resources.get(SCOPE_TYPES[kind], {}), (
                f"{ident.name}: {call.method}: {call.scope!r} names no {SCOPE_TYPES[kind]} in terraform/")


def test_table_accounts_name_terraform_objects(table) -> None:
    from tests.test_terraform import load_config

    cfg = load_config()
    for ident in table.values():
        if not ident.account:
            continue
        kind, _, rest = ident.account.partition(".")
        if kind == "local":
            assert rest in cfg["locals"], f"{ident.name}: local.{rest} is not defined in terraform/"
        elif kind == "data":
            dtype, _, name = rest.partition(".")
            assert name in cfg["data"].get(dtype, {}), f"{ident.name}: {ident.account} is not in terraform/"
        else:
            assert rest in cfg["resource"].get(kind, {}), f"{ident.name}: {ident.account} is not in terraform/"


def test_table_code_references_exist(table) -> None:
    for ident in table.values():
        for call in ident.calls:
            for path in call.code:
                assert (ROOT / path).exists(), f"{ident.name}: {call.method}: {path} does not exist"


def test_docs_are_generated_from_the_table(table) -> None:
    from pipelines.iam_terraform import grants_by_identity

    expected = iam_table.render_docs(table, grants_by_identity(table))
    assert (ROOT / "docs" / "iam.md").read_text() == expected, "regenerate: python -m pipelines.iam_table --docs"


def test_subset_is_current_with_googles_data(table) -> None:
    full_path = next((p for p in FULL_DATA if p.is_file()), None)
    if full_path is None:
        pytest.skip("Google's full IAM data is not on this machine; the committed subset is used as is")
    full = json.loads(full_path.read_text())
    expected = iam_table.subset(full, load_table(iam_data=full), roles_in_terraform())
    assert load_iam_data() == json.loads(json.dumps(expected)), (
        "regenerate: python -m pipelines.iam_table --subset-from " + str(full_path))


# --- the table keeps up with the code ------------------------------------------------------------------------

# Google client calls -> the REST methods they make. A call is (receiver pattern, attribute): the receiver is
# the source text before the attribute, matched as a regex. Calls that make no request map to [].
CLIENT_CALLS: list[tuple[str, str, list[str]]] = [
    (r".*", "get_table", ["bigquery.tables.get"]),
    (r"client", "query", ["bigquery.jobs.insert", "bigquery.jobs.getQueryResults"]),
    (r"client", "get_job", ["bigquery.jobs.get"]),
    (r".*", "upload_from_string", ["storage.objects.insert"]),
    (r".*", "upload_from_filename", ["storage.objects.insert"]),
    (r".*", "download_as_text", ["storage.objects.get"]),
    (r".*", "download_as_bytes", ["storage.objects.get"]),
    (r".*", "download_to_file", ["storage.objects.get"]),
    (r".*", "download_to_filename", ["storage.objects.get"]),
    (r".*", "list_blobs", ["storage.objects.list"]),
    (r"(copy|blob)", "rewrite", ["storage.objects.rewrite"]),
    (r"blob", "exists", ["storage.objects.get"]),
    (r".*", "create_batch", ["dataproc.projects.locations.batches.create"]),
    (r".*", "get_batch", ["dataproc.projects.locations.batches.get"]),
    (r"aiplatform\.Model", "upload", ["aiplatform.projects.locations.models.upload"]),
    (r"aiplatform\.Model", "list", ["aiplatform.projects.locations.models.list"]),
    (r"aiplatform\.Endpoint", "list", ["aiplatform.projects.locations.endpoints.list"]),
    (r"aiplatform\.Endpoint", "create", ["aiplatform.projects.locations.endpoints.create"]),
    (r"aiplatform\.PipelineJob", "get", ["aiplatform.projects.locations.pipelineJobs.get"]),
    (r"job", "submit", ["aiplatform.projects.locations.pipelineJobs.create"]),
    (r"registry", "add_version_aliases", ["aiplatform.projects.locations.models.mergeVersionAliases"]),
    (r"registry", "remove_version_aliases", ["aiplatform.projects.locations.models.mergeVersionAliases"]),
    (r"(staging|production|endpoint|^ep$)", "deploy", ["aiplatform.projects.locations.endpoints.deployModel"]),
    (r"(staging|production|endpoint|^ep$)", "undeploy", ["aiplatform.projects.locations.endpoints.undeployModel"]),
    (r"(staging|production|endpoint|^ep$)", "predict", ["aiplatform.projects.locations.endpoints.predict"]),
    (r"^ep$", "update", ["aiplatform.projects.locations.endpoints.patch"]),
    (r"api_client", "update_endpoint", ["aiplatform.projects.locations.endpoints.patch"]),
    (r"aiplatform", "start_run", ["aiplatform.projects.locations.metadataStores.contexts.create"]),
    (r"aiplatform", "log_params", ["aiplatform.projects.locations.metadataStores.contexts.patch"]),
    (r"aiplatform", "log_metrics", ["aiplatform.projects.locations.metadataStores.contexts.patch"]),
    (r"aiplatform", "end_run", ["aiplatform.projects.locations.metadataStores.contexts.patch"]),
    (r".*", "upload_pipeline", ["artifactregistry.repositories.uploadArtifacts"]),
    (r".*", "create_tag", ["artifactregistry.projects.locations.repositories.packages.tags.create"]),
    (r".*", "update_tag", ["artifactregistry.projects.locations.repositories.packages.tags.patch"]),
    (r".*", "get_tag", ["artifactregistry.projects.locations.repositories.packages.tags.get"]),
    (r".*", "lookup_bucket", ["storage.buckets.get"]),
    (r".*", "load_table_from_json", ["bigquery.jobs.insert", "bigquery.jobs.get"]),
    (r".*", "sync_feature_view", ["aiplatform.projects.locations.featureOnlineStores.featureViews.sync"]),
    (r".*", "get_feature_view_sync",
     ["aiplatform.projects.locations.featureOnlineStores.featureViews.featureViewSyncs.get"]),
    (r".*", "fetch_feature_values",
     ["aiplatform.projects.locations.featureOnlineStores.featureViews.fetchFeatureValues"]),
    (r"session", "(get|post)", []),  # the doctor's REST calls are listed by method in the table directly
    (r".*", "test_iam_permissions", []),  # testIamPermissions needs no permission
    (r".*", "(bucket|blob)", []),  # local references, no request
]
# Method names of Google's client classes that are distinctive enough to find by name alone.
API_NAMES = re.compile(
    r"^(get_table|get_job|upload_from_\w+|download_\w+|list_blobs|create_batch|get_batch|list_batches|"
    r"delete_batch|upload_pipeline|create_tag|update_tag|delete_tag|get_tag|lookup_bucket|start_run|end_run|log_params|log_metrics|"
    r"add_version_aliases|remove_version_aliases|batch_get|test_iam_permissions|get_iam_policy|set_iam_policy|"
    r"load_table_from_\w+|sync_feature_view|get_feature_view_sync|fetch_feature_values)$"
)
# Code that talks only to local emulators or is not shipped (besides devtools/, which is not scanned at all).
NOT_SCANNED: set[str] = set()
SCANNED_DIRS = ["components", "ctloop", "pipelines", "serving", "cloud_functions", "cloudbuild"]


def client_calls(path: Path) -> list[tuple[str, str, int]]:
    """(receiver text, attribute, line) of every call in a file that imports a Google client or kfp's registry."""
    text = path.read_text()
    if not re.search(r"from google\.|import google\.|kfp\.registry|from kfp import registry", text):
        return []
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            out.append((ast.unparse(node.func.value), node.func.attr, node.lineno))
    return sorted(out, key=lambda c: c[2])


def unlisted_calls(table: dict[str, Identity], files: list[Path], root: Path = ROOT) -> list[str]:
    listed: dict[str, set[str]] = {}
    for ident in table.values():
        for call in ident.calls:
            listed.setdefault(call.method, set()).update(call.code)
    problems = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        for receiver, attr, line in client_calls(path):
            rules = [methods for pattern, name, methods in CLIENT_CALLS
                     if re.fullmatch(name, attr) and re.search(pattern, receiver)]
            if not rules:
                if API_NAMES.match(attr):
                    problems.append(f"{rel}:{line}: {receiver}.{attr}(): a Google client call CLIENT_CALLS "
                                    "does not map to a REST method")
                continue
            for method in rules[0]:
                homes = listed.get(method, set())
                if not any(rel == h or rel.startswith(h.rstrip("/") + "/") for h in homes):
                    problems.append(f"{rel}:{line}: {receiver}.{attr}() calls {method}, which "
                                    f"terraform/iam/calls.yaml does not list for {rel}")
    return problems


def _code_files() -> list[Path]:
    files = []
    for directory in SCANNED_DIRS:
        files += [p for p in sorted((ROOT / directory).rglob("*.py"))
                  if p.relative_to(ROOT).as_posix() not in NOT_SCANNED and "__pycache__" not in p.parts]
    return files


def test_every_google_client_call_is_in_the_table(table) -> None:
    files = _code_files()
    assert len(files) > 30
    assert unlisted_calls(table, files) == []
    mapped = [(p, attr) for p in files for receiver, attr, _ in client_calls(p)
              if any(re.fullmatch(n, attr) and re.search(pat, receiver) and m for pat, n, m in CLIENT_CALLS)]
    assert len(mapped) >= 25, f"the scan found only {len(mapped)} Google client calls: {mapped}"


def test_table_check_catches_a_new_client_call(table, tmp_path: Path) -> None:
    sneaky = tmp_path / "pipelines" / "_iam_probe_tmp.py"
    sneaky.parent.mkdir()
    sneaky.write_text("from google.cloud import storage\n\n\ndef f(client):\n"
                      "    client.bucket('b').blob('x').upload_from_filename('y')\n"
                      "    client.list_batches(parent='p')\n")
    problems = unlisted_calls(table, [sneaky], root=tmp_path)
    assert problems == [
        "pipelines/_iam_probe_tmp.py:5: client.bucket('b').blob('x').upload_from_filename() calls "
        "storage.objects.insert, which terraform/iam/calls.yaml does not list for pipelines/_iam_probe_tmp.py",
        "pipelines/_iam_probe_tmp.py:6: client.list_batches(): a Google client call CLIENT_CALLS does not map "
        "to a REST method",
    ]
