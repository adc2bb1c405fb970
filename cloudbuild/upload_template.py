"""Upload compiled pipeline templates to an Artifact Registry KFP repository and point tags at them.

    python cloudbuild/upload_template.py --host https://REGION-kfp.pkg.dev/PROJECT/REPO \
        --template build/pipelines --tags "$SHORT_SHA,latest"

``--template`` is one compiled YAML or a directory of them (every ``*.yaml``). Re-running is safe:
Artifact Registry versions are content-addressed (``sha256:<digest of the file>``), and every tag is
created or, when it already exists, moved to this version, so a retried build converges on the same state.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

# Artifact Registry tag ids: letters, digits, '-', '_', '.'; they must not look like a version.
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UploadError(RuntimeError):
    """A template or argument is unusable, or the registry refused the upload."""


@dataclass(frozen=True)
class Uploaded:
    template: Path
    package: str
    version: str
    tags: tuple[str, ...]


def template_files(path: Path) -> list[Path]:
    """The compiled templates under ``path`` (a file, or every ``*.yaml`` in a directory), sorted."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.yaml") if p.is_file())
        if not files:
            raise UploadError(f"--template {path}: expected compiled pipeline *.yaml files, found none")
        return files
    raise UploadError(f"--template {path}: no such file or directory")


def pipeline_name(template: Path) -> str:
    """The package name the registry files a template under: the compiled pipeline's ``pipelineInfo.name``."""
    try:
        doc = next(iter(yaml.safe_load_all(template.read_text())), None)
    except yaml.YAMLError as exc:
        raise UploadError(f"{template}: not valid YAML ({exc})") from exc
    name = (doc or {}).get("pipelineInfo", {}).get("name") if isinstance(doc, dict) else None
    if not name:
        raise UploadError(f"{template}: expected a compiled KFP pipeline with pipelineInfo.name, found none")
    return str(name)


def parse_tags(raw: str) -> list[str]:
    tags = [t.strip() for t in raw.split(",") if t.strip()]
    for tag in tags:
        if not _TAG.match(tag) or tag.startswith("sha256:"):
            raise UploadError(
                f"--tags: {tag!r} is not a valid tag (letters, digits, '.', '_', '-'; "
                "at most 128 characters; not 'sha256:...')"
            )
    return tags


def upload(client: Any, template: Path, tags: list[str]) -> Uploaded:
    """Upload one template, then create (or move) each tag onto the uploaded version."""
    package = pipeline_name(template)
    digest = "sha256:" + hashlib.sha256(template.read_bytes()).hexdigest()
    try:
        package, version = client.upload_pipeline(file_name=str(template))
    except requests.HTTPError as exc:
        # The same content uploaded before (a retried build) is the same version: carry on with its digest.
        if exc.response is None or exc.response.status_code != 409:
            raise UploadError(f"{template}: upload refused: {_describe(exc)}") from exc
        version = digest
    for tag in tags:
        try:
            client.create_tag(package, version, tag)
        except requests.HTTPError as exc:
            if exc.response is None or exc.response.status_code != 409:
                raise UploadError(f"{template}: tag {tag!r} refused: {_describe(exc)}") from exc
            client.update_tag(package, version, tag)
    return Uploaded(template=template, package=package, version=version, tags=tuple(tags))


def _describe(exc: requests.HTTPError) -> str:
    response = exc.response
    if response is None:
        return str(exc)
    return f"HTTP {response.status_code} {response.text[:300]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="https://REGION-kfp.pkg.dev/PROJECT/REPOSITORY")
    parser.add_argument("--template", required=True, type=Path, help="compiled YAML, or a directory of them")
    parser.add_argument("--tags", default="", help="comma-separated tags, e.g. $SHORT_SHA,latest")
    args = parser.parse_args(argv)
    try:
        tags = parse_tags(args.tags)
        files = template_files(args.template)
        from kfp.registry import RegistryClient

        # On an Artifact Registry host the client authenticates with the build's default credentials.
        client = RegistryClient(host=args.host)
        for template in files:
            done = upload(client, template, tags)
            print(
                f"{done.template}: {args.host.rstrip('/')}/{done.package}/{done.version} "
                f"tags={','.join(done.tags) or '-'}"
            )
    except UploadError as exc:
        print(f"upload_template: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
