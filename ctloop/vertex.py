"""Vertex AI names: where resources live, label values, version aliases and resource ids made valid."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

_LABEL_BAD = re.compile(r"[^a-z0-9_-]+")
_SLUG_BAD = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class Where:
    project: str
    location: str

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.location}"

    @property
    def kw(self) -> dict[str, str]:
        return {"project": self.project, "location": self.location}


def label_value(text: str) -> str:
    """A Vertex label value: lowercase letters, digits, ``_`` and ``-``, at most 63 characters."""
    return _LABEL_BAD.sub("-", str(text).lower())[:63]


def labels(base: Mapping[str, str], **extra: str) -> dict[str, str]:
    """``base`` plus ``extra`` (underscores in keys become dashes), keys and values made label-safe."""
    out = {label_value(k): label_value(v) for k, v in base.items()}
    out.update({label_value(k.replace("_", "-")): label_value(v) for k, v in extra.items() if v})
    return out


def _slug(text: str, limit: int, letter_first: bool) -> str:
    """Lowercase ``[a-z0-9-]``, ending alphanumeric, at most ``limit`` long (starting with a letter if asked).

    If anything had to change, a short hash of the original is appended so different inputs stay different.
    """
    slug = _SLUG_BAD.sub("-", text.lower()).strip("-")
    if slug == text and len(slug) <= limit and (slug[:1].isalpha() or (slug and not letter_first)):
        return slug
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    room = limit - len(digest) - 1
    head = slug[:room].strip("-")
    if letter_first and not head[:1].isalpha():
        head = f"x-{head}"[:room].strip("-")
    return f"{head}-{digest}" if head else digest


def run_alias(run_id: str) -> str:
    """The version alias that marks the model version a pipeline run registered: ``run-<run id>``."""
    return "run-" + _slug(run_id, 124, letter_first=False)


def resource_id(display_name: str) -> str:
    """A deterministic model/endpoint id from a display name: a letter first, ``[a-z0-9-]``, <= 63."""
    return _slug(display_name, 63, letter_first=True)


def model_id_of(resource_name: str) -> str:
    """``projects/p/locations/l/models/123@4`` -> ``123``."""
    return resource_name.rstrip("/").split("/")[-1].split("@")[0]
