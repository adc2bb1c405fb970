"""register, lookup_champion and deploy on the local backend: the SQLite registry and the real prediction
server over HTTP for the staging smoke test; promotion, canary, pruning, rollback and idempotency. The race
of two runs on one registry is in test_rollout_race.py."""

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from components.deploy import run_deploy
from components.lookup import find_champion, run_lookup_step
from components.register import numeric_metrics, run_register, version_aliases
from ctloop.config import Settings
from ctloop.registry import LocalRegistry
from ctloop.rollout import ChampionMoved
from ctloop.smoke import SmokeTestFailed, check_predictions, smoke_instances
from serving.app import create_app, endpoint_deployments
from serving.background import running_server
from tests.serving_fixtures import (
    FEATURES,
    make_constant_model_dir,
    make_failing_model_dir,
    make_model_dir,
    synthetic_frame,
    write_split_dir,
)

NAME = "ctloop-churn"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "a": make_model_dir(root / "a", seed=0),
        "b": make_model_dir(root / "b", seed=1),
        "c": make_model_dir(root / "c", seed=2),
        "failing": make_failing_model_dir(root / "failing"),
        "nan": make_constant_model_dir(root / "nan", float("nan")),
    }


@pytest.fixture(scope="module")
def test_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_split_dir(tmp_path_factory.mktemp("split") / "test", synthetic_frame(n=60, seed=5))


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    base = {"local.workdir": str(tmp_path / "work"), "deploy.smoke_instances": 6}
    return Settings().with_overrides({**base, **overrides})


def _register(settings: Settings, run_id: str, model_dir: Path):
    lineage = {"training_data_checksum": "abc123", "git_sha": "deadbeef", "model_type": "logistic_regression"}
    metrics = {"roc_auc": 0.81, "pr_auc": 0.5}
    return run_register(settings, run_id, model_dir, str(model_dir), metrics, lineage)


def _deploy(settings: Settings, run_id: str, model_name: str, version: str, test_split: Path):
    """Deploy as the pipeline does: against the champion that lookup_champion finds for the gate."""
    champion = find_champion(settings)
    return run_deploy(settings, run_id, model_name, version, test_split,
                      champion.version if champion is not None else None)


def _registry(settings: Settings) -> LocalRegistry:
    return LocalRegistry(settings.local.registry_db)


def _split(settings: Settings, endpoint: str) -> dict[str, int]:
    return _registry(settings).get_endpoint(endpoint).traffic_split


# -- register and lookup ---------------------------------------------------------------------------------


def test_register_copies_the_model_and_is_idempotent_per_run(tmp_path: Path, models: dict[str, Path]) -> None:
    s = _settings(tmp_path)
    first = _register(s, "run-1", models["a"])
    again = _register(s, "run-1", models["b"])  # a retry of the same run: same version, nothing new
    second = _register(s, "run-2", models["b"])
    assert (first.version, first.created) == ("1", True)
    assert (again.version, again.created, again.artifact_uri) == ("1", False, first.artifact_uri)
    assert (second.version, second.created) == ("2", True)
    stored = Path(first.artifact_uri)
    assert stored.is_relative_to(s.local.path("models")) and stored != models["a"]
    assert stored == s.local.models_dir / NAME / "run-run-1"  # keyed by model and the version's run alias
    assert (stored / "model.joblib").read_bytes() == (models["a"] / "model.joblib").read_bytes()
    v1 = _registry(s).get_version(NAME, 1)
    assert v1.run_key == "run-1" and "run-run-1" in v1.aliases
    assert v1.labels["ctloop-run"] == "run-1" and v1.labels["ctloop-data-checksum"] == "abc123"
    assert v1.metrics == {"roc_auc": 0.81, "pr_auc": 0.5} and v1.lineage["git_sha"] == "deadbeef"
    assert len(_registry(s).list_versions(NAME)) == 2


def test_register_names_the_missing_model_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.joblib").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"missing \['model_card.json'\]"):
        _register(_settings(tmp_path), "run-1", tmp_path / "m")


