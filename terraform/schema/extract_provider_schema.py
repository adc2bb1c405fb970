"""Extract a Terraform provider's argument schema from its prebuilt CDKTF bindings into a compact JSON file.

``terraform validate`` needs the provider binary; the PyPI packages ``cdktf-cdktf-provider-<name>`` carry the
same schema as a jsii assembly (every resource and data source, its arguments and nested blocks, and which are
required). tests/test_terraform_schema.py checks every block in terraform/ against the extracts.

    pip download --no-deps cdktf-cdktf-provider-google==16.12.0 cdktf-cdktf-provider-archive==11.0.1 -d /tmp/w
    python terraform/schema/extract_provider_schema.py /tmp/w/cdktf_cdktf_provider_google-16.12.0-py3-none-any.whl
    python terraform/schema/extract_provider_schema.py /tmp/w/cdktf_cdktf_provider_archive-11.0.1-py3-none-any.whl

The wheels (the google one is 49 MB) are not dependencies of the project: only the extracts are committed,
as terraform/schema/<provider>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_BASES = ("cdktf.TerraformResource", "cdktf.TerraformDataSource")
# The registry link in each class summary names the Terraform type and the provider version.
_TYPE_LINK = re.compile(
    r"registry\.terraform\.io/providers/hashicorp/(?P<provider>\w+)/(?P<version>[\d.]+)/docs/"
    r"(?P<kind>resources|data-sources)/\w+ (?P<type>\w+)\}"
)
# Each property's docs link to its argument: ".../compute_network#auto_create_subnetworks ComputeNetwork#...".
_ARG_LINK = re.compile(r"#(?P<arg>\w+) \w+#\w+\}")


def load_assembly(wheel: Path) -> dict[str, Any]:
    """The jsii assembly (``.jsii``) inside the wheel's bundled npm tarball."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".jsii.tgz")]
        blob = archive.read(name)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        member = tar.extractfile("package/.jsii")
        assert member is not None
        return json.load(member)


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _struct_fqns(type_ref: dict[str, Any], types: dict[str, Any]) -> list[str]:
    """Struct (nested block) types a property may hold: directly, in a list, or in a union."""
    if "fqn" in type_ref:
        target = types.get(type_ref["fqn"])
        return [type_ref["fqn"]] if target and target.get("datatype") else []
    if "collection" in type_ref:
        return _struct_fqns(type_ref["collection"]["elementtype"], types)
    if "union" in type_ref:
        return [fqn for member in type_ref["union"]["types"] for fqn in _struct_fqns(member, types)]
    return []


def _block_schema(fqn: str, types: dict[str, Any], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """{"arguments": [...], "required": [...], "blocks": {name: schema}} of one config struct."""
    arguments: list[str] = []
    required: list[str] = []
    blocks: dict[str, Any] = {}
    for prop in types[fqn].get("properties", []):
        match = _ARG_LINK.search(prop.get("docs", {}).get("remarks", "") + prop.get("docs", {}).get("summary", ""))
        name = match.group("arg") if match else _snake(prop["name"])
        nested = _struct_fqns(prop["type"], types)
        if nested and nested[0] not in seen:
            blocks[name] = _block_schema(nested[0], types, (*seen, fqn))
        else:
            arguments.append(name)
        if not prop.get("optional"):
            required.append(name)
    return {"arguments": sorted(arguments), "required": sorted(required), "blocks": dict(sorted(blocks.items()))}


def extract(assembly: dict[str, Any]) -> dict[str, Any]:
    """{"version", "resource": {type: schema}, "data": {type: schema}} for every type in the provider."""
    types = assembly["types"]
    out: dict[str, Any] = {"resource": {}, "data": {}}
    versions, providers = set(), set()
    for cls in types.values():
        if cls.get("kind") != "class" or cls.get("base") not in _BASES:
            continue
        link = _TYPE_LINK.search(cls["docs"]["summary"])
        if not link:
            raise ValueError(f"{cls['fqn']}: no registry link in its docs: {cls['docs']['summary']!r}")
        versions.add(link.group("version"))
        providers.add(link.group("provider"))
        config = [p for p in cls["initializer"]["parameters"] if p["name"] == "config"][0]["type"]["fqn"]
        kind = "resource" if link.group("kind") == "resources" else "data"
        out[kind][link.group("type")] = _block_schema(config, types)
    if len(versions) != 1 or len(providers) != 1:
        raise ValueError(f"expected one provider and version in the assembly, found {providers} {versions}")
    provider = providers.pop()
    return {
        "source": f"PyPI cdktf-cdktf-provider-{provider} {assembly['version']} (jsii assembly)",
        "provider": f"hashicorp/{provider}",
        "version": versions.pop(),
        "resource": dict(sorted(out["resource"].items())),
        "data": dict(sorted(out["data"].items())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="cdktf_cdktf_provider_<name>-*.whl")
    parser.add_argument("--out", type=Path, help="default: terraform/schema/<provider>.json")
    args = parser.parse_args(argv)
    schema = extract(load_assembly(args.wheel))
    args.out = args.out or HERE / f"{schema['provider'].split('/')[1]}.json"
    args.out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=False) + "\n")
    print(f"wrote {args.out}: provider {schema['version']}, {len(schema['resource'])} resources, "
          f"{len(schema['data'])} data sources")
    return 0


if __name__ == "__main__":
    sys.exit(main())
