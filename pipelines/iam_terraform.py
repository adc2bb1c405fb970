"""The IAM bindings terraform/*.tf creates, read from the HCL: who gets which role on what.

Scopes use the names of terraform/iam/calls.yaml (``bucket:staging/config/`` for a binding conditioned on
that object prefix). Roles of a ``for_each`` binding are all counted, also those behind a variable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.iam_table import ROOT, Identity

TF_DIR = ROOT / "terraform"
# Binding resource type -> (scope kind, the argument naming the resource, the resource type it names).
BINDING_TYPES = {
    "google_project_iam_member": ("project", "", ""),
    "google_storage_bucket_iam_member": ("bucket", "bucket", "google_storage_bucket"),
    "google_bigquery_dataset_iam_member": ("dataset", "dataset_id", "google_bigquery_dataset"),
    "google_artifact_registry_repository_iam_member": ("repository", "repository",
                                                       "google_artifact_registry_repository"),
    "google_service_account_iam_member": ("service_account", "service_account_id", "google_service_account"),
    "google_pubsub_topic_iam_member": ("topic", "topic", "google_pubsub_topic"),
    "google_pubsub_subscription_iam_member": ("subscription", "subscription", "google_pubsub_subscription"),
    "google_cloud_run_service_iam_member": ("run_service", "service", "google_cloudfunctions2_function"),
}
_ROLE = re.compile(r"roles/[\w.]+")
_OBJECT_PREFIX = re.compile(r"/objects/([\w./-]+)")


@dataclass(frozen=True)
class Grant:
    address: str  # the Terraform resource granting it
    member: str  # the member expression as written
    role: str
    scope: str


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in [str(k), *_strings(v)]]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []


def _refs(node: Any, rtype: str) -> list[str]:
    found: list[str] = []
    for text in _strings(node):
        for name in re.findall(rf"(?<![\w.]){re.escape(rtype)}\.(\w+)", text):
            if name not in found:
                found.append(name)
    return found


def load_resources(tf_dir: Path = TF_DIR) -> dict[str, dict[str, Any]]:
    """{type: {name: body}} of every resource block."""
    import hcl2
    from hcl2.utils import SerializationOptions

    options = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in tf_dir.glob("*.tf")):
        for block in hcl2.loads(path.read_text(), serialization_options=options).get("resource", []):
            for rtype, named in block.items():
                for name, body in named.items():
                    out.setdefault(rtype, {})[name] = body
    return out


def grants(resources: dict[str, dict[str, Any]]) -> list[Grant]:
    out = []
    for rtype, (kind, arg, target) in BINDING_TYPES.items():
        for name, body in resources.get(rtype, {}).items():
            role = body.get("role", "")
            roles = _ROLE.findall(str(body.get("for_each", ""))) if "each." in role else [role]
            if kind == "project":
                scopes = ["project"]
            else:
                value = body.get(arg, "")
                names = _refs(body.get("for_each"), target) if "each." in str(value) else _refs(value, target)
                scopes = [f"{kind}:{n}" for n in names]
            condition = body.get("condition")
            condition = condition[0] if isinstance(condition, list) else condition
            if condition:
                prefix = _OBJECT_PREFIX.search(str(condition.get("expression", "")))
                scopes = [f"{s}/{prefix.group(1)}" if prefix else f"{s}?{condition.get('title')}" for s in scopes]
            out += [Grant(f"{rtype}.{name}", body.get("member", ""), r, s) for r in roles for s in scopes]
    return out


def member_of(grant: Grant, account: str) -> bool:
    """True when ``grant`` is to the Terraform account expression ``account``."""
    return bool(re.search(rf"(?<![\w.]){re.escape(account)}(\.|\}}|$)", grant.member))


def covers(grant_scope: str, need_scope: str) -> bool:
    """A grant on the project covers everything; on a bucket, every prefix of it; on a prefix, what is under."""
    if grant_scope == "project" or grant_scope == need_scope:
        return True
    if grant_scope.endswith("/"):
        return need_scope.startswith(grant_scope)
    return need_scope.startswith(grant_scope + "/")


def roles_in_terraform(tf_dir: Path = TF_DIR) -> set[str]:
    return {g.role for g in grants(load_resources(tf_dir))}


def grants_by_identity(table: dict[str, Identity], tf_dir: Path = TF_DIR) -> dict[str, list[tuple[str, str, str]]]:
    """{identity: [(role, scope, terraform address)]} for the docs."""
    all_grants = grants(load_resources(tf_dir))
    return {
        name: [(g.role, g.scope, f"`{g.address}`") for g in all_grants if ident.account and member_of(g, ident.account)]
        for name, ident in table.items()
    }
