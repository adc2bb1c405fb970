"""What every model registry + endpoint backend offers: the interface the register, lookup and deploy steps use.

Two backends implement it: ``local`` (SQLite + prediction servers on 127.0.0.1) and ``vertex`` (Vertex AI Model
Registry + endpoints). ``ctloop.registry.open_registry`` picks one from the settings; nothing else looks at
``settings.backend`` to reach a registry.

Each backend works on one model (``model.display_name``). Versions and deployed-model ids are strings on both.
Traffic splits follow Vertex's convention: deployed-model id -> percent, ``NEW_DEPLOYMENT`` (``"0"``) standing
for the model being deployed, ids left out get 0%, the total is 100 (or the split is empty).
"""

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ctloop.errors import CtloopError

# What a registered model directory holds (re-exported for the registry implementations).
from ctloop.model_runtime import MODEL_FILES as MODEL_FILES
from ctloop.model_runtime import OPTIONAL_FILES as OPTIONAL_FILES

CHAMPION_ALIAS = "champion"
PREVIOUS_CHAMPION_ALIAS = "previous-champion"
CANARY_ALIAS = "canary"  # the candidate on production's canary share (or in shadow), not yet judged
NEW_DEPLOYMENT = "0"

Predict = Callable[[list[dict[str, Any]]], Any]


class RegistryError(CtloopError):
    """A registry request that cannot be honoured (unknown model/version/endpoint, bad alias or traffic)."""


class StaleSplit(RegistryError):
    """A traffic split names a deployment that is gone: the endpoint changed since it was read."""


class AliasMoved(RegistryError):
    """A compare-and-set alias move found the alias on another version than the one expected."""

    def __init__(self, alias: str, expected: str | None, found: str | None) -> None:
        self.alias, self.expected, self.found = alias, expected, found
        super().__init__(f"alias {alias!r} is on version {found or 'none'}, expected "
                         f"{expected or 'none'}")


@dataclass(frozen=True)
class Version:
    """One registered model version."""

    model_name: str  # local: the model's display name; Vertex: projects/.../models/ID
    version: str
    artifact_uri: str
    aliases: tuple[str, ...] = ()

    @property
    def resource_name(self) -> str:
        """``model@version``: the versioned name on both backends."""
        return f"{self.model_name}@{self.version}"


@dataclass(frozen=True)
class Deployed:
    """One model version deployed on an endpoint, with its share of the endpoint's traffic."""

    id: str
    version: str
    traffic: int


class Registry(Protocol):
    """Model versions, aliases and endpoints of one model on one backend."""

    kind: str  # "local" or "vertex"

    # -- versions and aliases ------------------------------------------------------------------------------
    def find_version(self, ref: str) -> Version | None:
        """The version with this number or alias; None if the model or the version does not exist."""

    def get_version(self, version: str) -> Version:
        """Like ``find_version`` but raises ``RegistryError`` naming the versions there are."""

    def store_model(self, model_dir: Path, key: str) -> str:
        """Copy the model directory's files to the models location under ``<model>/<key>``; returns its URI.

        Idempotent (a retry leaves one complete copy). The registry's copy outlives the pipeline root.
        """

    def create_version(self, artifact_uri: str, run_id: str, aliases: list[str], labels: Mapping[str, str],
                       metrics: Mapping[str, float], lineage: Mapping[str, Any],
                       environment: Mapping[str, str]) -> Version:
        """Register ``artifact_uri`` as a new version carrying ``aliases`` (never the default version but for a
        model's first). If a version holding one of ``aliases`` appears meanwhile, that version is returned."""

    def move_aliases(self, moves: Mapping[str, str], expected: Mapping[str, str | None]) -> None:
        """Compare-and-set: point each alias in ``moves`` at its version if every alias in ``expected`` still is
        on that version (None: on no version), else raise ``AliasMoved`` and move nothing."""

    def resource_url(self, resource_name: str) -> str | None:
        """The REST URL of a model version or endpoint (None when the backend has none)."""

    # -- endpoints -----------------------------------------------------------------------------------------
    def ensure_endpoint(self, name: str) -> str:
        """Find or create the endpoint with this display name; returns its resource name."""

    def deployments(self, endpoint: str) -> list[Deployed] | None:
        """The endpoint's deployed versions, oldest first (None when the endpoint does not exist)."""

    def deploy(self, endpoint: str, version: str, traffic_split: Mapping[str, int]) -> Deployed:
        """Deploy ``version`` and set the endpoint's split to ``traffic_split`` (``NEW_DEPLOYMENT`` = it)."""

    def undeploy(self, endpoint: str, deployed: Deployed, traffic_split: Mapping[str, int] | None = None) -> None:
        """Remove a deployment; the others scale back up to 100% (read on the freshest state the backend has),
        or take ``traffic_split``. A no-op if it is already gone."""

    def set_traffic(self, endpoint: str, traffic_split: Mapping[str, int]) -> None:
        """Replace the endpoint's split (deployed ids left out get 0%; the total is 100)."""

    def predictor(self, endpoint: str, deployed: Deployed) -> AbstractContextManager[Predict]:
        """A function sending instances to exactly this deployment (raising if another one answers)."""


LocalServer = Callable[[Deployed, Version], AbstractContextManager[str]]
"""Starts a prediction server for one deployed version on 127.0.0.1 and yields its base URL."""


def split_of(deployed: list[Deployed] | None) -> dict[str, int]:
    return {d.id: d.traffic for d in deployed or ()}


def find_deployed(deployed: list[Deployed] | None, version: str) -> Deployed | None:
    return next((d for d in deployed or () if d.version == str(version)), None)

