"""The cloud online store: a BigQuery table the pipeline writes and a Vertex AI Feature Store view serving it.

Terraform makes the table (``online_features.bq_table`` in ``data.bq_dataset``: ``entity_id``, ``state``,
``as_of``, ``feature_timestamp``), the Bigtable-backed ``FeatureOnlineStore`` and the ``FeatureView``
over the table. ``write`` replaces the table's contents in one load job (WRITE_TRUNCATE: a rerun leaves the
same rows, never duplicates) and then syncs the view and waits for the sync to finish, so serving reads the new
states once the step is done. ``read`` is ``FeatureOnlineStoreServiceClient.fetch_feature_values``, one call
per entity (an entity the view does not hold answers NotFound: unknown, first-event features).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ctloop.errors import CtloopError
from ctloop.history import HistoryState
from ctloop.online_store import AS_OF, ENTITY, STATE, OnlineStoreUnavailable, StoredHistory

if TYPE_CHECKING:
    from google.cloud import bigquery
    from google.cloud.aiplatform_v1 import FeatureOnlineStoreAdminServiceClient, FeatureOnlineStoreServiceClient

    from ctloop.config import Settings

FEATURE_TIMESTAMP = "feature_timestamp"
_MAX_PARALLEL_FETCHES = 16
# One lookup sits on a prediction's path: fail it fast rather than hold the request.
FETCH_TIMEOUT_S = 5.0


class FeatureViewSyncError(CtloopError):
    """The feature view's sync failed or did not finish in time; serving still reads the previous states."""


