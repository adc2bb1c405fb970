"""deploy: staging, smoke test, production (a judged canary or a cutover with the champion move); the algorithm is
``ctloop.rollout``, over whichever registry the settings name.

The champion moves only if it still is the version ``lookup_champion`` found for the gate
(``champion_version``, ``''`` when there was none): a run that lost that race is not promoted, its candidate
leaves production again and the step fails saying which run's version is champion now. The step outputs a
``google.VertexEndpoint`` artifact naming the production endpoint.
"""


import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from kfp.dsl import Dataset, Input, Output

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from components.vertex_artifacts import VertexEndpoint, name_resource
from ctloop.config import Settings
from ctloop.online_store import OnlineStore, SQLiteStore, local_store_path
from ctloop.registry import Deployed, Registry, Version, open_registry
from ctloop.rollout import DeployResult, check_settings, rollout
from ctloop.smoke import expect_offline_scores, smoke_instances
from serving.model import fetch_model_dir


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def deploy(
    config: dict,
    run_id: str,
    model_name: str,
    version: str,
    champion_version: str,
    test: Input[Dataset],
    vertex_endpoint: Output[VertexEndpoint],
) -> NamedTuple("Outputs", endpoint=str, deployed_model_id=str):
    """Staging + smoke test, then production; returns the production endpoint and the deployed model id."""
    from components.deploy import run_deploy_step
    from ctloop.steps import run_step

    return run_step(run_deploy_step, config, run_id, model_name, version, champion_version, test, vertex_endpoint)


def run_deploy_step(config: dict, run_id: str, model_name: str, version: str, champion_version: str, test: Any,
                    vertex_endpoint: Any = None) -> tuple[str, str]:
    """The component body: settings and the test split in, (endpoint, deployed model id) out."""
    settings = Settings.from_param(config)
    registry = open_deploy_registry(settings)
    result = run_deploy(settings, run_id, model_name, version, test.path, champion_version or None,
                        registry=registry)
    summary = {k: v for k, v in asdict(result).items() if k != "smoke"} | {"model": model_name,
                                                                          "version": version}
    if result.smoke is not None:
        smoke = result.smoke
        summary["smoke"] = {"instances": smoke.instances, "max_latency_ms": smoke.max_latency_ms,
                            "median_latency_ms": smoke.median_latency_ms}
    print(json.dumps({"deploy": summary}, sort_keys=True))  # the step's log
    if vertex_endpoint is not None:
        name_resource(vertex_endpoint, result.endpoint, registry.resource_url(result.endpoint))
    return result.endpoint, result.deployed_model_id


def run_deploy(settings: Settings, run_id: str, model_name: str, version: str | int, test_dir: str | Path,
               expected_champion: str | None, registry: Registry | None = None) -> DeployResult:
    """Roll ``version`` of the settings' model out (``ctloop.rollout``); ``expected_champion`` is the champion
    version the gate compared against (None: there was none). ``model_name`` (the register step's output) is
    recorded in the step's log; the registry opens on the settings' model."""
    registry = registry or open_deploy_registry(settings)
    d = settings.deploy
    check_settings(d)  # before any work, as rollout does
    instances = smoke_instances(settings, test_dir, d.smoke_instances)
    expect_offline_scores(instances, fetch_model_dir(registry.get_version(str(version)).artifact_uri))
    return rollout(registry, d, str(version), expected_champion, instances, shadow=settings.canary.shadow)


def open_deploy_registry(settings: Settings) -> Registry:
    """The settings' registry, with local prediction servers (reading the local online store) for the local
    backend's smoke test."""
    store = SQLiteStore(local_store_path(settings))
    return open_registry(settings, local_server=partial(serve_locally, online_store=store))


@contextmanager
def serve_locally(deployed: Deployed, version: Version, online_store: OnlineStore | None = None) -> Iterator[str]:
    """The real prediction server for one deployed version on 127.0.0.1; yields its base URL."""
    from serving.app import ServedModel, create_app
    from serving.background import running_server

    served = ServedModel(deployed.id, version.artifact_uri, 100, model=version.model_name,
                         version=version.version)
    with running_server(create_app([served], online_store=online_store)) as url:
        yield url
