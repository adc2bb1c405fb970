"""The IAM table (terraform/iam/calls.yaml): which Google API methods each identity calls, and on what.

Permissions come from the table's own ``method_permissions`` or else from Google's method -> permission data
(terraform/iam/gcp_iam_subset.json, the part of Google's published IAM reference this project needs). Used by
the IAM tests, ``ctloop doctor`` and docs/iam.md (``python -m pipelines.iam_table --docs``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "terraform" / "iam" / "calls.yaml"
IAM_DATA = ROOT / "terraform" / "iam" / "gcp_iam_subset.json"
DOCS = ROOT / "docs" / "iam.md"


@dataclass(frozen=True)
class Call:
    identity: str
    method: str
    scope: str
    permissions: tuple[str, ...]
    code: tuple[str, ...]
    why: str = ""
    when: str = ""


@dataclass
class Identity:
    name: str
    account: str | None  # the Terraform expression naming it (google_service_account.x, local.y), or None
    what: str
    calls: list[Call] = field(default_factory=list)
    google_granted: tuple[str, ...] = ()  # project roles Google grants this service agent itself

    def needs(self) -> dict[str, set[str]]:
        """{scope: permissions} this identity needs."""
        out: dict[str, set[str]] = defaultdict(set)
        for call in self.calls:
            out[call.scope].update(call.permissions)
        return dict(out)


def load_iam_data(path: Path = IAM_DATA) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_table(path: Path = TABLE, iam_data: dict[str, Any] | None = None) -> dict[str, Identity]:
    """Every identity with its calls, permissions resolved; a method with no known permissions fails."""
    doc = yaml.safe_load(path.read_text())
    data = iam_data if iam_data is not None else load_iam_data()
    overrides = doc.get("method_permissions", {})
    identities = {}
    for name, body in doc["identities"].items():
        identity = Identity(name=name, account=body.get("account"), what=body.get("what", ""),
                            google_granted=tuple(body.get("google_granted", [])))
        for raw in body.get("calls", []):
            method = raw["method"]
            perms = (raw.get("permissions") or overrides.get(method, {}).get("permissions")
                     or data["methods"].get(method))
            if not perms:
                raise ValueError(f"{path.name}: {name}: method {method!r} has no permissions in Google's data; "
                                 "name them in method_permissions with the documentation that says so")
            identity.calls.append(Call(identity=name, method=method, scope=raw["scope"], permissions=tuple(perms),
                                       code=tuple(raw.get("code", [])), why=raw.get("why", ""),
                                       when=raw.get("when", "")))
        identities[name] = identity
    return identities


def subset(full: dict[str, Any], table: dict[str, Identity], roles_in_use: set[str]) -> dict[str, Any]:
    """The part of Google's IAM data the tests need: the table's methods, the roles in use, and every role
    narrower than one in use (the candidates the narrowest-role check compares against)."""
    methods = {c.method for ident in table.values() for c in ident.calls}
    roles_in_use = roles_in_use | {r for ident in table.values() for r in ident.google_granted}
    used = {r: set(full["roles"][r]["permissions"]) for r in roles_in_use if r in full["roles"]}
    keep = set(used)
    for role, body in full["roles"].items():
        perms = set(body["permissions"])
        if any(perms < big for big in used.values()):
            keep.add(role)
    return {
        "source": full["source"] + "; subset: the methods of terraform/iam/calls.yaml, the roles Terraform "
                  "grants and every role whose permissions are a strict subset of one of those",
        "methods": {m: full["methods"][m] for m in sorted(methods) if m in full["methods"]},
        "roles": {r: {"title": full["roles"][r].get("title", ""), "stage": full["roles"][r].get("stage", ""),
                      "permissions": sorted(full["roles"][r]["permissions"])} for r in sorted(keep)},
    }


def render_docs(table: dict[str, Identity], grants: dict[str, list[tuple[str, str, str]]],
                iam_data: dict[str, Any] | None = None) -> str:
    """docs/iam.md: per identity, what it is, its roles (where, and the calls that need them) and its calls."""
    from pipelines.iam_terraform import covers

    data = iam_data if iam_data is not None else load_iam_data()
    lines = [
        "# IAM: who calls what, and which role allows it",
        "",
        "Generated from `terraform/iam/calls.yaml` and the bindings in `terraform/*.tf` by",
        "`python -m pipelines.iam_table --docs`; `tests/test_iam.py` fails when this file is stale, when a",
        "binding is missing or broader than a predefined role that covers the same calls, and when the code",
        "calls a Google API method the table does not list. `ctloop doctor --target vertex` tests the same",
        "permissions in a real project.",
        "",
    ]
    for name, ident in table.items():
        lines += [f"## {name}", "", ident.what, ""]
        if ident.account:
            lines.append(f"Account: `{ident.account}`.")
        if ident.google_granted:
            lines.append(f"Google grants it {', '.join(f'`{r}`' for r in ident.google_granted)} on the project.")
        elif not grants.get(name):
            lines.append("Not a Terraform-managed account: the table records its calls; nothing grants them here.")
        lines.append("")
        if grants.get(name):
            lines += ["| Role | On | Granted by | Why: the calls it allows |", "| --- | --- | --- | --- |"]
            for role, scope, address in grants[name]:
                perms = set(data["roles"].get(role, {}).get("permissions", []))
                served = sorted({".".join(c.method.split(".")[-2:])
                                 for c in ident.calls if covers(scope, c.scope) and perms & set(c.permissions)})
                why = ", ".join(served) or "(calls of another identity on the same account)"
                lines.append(f"| `{role}` | {scope} | {address} | {why} |")
            lines.append("")
        lines += ["| Method | On | Permissions | Called from |", "| --- | --- | --- | --- |"]
        for c in ident.calls:
            extra = f" (when {c.when})" if c.when else ""
            lines.append(f"| `{c.method}`{extra} | {c.scope} | {', '.join(f'`{p}`' for p in c.permissions)} | "
                         f"{', '.join(c.code)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", action="store_true", help=f"write {DOCS.relative_to(ROOT)}")
    parser.add_argument("--subset-from", type=Path, metavar="GCP_IAM_JSON",
                        help=f"rewrite {IAM_DATA.relative_to(ROOT)} from Google's full IAM data")
    args = parser.parse_args(argv)
    from pipelines.iam_terraform import grants_by_identity, roles_in_terraform

    if args.subset_from:
        full = json.loads(args.subset_from.read_text())
        table = load_table(iam_data=full)
        IAM_DATA.write_text(json.dumps(subset(full, table, roles_in_terraform()), indent=1, sort_keys=True) + "\n")
        print(f"wrote {IAM_DATA}")
    if args.docs:
        table = load_table()
        DOCS.write_text(render_docs(table, grants_by_identity(table)))
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
