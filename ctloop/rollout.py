"""The deploy algorithm, written once over ``ctloop.registry.base.Registry`` (local and Vertex AI alike).

1. ``stage_and_smoke``: the candidate goes to the staging endpoint with 100% of its traffic, is smoke-tested
   there (``ctloop.smoke``) and leaves staging again whatever the outcome: staging serves nothing between runs.
   A failure raises ``SmokeTestFailed``; production and the champion are untouched.
2. ``require_champion``: the champion must still be the version the gate compared the candidate against,
   checked before production is touched.

Cutover (``deploy.canary_percent`` 100 and no shadow, or no champion serving production yet):

3. ``deploy_to_production``: the oldest deployments beyond ``deploy.keep_versions`` give their traffic back
   and the candidate gets ``deploy.canary_percent`` (``canary_split``; 100 on an endpoint serving nothing).
4. ``promote``: ``champion`` moves compare-and-set from the gate's champion to the candidate,
   ``previous-champion`` to the gate's champion. If another run moved the champion meanwhile, the candidate
   leaves production again (``rollback_production``) and ``ChampionMoved`` names both versions.
5. ``retire``: every production deployment left with 0% traffic is undeployed (but the champion's).

Judged canary (``deploy.canary_percent`` < 100 or ``canary.shadow``, with the champion serving production):

3. ``deploy_canary``: the candidate gets ``canary_percent`` (0 in shadow), the champion the rest. A previous
   canary that was never judged gives its share back to the champion, never the other way round.
4. ``canary`` moves to the candidate compare-and-set (``champion`` still on the gate's champion, ``canary``
   where it was read); ``champion`` does not move. Losing that race takes the candidate off production again.
5. ``retire`` (the champion's and the canary's deployments stay). ``ctloop.canary`` judges it later.

Deploying the version that already is the deployed champion changes nothing.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ctloop.config import DeploySettings
from ctloop.errors import CtloopError
from ctloop.registry.base import (
    CANARY_ALIAS,
    CHAMPION_ALIAS,
    NEW_DEPLOYMENT,
    PREVIOUS_CHAMPION_ALIAS,
    AliasMoved,
    Deployed,
    Registry,
    StaleSplit,
    Version,
    find_deployed,
    split_of,
)
from ctloop.registry.traffic import allocate_traffic, unallocate_traffic
from ctloop.smoke import SmokeReport, run_smoke, smoke_failed

T = TypeVar("T")
_ATTEMPTS = 3


class ChampionMoved(CtloopError):
    """The champion is no longer the version the gate compared the candidate against: not promoted."""


@dataclass(frozen=True)
class DeployResult:
    endpoint: str  # the production endpoint's resource name (local: its name)
    deployed_model_id: str
    staging_endpoint: str
    traffic_split: dict[str, int]
    changed: bool  # False when the version already was the deployed champion
    smoke: SmokeReport | None = None
    previous_champion: str | None = None
    canary: bool = False  # True: the candidate is a canary (or shadow) awaiting judgement; champion unchanged


def check_settings(d: DeploySettings) -> None:
    if d.canary_percent < 100 and d.keep_versions < 2:
        raise ValueError(f"deploy.canary_percent={d.canary_percent} needs deploy.keep_versions >= 2 (the "
                         f"previous version serves the other {100 - d.canary_percent}%), "
                         f"found {d.keep_versions}")


def rollout(registry: Registry, d: DeploySettings, version: str, expected_champion: str | None,
            instances: list[dict[str, Any]], shadow: bool = False) -> DeployResult:
    """Roll ``version`` out as described in the module docstring; ``expected_champion`` is the champion version
    the gate compared against (None: there was none); ``shadow``: ``canary.shadow``."""
    check_settings(d)
    candidate = registry.get_version(str(version))  # fails early, naming the versions there are
    champion = registry.find_version(CHAMPION_ALIAS)
    live = find_deployed(registry.deployments(d.production_endpoint), candidate.version)
    if live is not None and champion is not None and champion.version == candidate.version:
        return DeployResult(registry.ensure_endpoint(d.production_endpoint), live.id, d.staging_endpoint,
                            split_of(registry.deployments(d.production_endpoint)), changed=False)
    require_champion(champion, expected_champion, candidate)

    report = stage_and_smoke(registry, d.staging_endpoint, candidate, instances, d.smoke_max_latency_ms)

    endpoint = registry.ensure_endpoint(d.production_endpoint)
    serving = find_deployed(registry.deployments(d.production_endpoint), expected_champion or "")
    if serving is not None and (d.canary_percent < 100 or shadow):
        deployed = start_canary(registry, d.production_endpoint, candidate, serving,
                                0 if shadow else d.canary_percent, expected_champion)
        return DeployResult(endpoint, deployed.id, d.staging_endpoint,
                            split_of(registry.deployments(d.production_endpoint)), changed=True, smoke=report,
                            previous_champion=expected_champion, canary=True)
    before = split_of(registry.deployments(d.production_endpoint))
    deployed = deploy_to_production(registry, d.production_endpoint, candidate.version, d.canary_percent,
                                    d.keep_versions)
    try:
        promote(registry, candidate.version, expected_champion)
    except AliasMoved as moved:
        rollback_production(registry, d.production_endpoint, deployed, before)
        raise ChampionMoved(_moved_message(candidate, expected_champion, moved.found)) from moved
    retire(registry, d.production_endpoint, {candidate.version})
    return DeployResult(endpoint, deployed.id, d.staging_endpoint,
                        split_of(registry.deployments(d.production_endpoint)), changed=True, smoke=report,
                        previous_champion=expected_champion)


def require_champion(champion: Version | None, expected: str | None, candidate: Version) -> None:
    """Raise ``ChampionMoved`` unless ``champion`` is the version the gate compared against."""
    found = champion.version if champion is not None else None
    if found != expected:
        raise ChampionMoved(_moved_message(candidate, expected, found))


def _moved_message(candidate: Version, expected: str | None, found: str | None) -> str:
    return (f"not promoted: the gate compared {candidate.resource_name} against champion version "
            f"{expected or '(none)'}, but another run made version {found or '(none)'} the champion "
            f"meanwhile; production keeps that version")


# -- staging ---------------------------------------------------------------------------------------------


def stage_and_smoke(registry: Registry, staging: str, candidate: Version, instances: list[dict[str, Any]],
                    max_latency_ms: float) -> SmokeReport:
    """Deploy the candidate to ``staging`` with 100%, smoke-test it, undeploy it; raise if the test failed."""
    registry.ensure_endpoint(staging)

    def step() -> tuple[list[Deployed], Deployed]:
        present = registry.deployments(staging) or []
        staged = find_deployed(present, candidate.version) or registry.deploy(
            staging, candidate.version, allocate_traffic(split_of(present), NEW_DEPLOYMENT, 100))
        return present, staged

    present, staged = on_fresh_state(step)
    try:
        report = smoke_test(registry, staging, staged, instances, max_latency_ms)
    finally:
        # Whatever was there before took no traffic once the candidate had 100%: a leftover of a run that
        # stopped half-way. Zero-traffic ones go first, so no undeploy leaves a split with nobody serving.
        for leftover in present:
            if leftover.id != staged.id:
                registry.undeploy(staging, leftover)
        registry.undeploy(staging, staged)
    if not report.ok:
        raise smoke_failed(f"staging endpoint {staging!r} ({candidate.resource_name})", report)
    return report


def smoke_test(registry: Registry, endpoint: str, deployed: Deployed, instances: list[dict[str, Any]],
               max_latency_ms: float) -> SmokeReport:
    """The smoke test against one deployment; a server that cannot start is a failed test."""
    try:
        with registry.predictor(endpoint, deployed) as predict:
            return run_smoke(predict, instances, max_latency_ms)
    except Exception as exc:  # noqa: BLE001 - a server that cannot start fails the smoke test
        return SmokeReport(len(instances), [f"server did not start: {type(exc).__name__}: {exc}"])


# -- production ------------------------------------------------------------------------------------------


def canary_split(current: dict[str, int], canary_percent: int, keep_versions: int) -> dict[str, int]:
    """The production split once the candidate (``NEW_DEPLOYMENT``) lands: the oldest beyond
    ``keep_versions`` are left out (0%), the candidate gets ``canary_percent`` (100 when nothing serves)."""
    split = dict(current)
    for old in list(current)[: max(0, len(current) + 1 - keep_versions)]:
        split = unallocate_traffic(split, old)
    percent = canary_percent if sum(split.values()) else 100
    return allocate_traffic(split, NEW_DEPLOYMENT, percent)


def on_fresh_state(step: Callable[[], T]) -> T:
    """Run ``step`` (which reads the endpoint, then writes a split computed from it) again when another run
    changed the endpoint in between."""
    for attempt in range(_ATTEMPTS):
        try:
            return step()
        except StaleSplit:
            if attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def deploy_to_production(registry: Registry, production: str, version: str, canary_percent: int,
                         keep_versions: int) -> Deployed:
    """Deploy ``version`` to ``production`` with the ``canary_split`` (no-op if it is already there)."""

    def step() -> Deployed:
        current = registry.deployments(production) or []
        deployed = find_deployed(current, version)
        if deployed is not None:
            return deployed
        return registry.deploy(production, version,
                               canary_split(split_of(current), canary_percent, keep_versions))

    return on_fresh_state(step)


def start_canary(registry: Registry, production: str, candidate: Version, champion: Deployed, percent: int,
                 expected_champion: str | None) -> Deployed:
    """Deploy the candidate beside the champion with ``percent`` (0: shadow) and move ``canary`` to it."""
    previous = registry.find_version(CANARY_ALIAS)
    before = split_of(registry.deployments(production))

    def step() -> Deployed:
        current = registry.deployments(production) or []
        deployed = find_deployed(current, candidate.version)
        if deployed is not None:
            return deployed
        # Only the champion keeps a share: an earlier canary that was never judged gives its share back.
        return registry.deploy(production, candidate.version,
                               allocate_traffic({champion.id: 100}, NEW_DEPLOYMENT, percent))

    deployed = on_fresh_state(step)
    try:
        registry.move_aliases({CANARY_ALIAS: candidate.version},
                              {CHAMPION_ALIAS: expected_champion,
                               CANARY_ALIAS: previous.version if previous is not None else None})
    except AliasMoved as moved:
        rollback_production(registry, production, deployed, before)
        what = "the champion" if moved.alias == CHAMPION_ALIAS else "the canary"
        raise ChampionMoved(f"not deployed as canary: {what} moved to version {moved.found or '(none)'} while "
                            f"{candidate.resource_name} was being deployed; production keeps that "
                            f"version") from moved
    retire(registry, production, {champion.version, candidate.version})
    return deployed


def promote(registry: Registry, version: str, expected_champion: str | None) -> None:
    """Move ``champion`` to ``version`` if it still is on ``expected_champion`` (``AliasMoved`` if not), and
    ``previous-champion`` to ``expected_champion``."""
    moves = {CHAMPION_ALIAS: version}
    if expected_champion is not None and expected_champion != version:
        moves[PREVIOUS_CHAMPION_ALIAS] = expected_champion
    registry.move_aliases(moves, {CHAMPION_ALIAS: expected_champion})


def rollback_production(registry: Registry, production: str, deployed: Deployed,
                        before: dict[str, int]) -> None:
    """Take ``deployed`` off ``production``: the split from ``before`` comes back if the endpoint holds the same
    other deployments, else the others scale back up."""

    def step() -> None:
        current = registry.deployments(production) or []
        if find_deployed(current, deployed.version) is None:
            return
        rest = {d.id for d in current if d.id != deployed.id}
        split = dict(before) if set(before) == rest and sum(before.values()) == 100 else \
            unallocate_traffic(split_of(current), deployed.id)
        registry.undeploy(production, deployed, split)

    on_fresh_state(step)


def retire(registry: Registry, production: str, keep: set[str]) -> None:
    """Undeploy every deployment of ``production`` that takes no traffic (each one keeps a serving node), but
    the versions in ``keep`` (the champion's: a losing run that is still rolling back gives its traffic back to
    it; a shadow canary's)."""
    for idle in [d for d in registry.deployments(production) or () if not d.traffic and d.version not in keep]:
        registry.undeploy(production, idle)