def test_numeric_metrics_keeps_numbers_only() -> None:
    assert numeric_metrics({"roc_auc": 0.8, "rows": 10, "split": "test", "ok": True}) == {"roc_auc": 0.8,
                                                                                          "rows": 10.0}


def test_lookup_is_empty_before_the_first_champion(tmp_path: Path, models: dict[str, Path]) -> None:
    s = _settings(tmp_path)
    assert run_lookup_step(s.to_param(), "run-x") == ("", "")
    _register(s, "run-1", models["a"])
    assert find_champion(s) is None  # registered is not promoted


# -- deploy ---------------------------------------------------------------------------------------------


def test_first_deploy_goes_to_staging_then_all_production_traffic(tmp_path: Path, models: dict[str, Path],
                                                                  test_split: Path) -> None:
    s = _settings(tmp_path)
    reg = _register(s, "run-1", models["a"])
    result = _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    assert result.changed and result.endpoint == "ctloop-production"
    assert result.deployed_model_id == f"{NAME}-v1" and result.traffic_split == {f"{NAME}-v1": 100}
    # The candidate left staging after its smoke test: staging serves nothing between runs.
    assert _split(s, "ctloop-staging") == {}
    assert result.smoke.ok and result.smoke.instances == 6 and len(result.smoke.latencies_ms) == 6
    champion = find_champion(s)
    assert (champion.version, champion.artifact_uri) == ("1", reg.artifact_uri)
    assert run_lookup_step(s.to_param(), "run-2") == (reg.artifact_uri, "1")
    assert result.previous_champion is None


def test_canary_waits_for_judgement_and_the_next_deploy_replaces_it(tmp_path: Path, models: dict[str, Path],
                                                                    test_split: Path) -> None:
    s = _settings(tmp_path, **{"deploy.canary_percent": 10, "deploy.keep_versions": 2})
    for run, key in (("run-1", "a"), ("run-2", "b")):
        reg = _register(s, run, models[key])
        result = _deploy(s, run, reg.model_name, reg.version, test_split)
    assert result.traffic_split == {f"{NAME}-v1": 90, f"{NAME}-v2": 10}
    assert result.canary and result.previous_champion == "1"
    registry = _registry(s)
    # The canary is not judged yet: the champion stays where it was.
    assert registry.get_alias(NAME, "champion").version_id == 1
    assert registry.get_alias(NAME, "canary").version_id == 2
    assert registry.get_alias(NAME, "previous-champion") is None
    assert _split(s, "ctloop-staging") == {}

    reg = _register(s, "run-3", models["c"])
    result = _deploy(s, "run-3", reg.model_name, reg.version, test_split)
    # The unjudged v2 gives its share back to the champion (never becomes the 90% model) and is undeployed;
    # v3 is the canary now.
    assert result.traffic_split == {f"{NAME}-v1": 90, f"{NAME}-v3": 10}
    assert registry.get_alias(NAME, "champion").version_id == 1
    assert registry.get_alias(NAME, "canary").version_id == 3

    # The production endpoint, served locally, honours that split.
    app = create_app(endpoint_deployments(registry, "ctloop-production"), seed=3)
    instance = smoke_instances(s, test_split, 1)
    with running_server(app) as url, httpx.Client(base_url=url) as client:
        answers = [client.post("/predict", json={"instances": instance}).json() for _ in range(200)]
    ids = [a["deployedModelId"] for a in answers]
    assert 160 <= ids.count(f"{NAME}-v1") <= 198 and set(ids) == {f"{NAME}-v1", f"{NAME}-v3"}


def test_shadow_canary_takes_no_traffic(tmp_path: Path, models: dict[str, Path], test_split: Path) -> None:
    s = _settings(tmp_path, **{"deploy.canary_percent": 10, "canary.shadow": True})
    for run, key in (("run-1", "a"), ("run-2", "b")):
        reg = _register(s, run, models[key])
        result = _deploy(s, run, reg.model_name, reg.version, test_split)
    # Deployed beside the champion with 0% (and not retired for it), marked as the canary.
    assert result.canary and result.traffic_split == {f"{NAME}-v1": 100, f"{NAME}-v2": 0}
    registry = _registry(s)
    assert registry.get_alias(NAME, "champion").version_id == 1
    assert registry.get_alias(NAME, "canary").version_id == 2
    assert [d.shadow for d in endpoint_deployments(registry, "ctloop-production")] == [False, True]


