"""The Vertex AI backend: Model Registry versions and aliases, endpoints, and a models bucket for the files.

Every call passes project and location explicitly; tests point the SDK at a local server with
``aiplatform.init`` (``api_endpoint``, ``api_transport="rest"``, anonymous credentials): these calls use it.

Aliases: Vertex has no compare-and-set. ``move_aliases`` re-reads each expected alias right before moving and
fails if it changed; a run that moves the alias between that read and the move (two API calls apart) is not
detected. Adding an alias that another version holds moves it (Vertex documents this), so a move is one call.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.api_core import exceptions as gexc

from ctloop.config import Settings
from ctloop.registry.base import MODEL_FILES, OPTIONAL_FILES, AliasMoved, Deployed, Predict, RegistryError, Version
from ctloop.vertex import Where, labels, model_id_of, resource_id

MODELS_PREFIX = "models"  # in gcp.model_bucket (default the staging bucket, which keeps this prefix)
SERVING_PORT = 8080
PREDICT_ROUTE = "/predict"
HEALTH_ROUTE = "/health"


class VertexRegistry:
    """``Registry`` over Vertex AI for the model with display name ``model.display_name``."""

    kind = "vertex"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.where = Where(settings.gcp.project, settings.gcp.region)
        self.display_name = settings.model.display_name
        self._parent: str | None = None
        self._endpoints: dict[str, Any] = {}
        self._storage: Any = None

    # -- versions and aliases ------------------------------------------------------------------------------
    def parent(self) -> str | None:
        """The registered model's resource name (the oldest with the display name), or None."""
        if self._parent is None:
            from google.cloud import aiplatform

            found = aiplatform.Model.list(filter=f'display_name="{self.display_name}"', order_by="create_time",
                                          **self.where.kw)
            self._parent = found[0].resource_name if found else None
        return self._parent

    def _model(self, ref: str, parent: str | None = None) -> Any | None:
        from google.cloud import aiplatform

        parent = parent or self.parent()
        if parent is None:
            return None
        try:
            return aiplatform.Model(model_name=f"{parent}@{ref}", **self.where.kw)
        except gexc.NotFound:
            return None

    def _version(self, model: Any, parent: str) -> Version:
        return Version(parent, str(model.version_id), model.uri or "", tuple(model.version_aliases or ()))

    def find_version(self, ref: str) -> Version | None:
        model = self._model(str(ref))
        return None if model is None else self._version(model, self.parent())

    def get_version(self, version: str) -> Version:
        found = self.find_version(version)
        if found is None:
            raise RegistryError(f"model {self.display_name!r} ({self.parent() or 'not registered'}) has no "
                                f"version {version!r}")
        return found

    def store_model(self, model_dir: Path, key: str) -> str:
        bucket_name = self.settings.gcp.model_bucket or self.settings.gcp.staging_bucket
        prefix = f"{MODELS_PREFIX}/{self.display_name}/{key}"
        bucket = self._storage_client().bucket(bucket_name)
        present = [name for name in OPTIONAL_FILES if (Path(model_dir) / name).is_file()]
        for name in [*MODEL_FILES, *present]:  # with the ONNX export and the gate's verdict on it, when there
            # Create-only: the key names one version, registered only after this copy, and a retried step
            # copies the same input artifact again, so an object already there holds these bytes.
            with suppress(gexc.PreconditionFailed):
                bucket.blob(f"{prefix}/{name}").upload_from_filename(str(Path(model_dir) / name),
                                                                     if_generation_match=0)
        return f"gs://{bucket_name}/{prefix}"

    def _storage_client(self) -> Any:
        if self._storage is None:
            from google.cloud import storage

            self._storage = storage.Client(project=self.settings.gcp.project)
        return self._storage

    def create_version(self, artifact_uri: str, run_id: str, aliases: list[str], labels: Mapping[str, str],
                       metrics: Mapping[str, float], lineage: Mapping[str, Any],
                       environment: Mapping[str, str]) -> Version:
        from google.cloud import aiplatform

        if not artifact_uri.startswith("gs://"):
            raise ValueError(f"model uri {artifact_uri!r}: Vertex AI registers models from gs:// URIs")

        def existing(parent: str) -> Version | None:
            for alias in aliases:
                done = self._model(alias, parent)
                if done is not None:
                    return self._version(done, parent)
            return None

        def upload(**kw: Any) -> Any:
            # Fresh keyword arguments per call: the SDK appends "default" to the version_aliases list it is given.
            return aiplatform.Model.upload(version_aliases=list(aliases), **common, **kw)

        common = dict(
            display_name=self.display_name,
            artifact_uri=artifact_uri,
            serving_container_image_uri=self.settings.gcp.serving_image,
            serving_container_predict_route=PREDICT_ROUTE,
            serving_container_health_route=HEALTH_ROUTE,
            serving_container_ports=[SERVING_PORT],
            serving_container_environment_variables=dict(environment) or None,
            version_description=_describe(run_id, metrics),
            labels=dict(labels),
            sync=True,
            **self.where.kw,
        )
        parent = self.parent()
        if parent is not None:
            # Never the default version: traffic and the champion alias move only in the deploy step.
            model = upload(parent_model=parent, is_default_version=False)
        else:
            model_id = resource_id(self.display_name)
            parent = f"{self.where.parent}/models/{model_id}"
            try:
                # A fixed model id: two first runs racing to create the model cannot make two of them.
                model = upload(model_id=model_id)
            except gexc.Conflict:
                if (found := existing(parent)) is not None:
                    return found
                model = upload(parent_model=parent, is_default_version=False)
            self._parent = parent
        return Version(parent, str(model.version_id), artifact_uri, tuple(aliases))

    def move_aliases(self, moves: Mapping[str, str], expected: Mapping[str, str | None]) -> None:
        from google.cloud import aiplatform

        parent = self.parent()
        if parent is None:
            raise RegistryError(f"model {self.display_name!r} is not registered")
        for alias, want in expected.items():
            holder = self._model(alias, parent)
            found = None if holder is None else str(holder.version_id)
            if found != want:
                raise AliasMoved(alias, want, found)
        registry = aiplatform.models.ModelRegistry(parent, **self.where.kw)
        for alias, version in moves.items():
            registry.add_version_aliases([alias], str(version))

    def resource_url(self, resource_name: str) -> str | None:
        return f"https://{self.where.location}-aiplatform.googleapis.com/v1/{resource_name}"

    # -- endpoints -----------------------------------------------------------------------------------------
    def _endpoint(self, name: str) -> Any | None:
        from google.cloud import aiplatform

        if name not in self._endpoints:
            found = aiplatform.Endpoint.list(filter=f'display_name="{name}"', order_by="create_time",
                                             **self.where.kw)
            if not found:
                return None
            self._endpoints[name] = found[0]
        return self._endpoints[name]

    def ensure_endpoint(self, name: str) -> str:
        """Find the endpoint by display name, else create it with an id derived from the name.

        The derived id makes creation idempotent: a concurrent or repeated create gets 409 and reads the winner.
        """
        from google.cloud import aiplatform

        endpoint = self._endpoint(name)
        if endpoint is None:
            endpoint_id = resource_id(name)
            try:
                endpoint = aiplatform.Endpoint.create(display_name=name, endpoint_id=endpoint_id,
                                                      labels=labels(self.settings.labels),
                                                      **self._request_logging(name), **self.where.kw)
            except gexc.Conflict:
                endpoint = aiplatform.Endpoint(endpoint_name=f"{self.where.parent}/endpoints/{endpoint_id}",
                                               **self.where.kw)
            self._endpoints[name] = endpoint
        else:
            self._enable_request_logging(endpoint, name)
        return endpoint.resource_name

    def _enable_request_logging(self, endpoint: Any, name: str) -> None:
        """An endpoint created before request-response logging was configured gets it (patched once; an endpoint
        that already logs anywhere is left as it is: Vertex writes only to a table it created itself)."""
        want = self._request_logging(name)
        if not want or endpoint.gca_resource.predict_request_response_logging_config.enabled:
            return
        from google.cloud.aiplatform.compat.types import endpoint as gca_endpoint
        from google.cloud.aiplatform.compat.types import io as gca_io
        from google.protobuf import field_mask_pb2

        config = gca_endpoint.PredictRequestResponseLoggingConfig(
            enabled=True, sampling_rate=want["request_response_logging_sampling_rate"],
            bigquery_destination=gca_io.BigQueryDestination(
                output_uri=want["request_response_logging_bq_destination_table"]))
        endpoint.api_client.update_endpoint(
            endpoint=gca_endpoint.Endpoint(name=endpoint.resource_name,
                                           predict_request_response_logging_config=config),
            update_mask=field_mask_pb2.FieldMask(paths=["predict_request_response_logging_config"]))

    def _request_logging(self, name: str) -> dict[str, Any]:
        """The production endpoint logs a ``monitoring.sample_rate`` share of its requests and responses to
        BigQuery (``canary.request_log_table``); staging and a disabled log get nothing."""
        s = self.settings
        if name != s.deploy.production_endpoint or not s.canary.request_log_table or s.monitoring.sample_rate <= 0:
            return {}
        return {"enable_request_response_logging": True,
                "request_response_logging_sampling_rate": s.monitoring.sample_rate,
                "request_response_logging_bq_destination_table":
                    f"bq://{s.gcp.project}.{s.data.bq_dataset}.{s.canary.request_log_table}"}

    def deployments(self, endpoint: str) -> list[Deployed] | None:
        ep = self._endpoint(endpoint)
        if ep is None:
            return None
        parent = self.parent()
        mine = model_id_of(parent) if parent else None
        # Compared by model id: Vertex answers with the project number where we used the project id. Another
        # model's deployment keeps its traffic but never matches one of this model's versions.
        return [Deployed(d.id, d.version if d.model_id == mine else f"{d.model_id}@{d.version}", d.traffic)
                for d in _deployed_models(ep)]

    def deploy(self, endpoint: str, version: str, traffic_split: Mapping[str, int]) -> Deployed:
        from google.cloud import aiplatform

        d = self.settings.deploy
        ep = self._endpoint(endpoint)
        if ep is None:
            raise RegistryError(f"endpoint {endpoint!r} does not exist; create it with ensure_endpoint")
        model = aiplatform.Model(model_name=f"{self.parent()}@{version}", **self.where.kw)
        ep.deploy(model=model, traffic_split=dict(traffic_split), machine_type=d.machine_type,
                  min_replica_count=d.min_replicas, max_replica_count=d.max_replicas,
                  deployed_model_display_name=f"{self.display_name}-v{version}",
                  service_account=self.settings.gcp.serving_service_account or None, sync=True)
        deployed = next((x for x in self.deployments(endpoint) or () if x.version == str(version)), None)
        if deployed is None:
            raise RegistryError(f"{ep.resource_name}: {self.parent()}@{version} is not listed after deploying")
        return deployed

    def undeploy(self, endpoint: str, deployed: Deployed, traffic_split: Mapping[str, int] | None = None) -> None:
        ep = self._endpoint(endpoint)
        if ep is None:
            return
        with suppress(gexc.NotFound):  # already gone
            ep.undeploy(deployed.id, traffic_split=dict(traffic_split) if traffic_split else None)

    def set_traffic(self, endpoint: str, traffic_split: Mapping[str, int]) -> None:
        ep = self._endpoint(endpoint)
        if ep is None:
            raise RegistryError(f"endpoint {endpoint!r} does not exist")
        ep.update(traffic_split=dict(traffic_split))

    @contextmanager
    def predictor(self, endpoint: str, deployed: Deployed) -> Iterator[Predict]:
        ep = self._endpoint(endpoint)

        def predict(instances: list[dict[str, Any]]) -> Any:
            answer = ep.predict(instances=instances)
            if answer.deployed_model_id and answer.deployed_model_id != deployed.id:
                # Another run's candidate took the staging endpoint's traffic meanwhile.
                raise RuntimeError(f"answered by deployed model {answer.deployed_model_id!r}, not "
                                   f"{deployed.id!r}")
            return list(answer.predictions)

        yield predict


@dataclass(frozen=True)
class _DeployedModel:
    id: str
    model_id: str
    version: str
    traffic: int
    create_time: str


def _deployed_models(endpoint: Any) -> list[_DeployedModel]:
    """The endpoint's deployed models, oldest first, with their traffic share (read fresh from the API)."""
    split = endpoint.traffic_split  # this property re-reads the endpoint
    out = [
        _DeployedModel(id=d.id, model_id=model_id_of(d.model), version=str(d.model_version_id or ""),
                       traffic=int(split.get(d.id, 0)),
                       create_time=d.create_time.isoformat() if d.create_time else "")
        for d in endpoint.list_models()
    ]
    return sorted(out, key=lambda d: (d.create_time, d.id))


def _describe(run_id: str, metrics: Mapping[str, float]) -> str:
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if not k.startswith("champion_"))
    return f"ctloop run {run_id}" + (f": {shown}" if shown else "")
