"""Read the ctloop settings (the pipeline's ``config`` parameter) from a bundle file or a gs:// URI."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from ctloop.config import Settings


class ConfigError(RuntimeError):
    """The ctloop settings cannot be read or are invalid (a deployment problem: the delivery is retried)."""


def read_ctloop_config(location: str, required: tuple[str, ...] = ()) -> Settings:
    """The validated settings at ``location``; read at launch time so a new config applies to the next run.

    ``required``: dotted keys the file must set itself rather than leave to the development defaults (e.g.
    ``gcp.project`` for a Vertex launch)."""
    if location.startswith("gs://"):
        from google.cloud import storage

        bucket, _, name = location[len("gs://"):].partition("/")
        if not bucket or not name:
            raise ConfigError(f"ctloop config {location!r}: expected gs://BUCKET/OBJECT")
        text = storage.Client().bucket(bucket).blob(name).download_as_text()
    else:
        path = Path(location)
        if not path.is_file():
            raise ConfigError(f"ctloop config {path}: file not found (set CTLOOP_TRIGGER_CONFIG to the "
                              "settings YAML shipped in the bundle or a gs:// URI)")
        text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"ctloop config {location}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"ctloop config {location}: expected a mapping at the top level, "
                          f"found {type(data).__name__}")
    for dotted in required:
        node: object = data
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, str) or not node:
            raise ConfigError(f"ctloop config {location}: {dotted} must be set for a Vertex launch, found {node!r}")
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"ctloop config {location}: {where}: {first['msg']}, found {first.get('input')!r}") \
            from None
