"""judge_canary: the canary analysis step (``ctloop.canary``) of the monitoring pipeline.

Finds the canary on the production endpoint, judges it against the champion on the last ``canary.window_hours``
of the prediction log, and promotes it one step of ``canary.steps``, rolls it back or holds it. Outputs the
decision (``no_canary`` when there is none) and the verdict as JSON.
"""

import json
from typing import Any, NamedTuple

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.canary import CanaryOutcome, run_canary
from ctloop.config import Settings
from ctloop.registry import open_registry


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def judge_canary(config: dict, run_id: str) -> NamedTuple("Outputs", decision=str, verdict=str):
    """Judge the canary on the prediction log; promote a step, roll back or hold."""
    from components.canary import run_canary_step
    from ctloop.steps import run_step

    # Never retried as a whole: a retry after a promotion that half-happened would judge again and promote
    # a second step. A failed run leaves the split valid; the next scheduled run judges again.
    return run_step(run_canary_step, config, run_id, retry=lambda body: body)


def run_canary_step(config: dict, run_id: str) -> tuple[str, str]:
    outcome = judge(Settings.from_param(config))
    verdict = json.dumps(outcome.to_dict(), sort_keys=True, default=_plain)
    print(json.dumps({"canary": {"run_id": run_id, "decision": outcome.decision}}), flush=True)
    return outcome.decision, verdict


def judge(settings: Settings) -> CanaryOutcome:
    """The analysis over the settings' registry and prediction log."""
    return run_canary(settings, open_registry(settings))


def _plain(value: Any) -> Any:
    return float(value) if hasattr(value, "__float__") else str(value)