class VertexFeatureStore:
    """History states in BigQuery, served by a Vertex AI Feature Store view."""

    blocking = True

    def __init__(self, *, project: str, location: str, dataset: str, table: str, online_store: str,
                 feature_view: str, labels: Mapping[str, str] | None = None, sync_timeout_seconds: float = 1800.0,
                 sync_poll_seconds: float = 10.0, bq_client: bigquery.Client | None = None,
                 admin_client: FeatureOnlineStoreAdminServiceClient | None = None,
                 serving_client: FeatureOnlineStoreServiceClient | None = None) -> None:
        self.project, self.location = project, location
        self.table_id = f"{project}.{dataset}.{table}"
        self.view = (f"projects/{project}/locations/{location}/featureOnlineStores/{online_store}"
                     f"/featureViews/{feature_view}")
        self.description = f"vertex:{self.view}"
        self.labels = dict(labels or {})
        self.sync_timeout_seconds, self.sync_poll_seconds = sync_timeout_seconds, sync_poll_seconds
        self._bq, self._admin, self._serving = bq_client, admin_client, serving_client

    @classmethod
    def from_settings(cls, settings: Settings, **clients: Any) -> VertexFeatureStore:
        o = settings.online_features
        return cls(project=settings.gcp.project, location=settings.gcp.region, dataset=settings.data.bq_dataset,
                   table=o.bq_table, online_store=o.feature_online_store, feature_view=o.feature_view,
                   labels=settings.labels, sync_timeout_seconds=o.sync_timeout_seconds,
                   sync_poll_seconds=o.sync_poll_seconds, **clients)

    @classmethod
    def for_view(cls, view: str, **clients: Any) -> VertexFeatureStore:
        """A reader of ``projects/P/locations/L/featureOnlineStores/S/featureViews/V`` (what serving needs)."""
        parts = view.strip("/").split("/")
        if len(parts) != 8 or parts[0::2] != ["projects", "locations", "featureOnlineStores", "featureViews"]:
            raise ValueError(f"{view!r}: expected projects/P/locations/L/featureOnlineStores/S/featureViews/V")
        return cls(project=parts[1], location=parts[3], dataset="", table="", online_store=parts[5],
                   feature_view=parts[7], **clients)

    def _api_endpoint(self) -> str:
        return f"{self.location}-aiplatform.googleapis.com"

    @property
    def bq(self) -> bigquery.Client:
        if self._bq is None:
            from google.cloud import bigquery

            self._bq = bigquery.Client(project=self.project, location=self.location)
        return self._bq

    @property
    def admin(self) -> FeatureOnlineStoreAdminServiceClient:
        if self._admin is None:
            from google.cloud.aiplatform_v1 import FeatureOnlineStoreAdminServiceClient

            self._admin = FeatureOnlineStoreAdminServiceClient(client_options={"api_endpoint": self._api_endpoint()})
        return self._admin

    @property
    def serving(self) -> FeatureOnlineStoreServiceClient:
        if self._serving is None:
            from google.cloud.aiplatform_v1 import FeatureOnlineStoreServiceClient

            self._serving = FeatureOnlineStoreServiceClient(client_options={"api_endpoint": self._api_endpoint()})
        return self._serving

    # ------------------------------------------------------------------ write (the pipeline step)

    def write(self, states: Mapping[str, HistoryState], as_of: str) -> int:
        self.load_table(states, as_of)
        self.sync()
        return len(states)

    def load_table(self, states: Mapping[str, HistoryState], as_of: str) -> None:
        """Replace the table's rows with ``states`` in one load job."""
        from google.cloud import bigquery

        schema = [bigquery.SchemaField(ENTITY, "STRING", mode="REQUIRED"),
                  bigquery.SchemaField(STATE, "STRING", mode="REQUIRED"),
                  bigquery.SchemaField(AS_OF, "STRING", mode="REQUIRED"),
                  bigquery.SchemaField(FEATURE_TIMESTAMP, "TIMESTAMP", mode="REQUIRED")]
        rows = [{ENTITY: e, STATE: s.to_json(), AS_OF: as_of, FEATURE_TIMESTAMP: as_of}
                for e, s in states.items()]
        config = bigquery.LoadJobConfig(schema=schema, write_disposition="WRITE_TRUNCATE",
                                        source_format="NEWLINE_DELIMITED_JSON", labels=self.labels)
        self.bq.load_table_from_json(rows, self.table_id, job_config=config).result()

    def sync(self) -> str:
        """Sync the feature view from the table and wait for the sync; returns the sync's resource name."""
        name = self.admin.sync_feature_view(feature_view=self.view).feature_view_sync
        deadline = time.monotonic() + self.sync_timeout_seconds
        while True:
            answer = self.admin.get_feature_view_sync(name=name)
            sync = type(answer).pb(answer)
            if sync.final_status.code:
                raise FeatureViewSyncError(f"feature view sync {name} failed: {sync.final_status.message} "
                                           f"(code {sync.final_status.code})")
            if sync.run_time.HasField("end_time"):  # an unset timestamp reads as the epoch, not as None
                return name
            if time.monotonic() >= deadline:
                raise FeatureViewSyncError(f"feature view sync {name} did not finish within "
                                           f"{self.sync_timeout_seconds:.0f} s (online_features.sync_timeout_seconds)")
            time.sleep(self.sync_poll_seconds)

    # ------------------------------------------------------------------ read (serving)

    def read(self, entity_ids: Iterable[str]) -> dict[str, StoredHistory]:
        ids = list(dict.fromkeys(entity_ids))
        if len(ids) <= 1:
            found = [self._fetch(e) for e in ids]
        else:
            with ThreadPoolExecutor(max_workers=min(len(ids), _MAX_PARALLEL_FETCHES)) as pool:
                found = list(pool.map(self._fetch, ids))
        return {e: f for e, f in zip(ids, found, strict=True) if f is not None}

    def _fetch(self, entity_id: str) -> StoredHistory | None:
        from google.api_core.exceptions import NotFound
        from google.api_core.retry import Retry, if_transient_error
        from google.cloud.aiplatform_v1 import FeatureViewDataKey, FetchFeatureValuesRequest

        request = FetchFeatureValuesRequest(feature_view=self.view, data_key=FeatureViewDataKey(key=entity_id))
        # Transient failures (a reset keep-alive connection, 503) are retried briefly, within the timeout.
        retry = Retry(predicate=if_transient_error, initial=0.05, maximum=0.5, timeout=FETCH_TIMEOUT_S)
        try:
            response = self.serving.fetch_feature_values(request=request, retry=retry, timeout=FETCH_TIMEOUT_S)
        except NotFound:
            return None
        except Exception as exc:  # noqa: BLE001 - any other failure: the state cannot be read, say so (503)
            raise OnlineStoreUnavailable(f"{self.view}: fetch_feature_values for entity {entity_id!r} failed: "
                                         f"{type(exc).__name__}: {exc}") from exc
        values = {f.name: f.value.string_value for f in response.key_values.features}
        if not values.get(STATE):
            return None
        try:
            state = HistoryState.from_json(values[STATE])
        except (ValueError, TypeError) as exc:
            raise OnlineStoreUnavailable(f"{self.view}: entity {entity_id!r} has an unreadable state: {exc}") from exc
        return StoredHistory(state, values.get(AS_OF, ""))