def test_deploying_the_deployed_champion_again_is_a_no_op(tmp_path: Path, models: dict[str, Path],
                                                          test_split: Path) -> None:
    s = _settings(tmp_path)
    reg = _register(s, "run-1", models["a"])
    first = _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    before = _registry(s).get_endpoint("ctloop-production")
    again = _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    assert not again.changed and again.smoke is None
    assert (again.endpoint, again.deployed_model_id, again.traffic_split) == (first.endpoint,
                                                                                first.deployed_model_id,
                                                                                first.traffic_split)
    assert _registry(s).get_endpoint("ctloop-production") == before


@pytest.mark.parametrize("bad,reason", [
    ("failing", "failed to predict: RuntimeError: this model cannot predict"),
    ("nan", "returned probability nan"),
    ("corrupt", "server did not start: ModelLoadError"),
])
def test_a_failing_smoke_test_rolls_back_and_leaves_production_alone(
    tmp_path: Path, models: dict[str, Path], test_split: Path, bad: str, reason: str
) -> None:
    s = _settings(tmp_path)
    good = _register(s, "run-1", models["a"])
    _deploy(s, "run-1", good.model_name, good.version, test_split)
    production_before = _registry(s).get_endpoint("ctloop-production")

    if bad == "corrupt":
        (tmp_path / "corrupt").mkdir()
        (tmp_path / "corrupt" / "model.joblib").write_bytes(b"not a pickle")
        # A corrupt file from another training run (its own data checksum, so not model "a" again).
        card = json.loads((models["a"] / "model_card.json").read_text())
        card["training_data"] = {"checksum": "sha256:corrupt-run"}
        (tmp_path / "corrupt" / "model_card.json").write_text(json.dumps(card))
        candidate = _register(s, "run-2", tmp_path / "corrupt")
    else:
        candidate = _register(s, "run-2", models[bad])
    with pytest.raises(SmokeTestFailed, match="staging endpoint 'ctloop-staging'") as err:
        _deploy(s, "run-2", candidate.model_name, candidate.version, test_split)
    assert reason in str(err.value)
    assert "production untouched" in str(err.value)
    registry = _registry(s)
    assert registry.get_endpoint("ctloop-production") == production_before
    assert registry.get_alias(NAME, "champion").version_id == 1
    assert registry.get_alias(NAME, "previous-champion") is None
    assert _split(s, "ctloop-staging") == {}


def test_a_too_slow_server_fails_the_smoke_test(tmp_path: Path, models: dict[str, Path],
                                                test_split: Path) -> None:
    s = _settings(tmp_path, **{"deploy.smoke_max_latency_ms": 0.001})
    reg = _register(s, "run-1", models["a"])
    with pytest.raises(SmokeTestFailed, match=r"latency: slowest single-instance request .* limit is 0 ms"):
        _deploy(s, "run-1", reg.model_name, reg.version, test_split)
    assert _split(s, "ctloop-staging") == {}
    assert _registry(s).get_endpoint("ctloop-production") is None
    assert find_champion(s) is None


def test_a_cutover_keeps_no_idle_version_in_production(tmp_path: Path, models: dict[str, Path],
                                                       test_split: Path) -> None:
    s = _settings(tmp_path)  # canary_percent 100, keep_versions 2
    for run, key in (("run-1", "a"), ("run-2", "b")):
        reg = _register(s, run, models[key])
        result = _deploy(s, run, reg.model_name, reg.version, test_split)
    # v1 took 0% when v2 took over: undeployed, not kept on a serving node.
    assert result.traffic_split == {f"{NAME}-v2": 100} == _split(s, "ctloop-production")
    assert result.previous_champion == "1"
    assert _registry(s).get_alias(NAME, "previous-champion").version_id == 1
    assert _split(s, "ctloop-staging") == {}


