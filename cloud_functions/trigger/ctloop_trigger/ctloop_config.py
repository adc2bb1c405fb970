"""Read the ctloop settings YAML that the pipeline gets as ``config`` parameter (bundle file or gs:// URI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(RuntimeError):
    """The ctloop settings cannot be read or lack what a launch needs (a deployment problem: retried)."""


def read_ctloop_config(location: str) -> dict[str, Any]:
    """The YAML mapping at ``location``; read at launch time so a new config applies to the next run."""
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
    return data


def require(config: dict[str, Any], dotted: str, location: str) -> str:
    """A non-empty string setting such as ``gcp.project``; raises ConfigError naming the key and the file."""
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, str) or not node:
        raise ConfigError(f"ctloop config {location}: {dotted} must be set for a Vertex launch, "
                          f"found {node!r}")
    return node
