"""The training pipeline: one DAG, the same on Vertex AI Pipelines and under the KFP local runner.

Steps, in order:
  1. extract          BigQuery SQL (DuckDB locally) -> Parquet Dataset
  2. transform        PySpark on Dataproc Serverless (local Spark) -> train / valid / test + data-quality report
     materialize_features: each entity's latest history state -> the online store (SQLite / Vertex AI Feature Store)
  3. train            scikit-learn Pipeline -> Model + validation Metrics
  4. lookup_champion  the registry's `champion` alias (empty for the first model)
  5. evaluate_gate    candidate and champion scored on the same test split -> decision
  6. pass: register (new model version) -> deploy (staging, smoke test, production, alias move if the
     champion is still the one the gate compared against)
     fail: report_rejection (the champion stays live)
"""


from kfp import dsl

from components.deploy import deploy
from components.evaluate import evaluate_gate
from components.extract import extract
from components.lookup import lookup_champion
from components.materialize import materialize_features
from components.register import register
from components.report import report_rejection
from components.train import train
from components.transform import transform

PIPELINE_NAME = "ctloop-training"
GATE_PASS = "pass"


@dsl.pipeline(name=PIPELINE_NAME, description="Continuous training: extract, transform, train, gate, register, deploy.")
def training_pipeline(config: dict, run_id: str, snapshot_time: str = "", trigger_uri: str = ""):
    # Extract reads a moving table: never serve it from cache. Side-effecting steps are never cached either.
    # No step-level retries: a step retries transient API errors itself and fails once on bad data or settings
    # (ctloop/steps.py). Display names are [a-z0-9-]: some backends build paths from them.
    data = extract(config=config, run_id=run_id, snapshot_time=snapshot_time)
    data.set_display_name("extract-bigquery").set_caching_options(False)

    splits = transform(config=config, run_id=run_id, dataset=data.outputs["dataset"])
    splits.set_display_name("transform-dataproc-pyspark")

    # Each entity's latest history state, for serving to derive the history features of its next event.
    online = materialize_features(config=config, run_id=run_id, train=splits.outputs["train"],
                                  valid=splits.outputs["valid"], test=splits.outputs["test"])
    online.set_display_name("materialize-online-features").set_caching_options(False)

    model = train(config=config, run_id=run_id, train=splits.outputs["train"], valid=splits.outputs["valid"])
    model.set_display_name("train-scikit-learn")

    champion = lookup_champion(config=config, run_id=run_id)
    champion.set_display_name("look-up-champion").set_caching_options(False)

    gate = evaluate_gate(
        config=config,
        run_id=run_id,
        model=model.outputs["model"],
        test=splits.outputs["test"],
        champion_uri=champion.outputs["champion_uri"],
    )
    gate.set_display_name("evaluate-gate").set_caching_options(False)

    with dsl.If(gate.outputs["decision"] == GATE_PASS, name="gate-passed"):
        version = register(config=config, run_id=run_id, model=model.outputs["model"],
                           metrics=gate.outputs["metrics"])
        version.set_display_name("register-model-registry").set_caching_options(False)
        # The champion the gate compared against: deploy promotes only if it still is the champion.
        rollout = deploy(config=config, run_id=run_id, model_name=version.outputs["model_resource"],
                         version=version.outputs["version"],
                         champion_version=champion.outputs["champion_version"], test=splits.outputs["test"])
        rollout.set_display_name("deploy-staging-smoke-production").set_caching_options(False)
        rollout.after(online)  # the smoke test's server looks the states up
    with dsl.Else(name="gate-failed"):
        rejected = report_rejection(config=config, run_id=run_id, reasons=gate.outputs["reasons"],
                                    trigger_uri=trigger_uri)
        rejected.set_display_name("report-rejection").set_caching_options(False)
