"""Every resource and data block in terraform/ against the providers' published schemas.

``terraform validate`` needs the provider binaries, which cannot be downloaded here. The schemas come from the
providers' prebuilt CDKTF bindings on PyPI (terraform/schema/extract_provider_schema.py writes the extracts):
an argument or nested block the provider does not have, or a required one that is missing, fails here as it
would fail ``terraform validate``. versions.tf pins each provider to the version its extract describes.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions

ROOT = Path(__file__).resolve().parents[1]
TF_DIR = ROOT / "terraform"
SCHEMA_DIR = TF_DIR / "schema"
# Terraform's own meta-arguments and blocks, valid on every resource and data block.
META = {"count", "for_each", "depends_on", "provider", "lifecycle", "provisioner", "connection", "dynamic"}
_BLOCKS = SerializationOptions(with_comments=False, explicit_blocks=True, strip_string_quotes=True)
BLOCK = "__is_block__"


def load_schemas() -> dict[str, dict[str, Any]]:
    """{provider name: extract} for every terraform/schema/*.json."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.json"))}


def load_blocks(tf_dir: Path = TF_DIR) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(kind, type, name, body) of every resource and data block, bodies with blocks marked."""
    found = []
    for path in sorted(p for p in tf_dir.rglob("*.tf") if ".terraform" not in p.parts):
        parsed = hcl2.loads(path.read_text(), serialization_options=_BLOCKS)
        for kind in ("resource", "data"):
            for block in parsed.get(kind, []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        found.append((kind, rtype, name, body))
    return found


def _is_block(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and v.get(BLOCK) for v in value)


def check_body(body: dict[str, Any], schema: dict[str, Any], where: str, top: bool = False) -> list[str]:
    """Unknown arguments or blocks, missing required ones, for one body and its nested blocks."""
    problems: list[str] = []
    allowed_args = set(schema["arguments"])
    allowed_blocks = schema["blocks"]
    present: set[str] = set()
    for key, value in body.items():
        if key == BLOCK or (top and key in META and key != "dynamic"):
            continue
        if key == "dynamic":
            for dyn in value:
                for name, spec in dyn.items():
                    if name == BLOCK:
                        continue
                    present.add(name)
                    if name not in allowed_blocks:
                        problems.append(f"{where}: dynamic block {name!r} is not a block of this type")
                        continue
                    for content in spec.get("content", []):
                        problems += check_body(content, allowed_blocks[name], f"{where}.{name}")
            continue
        present.add(key)
        if _is_block(value):
            if key not in allowed_blocks:
                problems.append(f"{where}: unknown block {key!r} (provider has blocks {sorted(allowed_blocks)})")
                continue
            for item in value:
                problems += check_body(item, allowed_blocks[key], f"{where}.{key}")
        elif key in allowed_blocks:
            # Blocks may also be written as attributes (`x = [...]`) for attribute-as-block types.
            continue
        elif key not in allowed_args:
            problems.append(f"{where}: unknown argument {key!r}")
    for name in schema["required"]:
        if name not in present:
            problems.append(f"{where}: required {name!r} is missing")
    return problems


def check_config(blocks: list[tuple[str, str, str, dict[str, Any]]],
                 schemas: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    for kind, rtype, name, body in blocks:
        provider = rtype.split("_", 1)[0]
        where = f"{'data.' if kind == 'data' else ''}{rtype}.{name}"
        schema = schemas.get(provider, {}).get(kind, {}).get(rtype)
        if schema is None:
            problems.append(f"{where}: provider {provider!r} has no {kind} type {rtype!r}")
            continue
        problems += check_body(body, schema, where, top=True)
    return problems


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    return load_schemas()


@pytest.fixture(scope="module")
def blocks() -> list[tuple[str, str, str, dict[str, Any]]]:
    return load_blocks()


def test_every_block_matches_the_provider_schema(schemas: dict[str, Any], blocks: list[Any]) -> None:
    assert len(blocks) > 40
    assert check_config(blocks, schemas) == []


def test_providers_are_pinned_to_the_checked_versions(schemas: dict[str, Any]) -> None:
    versions = hcl2.loads((TF_DIR / "versions.tf").read_text(), serialization_options=_BLOCKS)
    required = versions["terraform"][0]["required_providers"][0]
    assert set(required) - {BLOCK} == set(schemas), "every provider in use has a schema extract, and only those"
    for name, schema in schemas.items():
        constraint = required[name]["version"]
        # "~> X.Y.Z" allows only patch releases of X.Y: the schema checked is the schema applied.
        match = re.fullmatch(r"~>\s*(\d+)\.(\d+)\.(\d+)", constraint)
        assert match, f"{name}: pin the provider as '~> {schema['version']}', found {constraint!r}"
        assert schema["version"].split(".")[:2] == list(match.groups()[:2]), (
            f"{name}: versions.tf allows {constraint}, the schema extract is {schema['version']}"
        )


def test_schema_extract_knows_the_providers_types(schemas: dict[str, Any]) -> None:
    google = schemas["google"]
    assert google["version"] == "6.50.0"
    assert len(google["resource"]) > 1000 and len(google["data"]) > 300
    subnet = google["resource"]["google_compute_subnetwork"]
    assert "private_ip_google_access" in subnet["arguments"] and "name" in subnet["required"]
    assert "build_config" in google["resource"]["google_cloudfunctions2_function"]["blocks"]


@pytest.fixture()
def broken(blocks: list[Any]) -> list[Any]:
    return copy.deepcopy(blocks)


def _body(blocks: list[Any], rtype: str, name: str) -> dict[str, Any]:
    return next(b for _, t, n, b in blocks if t == rtype and n == name)


def test_check_catches_an_unknown_argument(schemas: dict[str, Any], broken: list[Any]) -> None:
    _body(broken, "google_storage_bucket", "landing")["public_acces_prevention"] = "enforced"
    assert check_config(broken, schemas) == [
        "google_storage_bucket.landing: unknown argument 'public_acces_prevention'"
    ]


def test_check_catches_a_missing_required_argument(schemas: dict[str, Any], broken: list[Any]) -> None:
    del _body(broken, "google_compute_subnetwork", "dataproc")["network"]
    assert check_config(broken, schemas) == ["google_compute_subnetwork.dataproc: required 'network' is missing"]


def test_check_catches_nested_and_dynamic_blocks(schemas: dict[str, Any], broken: list[Any]) -> None:
    function = _body(broken, "google_cloudfunctions2_function", "trigger")
    function["build_config"][0]["service_acount"] = "x"
    table = _body(broken, "google_bigquery_table", "events")
    del table["external_data_configuration"][0]["autodetect"]
    table["external_data_configuration"][0]["dynamic"][0]["hive_partitioning_options"]["content"][0]["moed"] = "x"
    problems = check_config(broken, schemas)
    assert "google_cloudfunctions2_function.trigger.build_config: unknown argument 'service_acount'" in problems
    assert "google_bigquery_table.events.external_data_configuration: required 'autodetect' is missing" in problems
    assert ("google_bigquery_table.events.external_data_configuration.hive_partitioning_options: "
            "unknown argument 'moed'") in problems


def test_check_catches_an_unknown_type(schemas: dict[str, Any], broken: list[Any]) -> None:
    broken.append(("resource", "google_storage_buckett", "x", {"name": "x", BLOCK: True}))
    assert check_config(broken, schemas) == ["google_storage_buckett.x: provider 'google' has no resource type "
                                             "'google_storage_buckett'"]


def test_extractor_reads_a_jsii_assembly() -> None:
    """The extraction script on a minimal assembly shaped like the bindings' (the real wheel is 49 MB)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract", SCHEMA_DIR / "extract_provider_schema.py")
    extract = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(extract)
    link = "https://registry.terraform.io/providers/hashicorp/google/6.50.0/docs/resources/thing"
    ns = "@cdktf/provider-google.thing."
    assembly = {
        "version": "16.12.0",
        "types": {
            ns + "Thing": {
                "kind": "class", "base": "cdktf.TerraformResource", "fqn": ns + "Thing",
                "docs": {"summary": f"Represents a {{@link {link} google_thing}}."},
                "initializer": {"parameters": [{"name": "config", "type": {"fqn": ns + "ThingConfig"}}]},
            },
            ns + "ThingConfig": {"kind": "interface", "datatype": True, "properties": [
                {"name": "name", "type": {"primitive": "string"},
                 "docs": {"remarks": f"Docs {{@link {link}#name Thing#name}}"}},
                {"name": "ipCidrRange", "optional": True, "type": {"primitive": "string"}, "docs": {}},
                {"name": "logConfig", "optional": True, "type": {"fqn": ns + "ThingLogConfig"},
                 "docs": {"remarks": f"{{@link {link}#log_config Thing#log_config}}"}},
            ]},
            ns + "ThingLogConfig": {"kind": "interface", "datatype": True, "properties": [
                {"name": "metadata", "type": {"primitive": "string"}, "docs": {}},
            ]},
        },
    }
    assert extract.extract(assembly) == {
        "source": "PyPI cdktf-cdktf-provider-google 16.12.0 (jsii assembly)",
        "provider": "hashicorp/google",
        "version": "6.50.0",
        "resource": {"google_thing": {
            "arguments": ["ip_cidr_range", "name"], "required": ["name"],
            "blocks": {"log_config": {"arguments": ["metadata"], "required": ["metadata"], "blocks": {}}},
        }},
        "data": {},
    }
