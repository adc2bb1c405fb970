"""The monitoring pipeline: is the recent data still what the champion was trained on? If not, retrain.

Steps, in order:
  1. collect_recent   the recent window: extract SQL (BigQuery / DuckDB) or the prediction log -> Dataset
  2. lookup_champion  the registry's `champion` alias
  3. check_drift      recent batch vs the champion's train split: PSI + KS / chi-square per feature, missing
                      rates, the champion's score distribution -> decision, HTML report, metrics
  4. drift: launch_training (a training PipelineJob / local run whose id derives from this run's id)
  5. judge_canary     beside the drift check: a canary on production is promoted a step, rolled back or held
                      on the prediction log (ctloop/canary.py; docs/monitoring.md, "Canary analysis")

It runs on a schedule (terraform/monitoring.tf: Cloud Scheduler -> the trigger function) and, under the
``on_drift`` retrain policy, for every new batch instead of the training pipeline (docs/monitoring.md).
"""


import json
from collections.abc import Callable

from kfp import dsl

from components.canary import judge_canary
from components.drift import check_drift
from components.launch import launch_training
from components.lookup import lookup_champion
from components.recent import collect_recent
from ctloop.config import Settings
from ctloop.launching import pipeline_parameters
from pipelines.local_run import RunRecord, new_run_id, run_local

PIPELINE_NAME = "ctloop-monitoring"
DRIFT = "drift"


@dsl.pipeline(name="retrain-on-drift", description="Launch training when the decision is drift.")
def retrain_on_drift(config: dict, run_id: str, snapshot_time: str, trigger_uri: str, decision: str, reasons: str):
    # A sub-DAG of its own: the KFP local runner resolves a condition on the sub-DAG's inputs, not on a sibling
    # task's output at the root (it would skip the branch), and Vertex runs it the same either way.
    with dsl.If(decision == DRIFT, name="drifted"):
        launch = launch_training(config=config, run_id=run_id, snapshot_time=snapshot_time,
                                 trigger_uri=trigger_uri, reasons=reasons)
        launch.set_display_name("launch-training").set_caching_options(False)


@dsl.pipeline(name=PIPELINE_NAME, description="Drift check against the champion's training data; retrain on drift.")
def monitoring_pipeline(config: dict, run_id: str, snapshot_time: str = "", trigger_uri: str = ""):
    # Every step reads moving state (new rows, the current champion) or has side effects: never cached.
    # No step-level retries (ctloop/steps.py); display names are [a-z0-9-].
    recent = collect_recent(config=config, run_id=run_id, snapshot_time=snapshot_time)
    recent.set_display_name("collect-recent-batch").set_caching_options(False)

    champion = lookup_champion(config=config, run_id=run_id)
    champion.set_display_name("look-up-champion").set_caching_options(False)

    drift = check_drift(config=config, run_id=run_id, recent=recent.outputs["recent"],
                        champion_uri=champion.outputs["champion_uri"])
    drift.set_display_name("check-drift").set_caching_options(False)

    retrain = retrain_on_drift(config=config, run_id=run_id, snapshot_time=snapshot_time, trigger_uri=trigger_uri,
                               decision=drift.outputs["decision"], reasons=drift.outputs["reasons"])
    retrain.set_display_name("retrain-on-drift").set_caching_options(False)

    canary = judge_canary(config=config, run_id=run_id)
    canary.set_display_name("judge-canary").set_caching_options(False)


def run_monitoring_local(
    settings: Settings,
    *,
    run_id: str | None,
    snapshot_time: str = "",
    trigger_uri: str = "",
    echo: Callable[[str], None] = print,
) -> tuple[int, RunRecord]:
    """Run the monitoring pipeline with the KFP local runner; prints the decision and the report path.

    Returns (exit code, run record): 0 when the run succeeded, whatever it decided.
    """
    run_id = run_id or new_run_id("ctloop-monitor")
    echo(f"ctloop monitor {run_id} (local; recent batch from {settings.monitoring.source}, "
         f"last {settings.monitoring.recent_days} days)")
    record = run_local(monitoring_pipeline, settings, run_id=run_id,
                       arguments=pipeline_parameters(settings, run_id, snapshot_time, trigger_uri), echo=echo)
    echo_summary(record, echo)
    if record.status != "SUCCEEDED":
        echo(f"error: {record.error}")
        return 1, record
    return 0, record


def echo_summary(record: RunRecord, echo: Callable[[str], None]) -> None:
    decision = record.output("check-drift", "decision", "n/a")
    echo(f"status: {record.status} in {record.seconds:.1f}s; drift decision: {decision}")
    for reason in json.loads(record.output("check-drift", "reasons", "[]") or "[]"):
        echo(f"  {reason.get('message')}")
    report = record.artifact("check-drift", "report").get("uri")
    if report:
        echo(f"report: {report}")
    if record.output("launch-training", "job_id"):
        state = "launched" if record.output("launch-training", "created") else "already launched"
        echo(f"training {state}: {record.output('launch-training', 'job_id')} "
             f"({record.output('launch-training', 'job_name')})")
    elif decision == "no_drift":
        echo("no retraining needed")
    canary = record.output("judge-canary", "decision", "")
    if canary and canary != "no_canary":
        echo(f"canary: {canary}")
