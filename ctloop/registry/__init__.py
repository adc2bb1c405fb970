"""Model registries and endpoints: one interface (``base.Registry``), a local and a Vertex AI backend.

``open_registry(settings)`` is the one place that picks the backend from ``settings.backend``.
``LocalRegistry`` (the SQLite store under the local backend) is also used directly by the local-only tools
(``ctloop serve``, ``ctloop registry``).
"""

from ctloop.config import Settings
from ctloop.registry.base import (
    CANARY_ALIAS,
    CHAMPION_ALIAS,
    NEW_DEPLOYMENT,
    PREVIOUS_CHAMPION_ALIAS,
    AliasMoved,
    Deployed,
    LocalServer,
    Registry,
    RegistryError,
    StaleSplit,
    Version,
)
from ctloop.registry.sqlite import (
    DEFAULT_ALIAS,
    Deployment,
    Endpoint,
    LocalRegistry,
    Model,
    ModelVersion,
    check_alias,
    deployed_model_id,
)
from ctloop.registry.traffic import allocate_traffic, unallocate_traffic

__all__ = [
    "CANARY_ALIAS",
    "CHAMPION_ALIAS", "DEFAULT_ALIAS", "NEW_DEPLOYMENT", "PREVIOUS_CHAMPION_ALIAS", "AliasMoved", "Deployed",
    "Deployment", "Endpoint", "LocalRegistry", "LocalServer", "Model", "ModelVersion", "Registry",
    "RegistryError", "StaleSplit", "Version", "allocate_traffic", "check_alias", "deployed_model_id", "open_registry",
    "unallocate_traffic",
]


def open_registry(settings: Settings, local_server: LocalServer | None = None) -> Registry:
    """The registry of ``settings.model.display_name`` on ``settings.backend``.

    ``local_server`` starts the local backend's prediction servers (only the deploy step's smoke test needs
    one); the Vertex backend predicts through its endpoints.
    """
    if settings.backend == "cloud":
        from ctloop.registry.vertex import VertexRegistry

        return VertexRegistry(settings)
    from ctloop.registry.local import LocalBackend

    return LocalBackend(settings, local_server)
