"""Two training runs racing to deploy on one registry (real SQLite, real local prediction servers).

Both gates compared their candidate against champion v1. Whichever run moves the champion first wins; the
other run's candidate was never compared against the winner, so it must not become champion: its rollout fails
with one line saying why, and its candidate leaves production again.
"""

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from components.deploy import run_deploy, serve_locally
from components.lookup import find_champion
from components.register import run_register
from ctloop.config import Settings
from ctloop.registry import LocalRegistry
from ctloop.registry.local import LocalBackend
from ctloop.rollout import ChampionMoved, DeployResult
from tests.serving_fixtures import make_model_dir, synthetic_frame, write_split_dir

NAME = "ctloop-churn"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {key: make_model_dir(root / key, seed=seed) for key, seed in (("a", 0), ("b", 1), ("c", 2))}


@pytest.fixture(scope="module")
def test_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_split_dir(tmp_path_factory.mktemp("split") / "test", synthetic_frame(n=40, seed=5))


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings().with_overrides({"local.workdir": str(tmp_path / "work"), "deploy.smoke_instances": 4,
                                      **overrides})


def _prepare(settings: Settings, models: dict[str, Path], test_split: Path) -> dict[str, str]:
    """v1 is the deployed champion; runs 2 and 3 registered v2 and v3, both gated against v1."""
    versions = {}
    for run, key in (("run-1", "a"), ("run-2", "b"), ("run-3", "c")):
        versions[run] = run_register(settings, run, models[key], str(models[key]), {"roc_auc": 0.8}, {}).version
        if run == "run-1":
            run_deploy(settings, run, NAME, versions[run], test_split, None)
    assert find_champion(settings).version == "1"
    return versions


def _race(runs: dict[str, Callable[[], DeployResult]]) -> dict[str, DeployResult | BaseException]:
    """Start every run at the same moment (a barrier) in its own thread; each one's result or exception."""
    start = threading.Barrier(len(runs))
    outcome: dict[str, DeployResult | BaseException] = {}

    def drive(run: str, rollout: Callable[[], DeployResult]) -> None:
        start.wait()
        try:
            outcome[run] = rollout()
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            outcome[run] = exc

    threads = [threading.Thread(target=drive, args=item) for item in runs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    return outcome


def _check_one_winner(settings: Settings, versions: dict[str, str],
                      outcome: dict[str, DeployResult | BaseException]) -> None:
    winners = [run for run, result in outcome.items() if isinstance(result, DeployResult)]
    losers = [run for run, result in outcome.items() if isinstance(result, ChampionMoved)]
    assert len(winners) == 1 and len(losers) == 1, outcome
    (winner,), (loser,) = winners, losers
    registry = LocalRegistry(settings.local.registry_db)
    # The registry ends with the gate-approved winner as champion, the champion it beat as previous.
    assert registry.get_alias(NAME, "champion").version_id == int(versions[winner])
    assert registry.get_alias(NAME, "previous-champion").version_id == 1
    # The loser's run says why, in one line naming both versions.
    message = str(outcome[loser])
    assert "\n" not in message
    assert (f"the gate compared {NAME}@{versions[loser]} against champion version 1, but another run made "
            f"version {versions[winner]} the champion meanwhile") in message
    # Production serves the winner only (cutover); nothing idles on production or staging.
    production = registry.get_endpoint("ctloop-production")
    assert {(d.version, d.traffic_percent) for d in production.deployments} == {(int(versions[winner]), 100)}
    assert registry.get_endpoint("ctloop-staging").deployments == ()


def test_two_runs_racing_end_with_the_first_promoted_as_champion(tmp_path: Path, models: dict[str, Path],
                                                                  test_split: Path) -> None:
    s = _settings(tmp_path)
    versions = _prepare(s, models, test_split)
    outcome = _race({run: (lambda run=run: run_deploy(s, run, NAME, versions[run], test_split, "1"))
                     for run in ("run-2", "run-3")})
    _check_one_winner(s, versions, outcome)


class _MovesTogether(LocalBackend):
    """The local backend, but each champion move waits until every racing run is about to move it."""

    def __init__(self, settings: Settings, barrier: threading.Barrier) -> None:
        super().__init__(settings, serve_locally)
        self.barrier = barrier

    def move_aliases(self, moves: Any, expected: Any) -> None:
        self.barrier.wait(timeout=120)
        super().move_aliases(moves, expected)


def test_two_runs_moving_the_champion_at_once_promote_exactly_one(tmp_path: Path, models: dict[str, Path],
                                                                  test_split: Path) -> None:
    """Both runs passed the smoke test and deployed to production before either moves the champion: the
    compare-and-set lets one through and rolls the other back."""
    s = _settings(tmp_path)
    versions = _prepare(s, models, test_split)
    together = threading.Barrier(2)
    outcome = _race({run: (lambda run=run: run_deploy(s, run, NAME, versions[run], test_split, "1",
                                                      registry=_MovesTogether(s, together)))
                     for run in ("run-2", "run-3")})
    _check_one_winner(s, versions, outcome)


def test_canary_race_leaves_the_previous_champion_and_the_winner(tmp_path: Path, models: dict[str, Path],
                                                                 test_split: Path) -> None:
    s = _settings(tmp_path, **{"deploy.canary_percent": 10, "deploy.keep_versions": 2})
    versions = _prepare(s, models, test_split)
    together = threading.Barrier(2)
    outcome = _race({run: (lambda run=run: run_deploy(s, run, NAME, versions[run], test_split, "1",
                                                      registry=_MovesTogether(s, together)))
                     for run in ("run-2", "run-3")})
    (winner,) = [run for run, r in outcome.items() if isinstance(r, DeployResult)]
    (loser,) = [run for run, r in outcome.items() if isinstance(r, ChampionMoved)]
    registry = LocalRegistry(s.local.registry_db)
    # One canary wins the canary alias (compare-and-set); the champion waits for the canary's judgement.
    assert registry.get_alias(NAME, "canary").version_id == int(versions[winner])
    assert registry.get_alias(NAME, "champion").version_id == 1
    served = {d.version: d.traffic_percent for d in registry.get_endpoint("ctloop-production").deployments}
    assert int(versions[loser]) not in served
    assert sum(served.values()) == 100 and served[int(versions[winner])] > 0
    assert set(served) <= {1, int(versions[winner])}