def test_a_staging_leftover_is_cleared_by_the_next_run(tmp_path: Path, models: dict[str, Path],
                                                       test_split: Path) -> None:
    """A run that stopped half-way left its candidate on staging; the next run's smoke test clears it."""
    s = _settings(tmp_path)
    left = _register(s, "run-1", models["a"])
    registry = _registry(s)
    registry.ensure_endpoint("ctloop-staging")
    registry.deploy("ctloop-staging", NAME, int(left.version), 100)
    reg = _register(s, "run-2", models["b"])
    _deploy(s, "run-2", reg.model_name, reg.version, test_split)
    assert _split(s, "ctloop-staging") == {}
    assert _split(s, "ctloop-production") == {f"{NAME}-v2": 100}


def test_a_champion_changed_since_the_gate_stops_the_rollout(tmp_path: Path, models: dict[str, Path],
                                                             test_split: Path) -> None:
    """The gate compared against v1, but another run made v2 the champion: v3 is not promoted, nothing moves."""
    s = _settings(tmp_path)
    for run, key in (("run-1", "a"), ("run-2", "b")):
        reg = _register(s, run, models[key])
        _deploy(s, run, reg.model_name, reg.version, test_split)
    production = _registry(s).get_endpoint("ctloop-production")
    late = _register(s, "run-3", models["c"])
    with pytest.raises(ChampionMoved) as err:
        run_deploy(s, "run-3", late.model_name, late.version, test_split, "1")
    assert str(err.value) == ("not promoted: the gate compared ctloop-churn@3 against champion version 1, but "
                              "another run made version 2 the champion meanwhile; production keeps that "
                              "version")
    assert _registry(s).get_endpoint("ctloop-production") == production
    assert find_champion(s).version == "2"
    assert _registry(s).get_endpoint("ctloop-staging").deployments == ()


def test_canary_needs_a_previous_version_to_keep(tmp_path: Path, test_split: Path) -> None:
    s = _settings(tmp_path, **{"deploy.canary_percent": 20, "deploy.keep_versions": 1})
    with pytest.raises(ValueError, match="canary_percent=20 needs deploy.keep_versions >= 2"):
        _deploy(s, "run-1", NAME, "1", test_split)


def test_deploying_an_unknown_version_names_the_known_ones(tmp_path: Path, models: dict[str, Path],
                                                           test_split: Path) -> None:
    s = _settings(tmp_path)
    _register(s, "run-1", models["a"])
    with pytest.raises(Exception, match=r"has no version 5; versions: \[1\]"):
        _deploy(s, "run-9", NAME, "5", test_split)


# -- smoke-test pieces ------------------------------------------------------------------------------------


def test_smoke_instances_are_feature_rows_with_nulls(tmp_path: Path, test_split: Path) -> None:
    s = _settings(tmp_path)
    rows = smoke_instances(s, test_split, 60)
    assert len(rows) == 60 and all(list(r) == FEATURES for r in rows)
    assert any(r["tenure_months"] is None for r in rows)
    assert json.loads(json.dumps(rows)) == rows  # JSON-ready, no NaN
    # Without a feature spec the role columns are dropped instead.
    frame = synthetic_frame(n=5).assign(extra=1.5)
    plain = tmp_path / "plain"
    plain.mkdir()
    frame.to_parquet(plain / "part-0.parquet")
    assert list(smoke_instances(s, plain, 2)[0]) == [*FEATURES, "extra"]
    empty = write_split_dir(tmp_path / "empty", synthetic_frame(n=5).iloc[:0])
    with pytest.raises(ValueError, match="has no rows"):
        smoke_instances(s, empty, 3)


@pytest.mark.parametrize("predictions,expected,problem", [
    ([{"label": 1, "probability": 0.7}], 1, None),
    ([{"label": 1.0, "probability": 0.7}], 1, None),  # Vertex's Struct turns ints into floats
    ([{"label": 1, "probability": 0.7}], 2, "expected 2, found 1"),
    ([{"label": 2, "probability": 0.7}], 1, "label: expected 0 or 1, found 2"),
    ([{"label": True, "probability": 0.7}], 1, "label: expected 0 or 1, found True"),
    ([{"label": 0, "probability": float(np.nan)}], 1, "probability: expected a number in [0, 1], found nan"),
    ([{"label": 0, "probability": 1.5}], 1, "found 1.5"),
    ([{"label": 0}], 1, "found None"),
    ({"label": 0}, 1, "expected a list, found dict"),
])
def test_check_predictions(predictions: object, expected: int, problem: str | None) -> None:
    problems = check_predictions(predictions, expected)
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems


