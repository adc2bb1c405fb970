"""The SQLite registry: versions, aliases, idempotent registration, endpoint traffic math, concurrency."""

from __future__ import annotations

import multiprocessing
import queue
import time
from pathlib import Path

import pytest
from google.cloud.aiplatform import Endpoint as VertexEndpoint

from ctloop.registry import (
    DEFAULT_ALIAS,
    LocalRegistry,
    RegistryError,
    allocate_traffic,
    deployed_model_id,
    unallocate_traffic,
)

MODEL = "churn"


@pytest.fixture
def reg(tmp_path: Path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry.sqlite")


def _register(reg: LocalRegistry, run: str, model: str = MODEL, **kw):
    return reg.register_version(model, f"/models/{run}", run_key=run, labels={"run": run},
                                metrics={"roc_auc": 0.8}, lineage={"checksum": f"sha-{run}"}, **kw)


def test_versions_count_up_per_model_and_keep_their_records(reg: LocalRegistry) -> None:
    v1 = _register(reg, "r1")
    v2 = _register(reg, "r2", aliases=["candidate"])
    other = _register(reg, "r1", model="other")
    assert (v1.version_id, v2.version_id, other.version_id) == (1, 2, 1)
    got = reg.get_version(MODEL, 2)
    assert got.artifact_uri == "/models/r2" and got.run_key == "r2"
    assert got.labels == {"run": "r2"} and got.metrics == {"roc_auc": 0.8}
    assert got.lineage == {"checksum": "sha-r2"}
    assert got.aliases == ("candidate",)
    assert got.resource_name == "churn@2"
    assert [v.version_id for v in reg.list_versions(MODEL)] == [1, 2]
    assert [(m.name, m.version_count) for m in reg.list_models()] == [("churn", 2), ("other", 1)]


def test_first_version_gets_the_default_alias_like_vertex(reg: LocalRegistry) -> None:
    _register(reg, "r1")
    _register(reg, "r2")
    assert reg.get_alias(MODEL, DEFAULT_ALIAS).version_id == 1
    with pytest.raises(RegistryError, match="can be moved but not removed"):
        reg.remove_alias(MODEL, DEFAULT_ALIAS)


def test_same_run_key_returns_the_existing_version(reg: LocalRegistry) -> None:
    first = _register(reg, "r1", aliases=["candidate"])
    _register(reg, "r2")
    reg.set_alias(MODEL, "candidate", 2)
    again = reg.register_version(MODEL, "/somewhere/else", run_key="r1", aliases=["candidate"])
    assert again.version_id == first.version_id and again.artifact_uri == "/models/r1"
    assert len(reg.list_versions(MODEL)) == 2
    # A retry does not drag a moved alias back.
    assert reg.get_alias(MODEL, "candidate").version_id == 2
    assert reg.find_by_run_key(MODEL, "r1").version_id == 1
    assert reg.find_by_run_key(MODEL, "nope") is None


def test_alias_moves_and_lookups(reg: LocalRegistry) -> None:
    for run in ("r1", "r2", "r3"):
        _register(reg, run)
    assert reg.get_alias(MODEL, "champion") is None
    reg.set_alias(MODEL, "champion", 1)
    reg.set_alias(MODEL, "champion", 3)
    assert reg.get_alias(MODEL, "champion").version_id == 3
    assert "champion" not in reg.get_version(MODEL, 1).aliases
    assert reg.get_version(MODEL, "champion").version_id == 3
    reg.remove_alias(MODEL, "champion")
    assert reg.get_alias(MODEL, "champion") is None


def test_several_alias_moves_are_one_transaction(reg: LocalRegistry) -> None:
    _register(reg, "r1")
    _register(reg, "r2")
    reg.set_aliases(MODEL, {"champion": 1, "previous-champion": 2})
    with pytest.raises(RegistryError, match="has no version 9"):
        reg.set_aliases(MODEL, {"champion": 2, "previous-champion": 9})
    # The first move of the failed call was rolled back with it.
    assert reg.get_alias(MODEL, "champion").version_id == 1
    assert reg.get_alias(MODEL, "previous-champion").version_id == 2


@pytest.mark.parametrize("alias", ["Champion", "1", "-x", "x-", "a_b", "", "x" * 129])
def test_bad_alias_is_rejected_with_the_format(reg: LocalRegistry, alias: str) -> None:
    _register(reg, "r1")
    with pytest.raises(RegistryError, match="Vertex alias format"):
        reg.set_alias(MODEL, alias, 1)


def test_unknown_model_or_version_names_what_exists(reg: LocalRegistry) -> None:
    _register(reg, "r1")
    with pytest.raises(RegistryError, match=r"model 'nope' is not registered"):
        reg.get_version("nope", 1)
    with pytest.raises(RegistryError, match=r"has no version 7; versions: \[1\]"):
        reg.get_version(MODEL, 7)
    with pytest.raises(RegistryError, match="run_key must be non-empty"):
        reg.register_version(MODEL, "/x", run_key="")


# -- endpoints ---------------------------------------------------------------------------------------------


@pytest.fixture
def three_versions(reg: LocalRegistry) -> LocalRegistry:
    for run in ("r1", "r2", "r3", "r4"):
        _register(reg, run)
    reg.ensure_endpoint("prod")
    return reg


def _split(reg: LocalRegistry, endpoint: str = "prod") -> dict[str, int]:
    return reg.get_endpoint(endpoint).traffic_split


def test_canary_deploy_shares_traffic_like_the_vertex_sdk(three_versions: LocalRegistry) -> None:
    reg = three_versions
    reg.deploy("prod", MODEL, 1, 100)
    d2 = reg.deploy("prod", MODEL, 2, 10)
    assert d2.traffic_percent == 10 and d2.deployed_model_id == deployed_model_id(MODEL, 2)
    assert _split(reg) == {"churn-v1": 90, "churn-v2": 10}
    before = _split(reg)
    reg.deploy("prod", MODEL, 3, 33)
    sdk = VertexEndpoint._allocate_traffic(before, 33)
    assert _split(reg) == {**{k: v for k, v in sdk.items() if k != "0"}, "churn-v3": sdk["0"]}
    assert sum(_split(reg).values()) == 100


def test_undeploy_scales_the_rest_back_to_100_like_the_sdk(three_versions: LocalRegistry) -> None:
    reg = three_versions
    reg.deploy("prod", MODEL, 1, 100)
    reg.deploy("prod", MODEL, 2, 30)
    reg.deploy("prod", MODEL, 3, 15)
    before = _split(reg)
    reg.undeploy("prod", MODEL, 2)
    sdk = VertexEndpoint._unallocate_traffic(before, "churn-v2")
    sdk.pop("churn-v2")
    assert _split(reg) == sdk
    assert sum(sdk.values()) == 100
    assert reg.get_endpoint("prod").find(MODEL, 2) is None
    reg.undeploy("prod", MODEL, 2)  # already gone: no-op
    assert _split(reg) == sdk


def test_undeploying_the_only_serving_model_gives_the_previous_one_all(three_versions: LocalRegistry) -> None:
    reg = three_versions
    reg.deploy("prod", MODEL, 1, 100)
    reg.deploy("prod", MODEL, 2, 100)
    assert _split(reg) == {"churn-v1": 0, "churn-v2": 100}
    reg.undeploy("prod", MODEL, 2)
    assert _split(reg) == {"churn-v1": 100}
    reg.undeploy("prod", MODEL, 1)
    assert _split(reg) == {}


def test_deploying_the_same_version_again_changes_nothing(three_versions: LocalRegistry) -> None:
    reg = three_versions
    reg.deploy("prod", MODEL, 1, 100)
    first = reg.deploy("prod", MODEL, 2, 20)
    again = reg.deploy("prod", MODEL, 2, 50)
    assert again == first
    assert _split(reg) == {"churn-v1": 80, "churn-v2": 20}
    assert len(reg.get_endpoint("prod").deployments) == 2


def test_keep_undeploys_the_oldest_beyond_the_limit(three_versions: LocalRegistry) -> None:
    reg = three_versions
    reg.deploy("prod", MODEL, 1, 100, keep=2)
    reg.deploy("prod", MODEL, 2, 50, keep=2)
    reg.deploy("prod", MODEL, 3, 20, keep=2)
    ep = reg.get_endpoint("prod")
    assert [d.version for d in ep.deployments] == [2, 3]
    # The canary keeps exactly its share; the survivor takes what the undeployed one had.
    assert ep.traffic_split == {"churn-v2": 80, "churn-v3": 20}
    with pytest.raises(RegistryError, match="nobody would take the other 90%"):
        reg.deploy("prod", MODEL, 4, 10, keep=1)
    assert _split(reg) == {"churn-v2": 80, "churn-v3": 20}
    reg.deploy("prod", MODEL, 4, 100, keep=1)
    assert _split(reg) == {"churn-v4": 100}


def test_deploy_rejects_what_vertex_rejects(three_versions: LocalRegistry) -> None:
    reg = three_versions
    with pytest.raises(RegistryError, match="no model serving traffic"):
        reg.deploy("prod", MODEL, 1, 10)
    with pytest.raises(RegistryError, match="integer 0..100"):
        reg.deploy("prod", MODEL, 1, 101)
    with pytest.raises(RegistryError, match="does not exist"):
        reg.deploy("staging", MODEL, 1, 100)
    with pytest.raises(RegistryError, match="has no version 42"):
        reg.deploy("prod", MODEL, 42, 100)
    assert reg.get_endpoint("prod").deployments == ()


def test_set_traffic_is_validated(three_versions: LocalRegistry) -> None:
    reg = three_versions
    reg.deploy("prod", MODEL, 1, 100)
    reg.deploy("prod", MODEL, 2, 50)
    with pytest.raises(RegistryError, match="sum to 100, found 90"):
        reg.set_traffic("prod", {"churn-v1": 40, "churn-v2": 50})
    with pytest.raises(RegistryError, match=r"names \['churn-v9'\], which are not deployed"):
        reg.set_traffic("prod", {"churn-v9": 100})
    with pytest.raises(RegistryError, match="integer 0..100"):
        reg.set_traffic("prod", {"churn-v1": 110, "churn-v2": -10})
    assert _split(reg) == {"churn-v1": 50, "churn-v2": 50}
    reg.set_traffic("prod", {"churn-v2": 100})  # ids left out get 0
    assert _split(reg) == {"churn-v1": 0, "churn-v2": 100}


def test_ensure_endpoint_is_idempotent(reg: LocalRegistry) -> None:
    a = reg.ensure_endpoint("prod")
    b = reg.ensure_endpoint("prod")
    assert a == b and reg.get_endpoint("missing") is None


@pytest.mark.parametrize("split,percent", [({}, 100), ({"a": 100}, 100), ({"a": 70, "b": 30}, 25),
                                           ({"a": 33, "b": 33, "c": 34}, 1), ({"a": 1, "b": 99}, 99)])
def test_allocation_matches_the_sdk_and_sums_to_100(split: dict[str, int], percent: int) -> None:
    mine = allocate_traffic(split, "new", percent)
    sdk = VertexEndpoint._allocate_traffic(split, percent)
    # The SDK leaves 0% models out of the split it sends (Vertex reads a missing id as 0%).
    assert mine == {**{k: sdk.get(k, 0) for k in split}, "new": sdk["0"]}
    assert sum(mine.values()) == 100
    if split:
        key = next(iter(split))
        removed = unallocate_traffic(mine, "new")
        assert sum(removed.values()) == 100 and key in removed


# -- concurrency -------------------------------------------------------------------------------------------


def _register_runs(db: str, runs: list[str], barrier, out) -> None:  # noqa: ANN001 - multiprocessing objects
    reg = LocalRegistry(db)
    barrier.wait()
    out.put([(run, _register(reg, run).version_id) for run in runs])


def test_two_processes_registering_the_same_runs_make_one_version_each(tmp_path: Path) -> None:
    db = str(tmp_path / "registry.sqlite")
    LocalRegistry(db)
    runs = [f"run-{i:02d}" for i in range(25)]
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_register_runs, args=(db, order, barrier, out))
             for order in (runs, runs[::-1])]
    for p in procs:
        p.start()
    results = []
    deadline = time.monotonic() + 120
    while len(results) < len(procs) and time.monotonic() < deadline:
        try:
            results.append(dict(out.get(timeout=0.5)))
        except queue.Empty:
            # A worker that died (e.g. on a constraint violation) will never report: fail now.
            assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # Both processes saw the same version for every run, and no run has two versions.
    assert results[0] == results[1]
    versions = LocalRegistry(db).list_versions(MODEL)
    assert sorted(v.version_id for v in versions) == list(range(1, len(runs) + 1))
    assert sorted(v.run_key for v in versions) == runs
