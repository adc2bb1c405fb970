"""deploy: staging, smoke test, production (canary or cutover), prune old versions, move the champion alias.

1. The version goes to the staging endpoint with 100% of its traffic.
2. Smoke test: ``deploy.smoke_instances`` rows of the test split (features only) are sent as one request and
   then one by one; every answer must hold one prediction per instance, label 0/1 and a finite probability in
   [0, 1], within ``deploy.smoke_max_latency_ms``. Locally this runs the real prediction server on 127.0.0.1.
3. Failure rolls back: the version leaves staging (its previous split is restored), production is untouched,
   the champion alias stays, and the step raises ``SmokeTestFailed`` with the reasons.
4. Production gets the version with ``deploy.canary_percent`` of its traffic (100 = cutover; an empty endpoint
   always gets 100); the oldest deployments beyond ``deploy.keep_versions`` are undeployed.
5. ``champion`` moves to the version, ``previous-champion`` to the one it replaces.

Deploying a version that is already the deployed champion changes nothing and returns the same outputs.
"""


import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kfp.dsl import Dataset, Input

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from components.lookup import CHAMPION_ALIAS, PREVIOUS_CHAMPION_ALIAS
from ctloop.config import Settings
from ctloop.errors import CtloopError


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def deploy(
    config: dict,
    run_id: str,
    model_name: str,
    version: str,
    test: Input[Dataset],
) -> NamedTuple("Outputs", endpoint=str, deployed_model_id=str):
    """Staging + smoke test, then production; returns the production endpoint and the deployed model id."""
    from components.deploy import run_deploy_step

    return run_deploy_step(config, run_id, model_name, version, test)


class SmokeTestFailed(CtloopError):
    """The candidate answered the smoke test wrongly, too slowly or not at all; it was rolled back."""


@dataclass(frozen=True)
class SmokeReport:
    instances: int
    problems: list[str]
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def max_latency_ms(self) -> float:
        return max(self.latencies_ms, default=0.0)

    @property
    def median_latency_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else 0.0


@dataclass(frozen=True)
class DeployResult:
    endpoint: str  # cloud: the endpoint resource name; local: its name
    deployed_model_id: str
    staging_endpoint: str
    traffic_split: dict[str, int]
    changed: bool  # False when the version already was the deployed champion
    smoke: SmokeReport | None = None
    previous_champion: str | None = None


def run_deploy_step(config: dict, run_id: str, model_name: str, version: str, test: Any) -> tuple[str, str]:
    """The component body: settings and the test split in, (endpoint, deployed model id) out."""
    result = run_deploy(Settings.from_param(config), run_id, model_name, version, test.path)
    summary = {k: v for k, v in asdict(result).items() if k != "smoke"}
    if result.smoke is not None:
        smoke = result.smoke
        summary["smoke"] = {"instances": smoke.instances, "max_latency_ms": smoke.max_latency_ms,
                            "median_latency_ms": smoke.median_latency_ms}
    print(json.dumps({"deploy": summary}, sort_keys=True))  # the step's log
    return result.endpoint, result.deployed_model_id


def run_deploy(settings: Settings, run_id: str, model_name: str, version: str | int,
               test_dir: str | Path) -> DeployResult:
    """Roll ``model_name`` version ``version`` out as described in the module docstring."""
    d = settings.deploy
    if d.canary_percent < 100 and d.keep_versions < 2:
        raise ValueError(f"deploy.canary_percent={d.canary_percent} needs deploy.keep_versions >= 2 (the "
                         f"previous version serves the other {100 - d.canary_percent}%), "
                         f"found {d.keep_versions}")
    if settings.backend == "cloud":
        return _deploy_vertex(settings, run_id, model_name, str(version), Path(test_dir))
    return _deploy_local(settings, run_id, model_name, int(version), Path(test_dir))


# -- smoke test --------------------------------------------------------------------------------------------