# -- the KFP components, run by the KFP local runner -----------------------------------------------------


def test_components_run_under_the_kfp_local_runner(tmp_path: Path, models: dict[str, Path],
                                                   test_split: Path) -> None:
    """lookup_champion -> register -> deploy as KFP tasks (subprocesses): the shells, their inputs and
    NamedTuple outputs work, and a rerun of the same pipeline run id changes nothing."""
    from kfp import dsl, local
    from kfp.dsl import Dataset, Metrics, Model

    from components.deploy import deploy
    from components.lookup import lookup_champion
    from components.register import register

    s = _settings(tmp_path)
    (tmp_path / "metrics").write_text("{}")

    @dsl.pipeline(name="register-deploy")
    def flow(config: dict, run_id: str):
        champion = lookup_champion(config=config, run_id=run_id)
        model = dsl.importer(artifact_uri=str(models["a"]), artifact_class=Model,
                             metadata={"training_data_checksum": "c0ffee", "git_sha": "g1"})
        metrics = dsl.importer(artifact_uri=str(tmp_path / "metrics"), artifact_class=Metrics,
                               metadata={"roc_auc": 0.75})
        test = dsl.importer(artifact_uri=str(test_split), artifact_class=Dataset)
        version = register(config=config, run_id=run_id, model=model.output, metrics=metrics.output)
        version.after(champion)
        deploy(config=config, run_id=run_id, model_name=version.outputs["model_resource"],
               version=version.outputs["version"], champion_version=champion.outputs["champion_version"],
               test=test.output)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               workspace_root=str(tmp_path / "ws"), raise_on_error=True, enable_caching=False)
    for _ in range(2):
        flow(config=s.to_param(), run_id="kfp-run-1")
    registry = _registry(s)
    (version,) = registry.list_versions(NAME)
    assert version.run_key == "kfp-run-1" and version.metrics == {"roc_auc": 0.75}
    assert version.labels["ctloop-data-checksum"] == "c0ffee"
    fingerprint = version_aliases("kfp-run-1", Path(version.artifact_uri))[1]
    assert set(version.aliases) == {"champion", "default", "run-kfp-run-1", fingerprint}
    assert _split(s, "ctloop-production") == {f"{NAME}-v1": 100}
    outputs = [json.loads(o.read_text())["parameterValues"]
               for o in sorted((tmp_path / "root").glob("register-deploy-*/deploy/executor_output.json"))]
    assert outputs == [{"endpoint": "ctloop-production", "deployed_model_id": f"{NAME}-v1"}] * 2
    # The google.VertexModel / google.VertexEndpoint artifacts name the registry's version and endpoint.
    for step, output, resource in (("register", "vertex_model", f"{NAME}@1"),
                                   ("deploy", "vertex_endpoint", "ctloop-production")):
        paths = sorted((tmp_path / "root").glob(f"register-deploy-*/{step}/executor_output.json"))
        assert len(paths) == 2
        for path in paths:
            (artifact,) = json.loads(path.read_text())["artifacts"][output]["artifacts"]
            assert artifact["metadata"] == {"resourceName": resource}


def test_only_open_registry_picks_the_backend() -> None:
    """The registry-touching steps and the rollout never look at settings.backend themselves."""
    import ast

    root = Path(__file__).resolve().parents[1]
    for module in ("components/register.py", "components/lookup.py", "components/deploy.py", "ctloop/rollout.py",
                   "ctloop/smoke.py", "ctloop/registry/local.py", "ctloop/registry/vertex.py"):
        tree = ast.parse((root / module).read_text())
        uses = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "backend"]
        assert uses == [], f"{module} reads .backend on lines {uses}"
