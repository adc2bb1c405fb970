"""Which online store the settings name (ctloop/online_store.py): SQLite locally, Vertex AI in the cloud."""

from __future__ import annotations

from ctloop.config import Settings
from ctloop.online_store import FEATURE_VIEW_ENV, OnlineStore, SQLiteStore, local_store_path


def open_online_store(settings: Settings) -> OnlineStore:
    """The settings' store: SQLite under ``local.workdir`` locally, the Vertex AI feature view in the cloud."""
    if settings.backend == "local":
        return SQLiteStore(local_store_path(settings))
    from ctloop.online_store_vertex import VertexFeatureStore

    return VertexFeatureStore.from_settings(settings)


def online_store_environment(settings: Settings) -> dict[str, str]:
    """The serving container's online-store variable (cloud: the feature view's resource name)."""
    if settings.backend == "local":
        return {}
    from ctloop.online_store_vertex import VertexFeatureStore

    return {FEATURE_VIEW_ENV: VertexFeatureStore.from_settings(settings).view}
