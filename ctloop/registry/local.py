"""The local backend: the SQLite registry (``ctloop.registry.sqlite``), a models directory under the work
directory, and prediction servers on 127.0.0.1 for deployed versions."""

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ctloop.config import Settings
from ctloop.registry.base import MODEL_FILES, OPTIONAL_FILES, Deployed, LocalServer, Predict, RegistryError, Version
from ctloop.registry.sqlite import LocalRegistry, ModelVersion


class LocalBackend:
    """``Registry`` over the SQLite store at ``local.registry_db``; model copies under ``local.workdir/models``."""

    kind = "local"

    def __init__(self, settings: Settings, local_server: LocalServer | None = None) -> None:
        self.name = settings.model.display_name
        self.store = LocalRegistry(settings.local.registry_db)
        self.models_dir = settings.local.models_dir
        self._serve = local_server

    def _version(self, mv: ModelVersion) -> Version:
        return Version(self.name, str(mv.version_id), mv.artifact_uri, mv.aliases)

    # -- versions and aliases ------------------------------------------------------------------------------
    def find_version(self, ref: str) -> Version | None:
        try:
            return self.get_version(ref)
        except RegistryError:
            return None

    def get_version(self, version: str) -> Version:
        ref = str(version)
        return self._version(self.store.get_version(self.name, int(ref) if ref.isdigit() else ref))

    def store_model(self, model_dir: Path, key: str) -> str:
        return str(copy_model_files(Path(model_dir), self.models_dir / self.name / key))

    def create_version(self, artifact_uri: str, run_id: str, aliases: list[str], labels: Mapping[str, str],
                       metrics: Mapping[str, float], lineage: Mapping[str, Any],
                       environment: Mapping[str, str]) -> Version:
        # ``environment`` configures the Vertex serving container; local servers take it from the settings.
        return self._version(self.store.register_version(
            self.name, artifact_uri, run_key=run_id, labels=labels, metrics=metrics, lineage=lineage,
            aliases=aliases))

    def move_aliases(self, moves: Mapping[str, str], expected: Mapping[str, str | None]) -> None:
        want = {a: (None if v is None else int(v)) for a, v in expected.items()}
        self.store.compare_and_set_aliases(self.name, {a: int(v) for a, v in moves.items()}, want)

    def resource_url(self, resource_name: str) -> str | None:
        return None

    # -- endpoints -----------------------------------------------------------------------------------------
    def ensure_endpoint(self, name: str) -> str:
        return self.store.ensure_endpoint(name).name

    def deployments(self, endpoint: str) -> list[Deployed] | None:
        ep = self.store.get_endpoint(endpoint)
        if ep is None:
            return None
        # Another model's deployment keeps its traffic but never matches one of this model's versions.
        return [Deployed(d.deployed_model_id, str(d.version) if d.model == self.name else f"{d.model}@{d.version}",
                         d.traffic_percent) for d in ep.deployments]

    def deploy(self, endpoint: str, version: str, traffic_split: Mapping[str, int]) -> Deployed:
        d = self.store.deploy(endpoint, self.name, int(version), traffic_split=traffic_split)
        return Deployed(d.deployed_model_id, str(d.version), d.traffic_percent)

    def undeploy(self, endpoint: str, deployed: Deployed, traffic_split: Mapping[str, int] | None = None) -> None:
        self.store.undeploy(endpoint, self.name, int(deployed.version), traffic_split=traffic_split)

    def set_traffic(self, endpoint: str, traffic_split: Mapping[str, int]) -> None:
        self.store.set_traffic(endpoint, traffic_split)

    @contextmanager
    def predictor(self, endpoint: str, deployed: Deployed) -> Iterator[Predict]:
        import httpx

        if self._serve is None:
            raise RegistryError("the local backend predicts through local prediction servers: open the "
                                "registry with local_server=... to smoke-test a deployment")
        version = self.get_version(deployed.version)
        with self._serve(deployed, version) as url, httpx.Client(timeout=30.0) as client:
            yield http_predict(client, url, deployed.id)


def http_predict(client: Any, base_url: str, deployed_id: str | None = None) -> Predict:
    """POST instances to a prediction server's /predict with an ``httpx.Client``; a non-200 answer, or an answer
    from another deployment than ``deployed_id``, raises with the reason."""

    def predict(instances: list[dict[str, Any]]) -> Any:
        resp = client.post(f"{base_url}/predict", json={"instances": instances})
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        body = resp.json()
        answered = body.get("deployedModelId")
        if deployed_id is not None and answered not in (None, deployed_id):
            raise RuntimeError(f"answered by deployed model {answered!r}, not {deployed_id!r}")
        return body.get("predictions")

    return predict


def copy_model_files(source: Path, target: Path) -> Path:
    """Copy the model files to ``target`` via a temp dir renamed into place; a complete copy is kept."""
    if all((target / name).is_file() for name in MODEL_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name in MODEL_FILES:
            shutil.copy2(source / name, tmp / name)
        for name in OPTIONAL_FILES:  # the ONNX export and the gate's verdict on it, when there
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
