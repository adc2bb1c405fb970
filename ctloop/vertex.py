"""Thin helpers over the aiplatform SDK for the register, deploy and lookup steps.

Every call passes project and location explicitly; tests point the SDK at a local server with
``aiplatform.init`` (``api_endpoint``, ``api_transport="rest"``, anonymous credentials): these calls use it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


def find_parent_model(display_name: str, where: Where) -> Any | None:
    """The registered model with this display name (the oldest if several), or None."""
    from google.cloud import aiplatform

    found = aiplatform.Model.list(filter=f'display_name="{display_name}"', order_by="create_time", **where.kw)
    return found[0] if found else None


def get_model_version(parent_resource: str, version_or_alias: str, where: Where) -> Any | None:
    """``parent@version_or_alias`` as an ``aiplatform.Model``, or None if there is no such version."""
    from google.api_core import exceptions as gexc
    from google.cloud import aiplatform

    try:
        return aiplatform.Model(model_name=f"{parent_resource}@{version_or_alias}", **where.kw)
    except gexc.NotFound:
        return None


def find_endpoint(display_name: str, where: Where) -> Any | None:
    from google.cloud import aiplatform

    found = aiplatform.Endpoint.list(filter=f'display_name="{display_name}"', order_by="create_time",
                                     **where.kw)
    return found[0] if found else None


def find_or_create_endpoint(display_name: str, where: Where, endpoint_labels: Mapping[str, str]) -> Any:
    """Find the endpoint by display name, else create it with an id derived from the name.

    The derived id makes creation idempotent: a concurrent or repeated create gets 409 and reads the winner.
    """
    from google.api_core import exceptions as gexc
    from google.cloud import aiplatform

    endpoint = find_endpoint(display_name, where)
    if endpoint is not None:
        return endpoint
    endpoint_id = resource_id(display_name)
    try:
        return aiplatform.Endpoint.create(display_name=display_name, endpoint_id=endpoint_id,
                                          labels=dict(endpoint_labels), **where.kw)
    except gexc.Conflict:
        return aiplatform.Endpoint(endpoint_name=f"{where.parent}/endpoints/{endpoint_id}", **where.kw)


@dataclass(frozen=True)
class DeployedModel:
    id: str
    model_id: str
    version: str
    traffic: int
    create_time: str


def deployed_models(endpoint: Any) -> list[DeployedModel]:
    """The endpoint's deployed models, oldest first, with their traffic share (read fresh from the API)."""
    split = endpoint.traffic_split  # this property re-reads the endpoint
    out = [
        DeployedModel(id=d.id, model_id=model_id_of(d.model), version=str(d.model_version_id or ""),
                      traffic=int(split.get(d.id, 0)),
                      create_time=d.create_time.isoformat() if d.create_time else "")
        for d in endpoint.list_models()
    ]
    return sorted(out, key=lambda d: (d.create_time, d.id))


def find_deployed(endpoint: Any, model_resource: str, version: str) -> DeployedModel | None:
    """The deployment of ``model@version`` on the endpoint. Compared by model id, since Vertex may answer with
    the project number where we used the project id."""
    mid = model_id_of(model_resource)
    matches = (d for d in deployed_models(endpoint) if d.model_id == mid and d.version == str(version))
    return next(matches, None)


def move_alias(parent_resource: str, alias: str, version: str, where: Where) -> str | None:
    """Point ``alias`` at ``version``; returns the version that held it before (None if none).

    The alias is removed from its old holder first, then added: Vertex keeps an alias on one version only,
    and this order never needs the server to move it implicitly.
    """
    from google.cloud import aiplatform

    registry = aiplatform.models.ModelRegistry(parent_resource, **where.kw)
    holder = get_model_version(parent_resource, alias, where)
    previous = str(holder.version_id) if holder is not None else None
    if previous == str(version):
        return previous
    if previous is not None:
        registry.remove_version_aliases([alias], previous)
    registry.add_version_aliases([alias], str(version))
    return previous