def smoke_instances(settings: Settings, test_dir: str | Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of the test split as JSON-ready instances: model features only, NaN as null."""
    import pandas as pd

    from ctloop.features import SPEC_FILE, FeatureSpec

    test_dir = Path(test_dir)
    if (test_dir / SPEC_FILE).is_file():
        frame = pd.read_parquet(test_dir, columns=FeatureSpec.read(test_dir).model_features)
    else:
        frame = pd.read_parquet(test_dir)
        frame = frame.drop(columns=[c for c in settings.columns.role_columns if c in frame.columns])
    rows = frame.head(n).to_dict(orient="records")
    if not rows:
        raise ValueError(f"test split {test_dir} has no rows to smoke-test the deployed model with")
    return [{k: _json_value(v) for k, v in row.items()} for row in rows]


def _json_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def check_predictions(predictions: Any, expected: int) -> list[str]:
    """What is wrong with a server's ``predictions`` for ``expected`` instances (empty when all is well)."""
    if not isinstance(predictions, list):
        return [f"predictions: expected a list, found {type(predictions).__name__}"]
    problems = []
    if len(predictions) != expected:
        problems.append(f"predictions: expected {expected}, found {len(predictions)}")
    for i, p in enumerate(predictions):
        label = p.get("label") if isinstance(p, dict) else None
        prob = p.get("probability") if isinstance(p, dict) else None
        if isinstance(label, bool) or label not in (0, 1):
            problems.append(f"predictions[{i}].label: expected 0 or 1, found {label!r}")
        if isinstance(prob, bool) or not isinstance(prob, int | float) or not (math.isfinite(prob)
                                                                                 and 0 <= prob <= 1):
            problems.append(f"predictions[{i}].probability: expected a number in [0, 1], found {prob!r}")
    return problems


Predict = Callable[[list[dict[str, Any]]], Any]


def run_smoke(predict: Predict, instances: list[dict[str, Any]], max_latency_ms: float) -> SmokeReport:
    """Send all instances in one request, then each alone (timed); collect every problem."""
    problems: list[str] = []
    latencies: list[float] = []
    try:
        problems += [f"batch of {len(instances)}: {p}" for p in check_predictions(predict(instances),
                                                                                   len(instances))]
    except Exception as exc:  # noqa: BLE001 - any failure is a smoke-test finding
        problems.append(f"batch of {len(instances)}: {type(exc).__name__}: {exc}")
    for i, inst in enumerate(instances):
        start = time.perf_counter()
        try:
            answer = predict([inst])
        except Exception as exc:  # noqa: BLE001
            problems.append(f"instance {i}: {type(exc).__name__}: {exc}")
            continue
        latencies.append((time.perf_counter() - start) * 1000)
        problems += [f"instance {i}: {p}" for p in check_predictions(answer, 1)]
    if latencies and max(latencies) > max_latency_ms:
        problems.append(f"latency: slowest single-instance request took {max(latencies):.0f} ms, the limit "
                        f"is {max_latency_ms:.0f} ms (deploy.smoke_max_latency_ms)")
    return SmokeReport(instances=len(instances), problems=problems[:20], latencies_ms=latencies)


def _smoke_failed(where: str, report: SmokeReport) -> SmokeTestFailed:
    shown = "; ".join(report.problems[:5])
    more = f" (+{len(report.problems) - 5} more)" if len(report.problems) > 5 else ""
    return SmokeTestFailed(f"smoke test on {where} failed, candidate rolled back, production untouched: "
                           f"{shown}{more}")


# -- local -------------------------------------------------------------------------------------------------


def http_predict(client: Any, base_url: str) -> Predict:
    """POST instances to a prediction server's /predict with an ``httpx.Client``; a non-200 answer raises with
    the server's message."""

    def predict(instances: list[dict[str, Any]]) -> Any:
        resp = client.post(f"{base_url}/predict", json={"instances": instances})
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json().get("predictions")

    return predict


def _deploy_local(settings: Settings, run_id: str, name: str, version: int, test_dir: Path) -> DeployResult:
    import httpx

    from ctloop.registry import LocalRegistry
    from serving.app import ServedModel, create_app
    from serving.background import running_server

    d = settings.deploy
    registry = LocalRegistry(settings.local.registry_db)
    candidate = registry.get_version(name, version)  # fails early, naming the versions there are
    champion = registry.get_alias(name, CHAMPION_ALIAS)
    production = registry.get_endpoint(d.production_endpoint)
    live = production.find(name, version) if production else None
    if live is not None and champion is not None and champion.version_id == version:
        return DeployResult(d.production_endpoint, live.deployed_model_id, d.staging_endpoint,
                            production.traffic_split, changed=False)

    instances = smoke_instances(settings, test_dir, d.smoke_instances)
    registry.ensure_endpoint(d.staging_endpoint)
    before = registry.get_endpoint(d.staging_endpoint).traffic_split
    staged = registry.deploy(d.staging_endpoint, name, version, 100)
    served = ServedModel(staged.deployed_model_id, candidate.artifact_uri, 100, model=name,
                         version=str(version))
    try:
        with running_server(create_app([served])) as url, httpx.Client(timeout=30.0) as client:
            report = run_smoke(http_predict(client, url), instances, d.smoke_max_latency_ms)
    except Exception as exc:  # noqa: BLE001 - a server that cannot start fails the smoke test
        report = SmokeReport(len(instances), [f"server did not start: {type(exc).__name__}: {exc}"])
    if not report.ok:
        registry.undeploy(d.staging_endpoint, name, version)
        if before and set(before) == set(registry.get_endpoint(d.staging_endpoint).traffic_split):
            registry.set_traffic(d.staging_endpoint, before)
        raise _smoke_failed(f"staging endpoint {d.staging_endpoint!r} ({name} v{version})", report)
    for other in registry.get_endpoint(d.staging_endpoint).deployments:
        if other.deployed_model_id != staged.deployed_model_id:
            registry.undeploy(d.staging_endpoint, other.model, other.version)

    registry.ensure_endpoint(d.production_endpoint)
    serving_now = any(x.traffic_percent for x in registry.get_endpoint(d.production_endpoint).deployments)
    deployed = registry.deploy(d.production_endpoint, name, version, d.canary_percent if serving_now else 100,
                               keep=d.keep_versions)
    moves = {CHAMPION_ALIAS: version}
    previous = champion.version_id if champion is not None and champion.version_id != version else None
    if previous is not None:
        moves[PREVIOUS_CHAMPION_ALIAS] = previous
    registry.set_aliases(name, moves)
    return DeployResult(d.production_endpoint, deployed.deployed_model_id, d.staging_endpoint,
                        registry.get_endpoint(d.production_endpoint).traffic_split, changed=True,
                        smoke=report, previous_champion=str(previous) if previous is not None else None)


# -- Vertex AI ---------------------------------------------------------------------------------------------


def _deploy_vertex(settings: Settings, run_id: str, model_resource: str, version: str,
                   test_dir: Path) -> DeployResult:
    from google.cloud import aiplatform

    from ctloop.registry import allocate_traffic, unallocate_traffic
    from ctloop.vertex import (
        Where,
        deployed_models,
        find_deployed,
        find_endpoint,
        find_or_create_endpoint,
        get_model_version,
        labels,
        move_alias,
    )

    d = settings.deploy
    where = Where(settings.gcp.project, settings.gcp.region)
    champion = get_model_version(model_resource, CHAMPION_ALIAS, where)
    champion_version = str(champion.version_id) if champion is not None else None
    production = find_endpoint(d.production_endpoint, where)
    live = find_deployed(production, model_resource, version) if production is not None else None
    if live is not None and champion_version == version:
        return DeployResult(production.resource_name, live.id, d.staging_endpoint,
                            {x.id: x.traffic for x in deployed_models(production)}, changed=False)

    model = aiplatform.Model(model_name=f"{model_resource}@{version}", **where.kw)
    display = f"{settings.model.display_name}-v{version}"
    resources = dict(machine_type=d.machine_type, min_replica_count=d.min_replicas,
                     max_replica_count=d.max_replicas, deployed_model_display_name=display, sync=True)
    endpoint_labels = labels(settings.labels)
    instances = smoke_instances(settings, test_dir, d.smoke_instances)

    staging = find_or_create_endpoint(d.staging_endpoint, where, endpoint_labels)
    before = {x.id: x.traffic for x in deployed_models(staging)}
    staged = find_deployed(staging, model_resource, version)
    if staged is None:
        staging.deploy(model=model, traffic_split=allocate_traffic(before, "0", 100), **resources)
        staged = find_deployed(staging, model_resource, version)
    if staged is None:
        raise RuntimeError(f"{staging.resource_name}: {model_resource}@{version} is not listed after "
                           f"deploying")

    def predict(batch: list[dict[str, Any]]) -> Any:
        return list(staging.predict(instances=batch).predictions)

    report = run_smoke(predict, instances, d.smoke_max_latency_ms)
    if not report.ok:
        restore = {k: v for k, v in before.items() if v} if sum(before.values()) == 100 else None
        staging.undeploy(staged.id, traffic_split=restore)
        raise _smoke_failed(f"staging endpoint {staging.resource_name} ({model_resource}@{version})", report)
    for other in deployed_models(staging):
        if other.id != staged.id:
            staging.undeploy(other.id)  # 0% since the candidate took 100%

    production = production or find_or_create_endpoint(d.production_endpoint, where, endpoint_labels)
    current = deployed_models(production)
    if find_deployed(production, model_resource, version) is None:
        pruned = current[: max(0, len(current) + 1 - d.keep_versions)]
        split = {x.id: x.traffic for x in current}
        for old in pruned:
            split = unallocate_traffic(split, old.id)
        percent = d.canary_percent if sum(split.values()) else 100
        # "0" is the model being deployed; the pruned ones get 0% here and are undeployed right after.
        production.deploy(model=model, traffic_split=allocate_traffic(split, "0", percent), **resources)
        for old in pruned:
            production.undeploy(old.id)
    deployed = find_deployed(production, model_resource, version)
    if deployed is None:
        raise RuntimeError(f"{production.resource_name}: {model_resource}@{version} is not listed after "
                           f"deploying")

    previous = move_alias(model_resource, CHAMPION_ALIAS, version, where)
    if previous is not None and previous != version:
        move_alias(model_resource, PREVIOUS_CHAMPION_ALIAS, previous, where)
    return DeployResult(production.resource_name, deployed.id, d.staging_endpoint,
                        {x.id: x.traffic for x in deployed_models(production)}, changed=True, smoke=report,
                        previous_champion=previous if previous != version else None)
