"""The training pipeline: one DAG, the same on Vertex AI Pipelines and under the KFP local runner.

Steps, in order:
  1. extract          BigQuery SQL (DuckDB locally) -> Parquet Dataset
  2. transform        PySpark on Dataproc Serverless (local Spark) -> train / valid / test + data-quality report
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
from components.register import register
from components.report import report_rejection
from components.train import train
from components.transform import transform

PIPELINE_NAME = "ctloop-training"
GATE_PASS = "pass"


def _retry(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Steps that call external services retry transient failures with backoff."""
    return task.set_retry(num_retries=2, backoff_duration="5s", backoff_factor=2.0, backoff_max_duration="60s")


@dsl.pipeline(name=PIPELINE_NAME, description="Continuous training: extract, transform, train, gate, register, deploy.")
def training_pipeline(config: dict, run_id: str, snapshot_time: str = "", trigger_uri: str = ""):
    # Extract reads a moving table: never serve it from cache. Side-effecting steps are never cached either.
    data = _retry(extract(config=config, run_id=run_id, snapshot_time=snapshot_time))
    data.set_display_name("extract (BigQuery)").set_caching_options(False)

    splits = _retry(transform(config=config, run_id=run_id, dataset=data.outputs["dataset"]))
    splits.set_display_name("transform (Dataproc PySpark)")

    model = train(config=config, run_id=run_id, train=splits.outputs["train"], valid=splits.outputs["valid"])
    model.set_display_name("train (scikit-learn)")

    champion = _retry(lookup_champion(config=config, run_id=run_id))
    champion.set_display_name("look up champion").set_caching_options(False)

    gate = evaluate_gate(
        config=config,
        run_id=run_id,
        model=model.outputs["model"],
        test=splits.outputs["test"],
        champion_uri=champion.outputs["champion_uri"],
    )
    gate.set_display_name("evaluate gate").set_caching_options(False)

    with dsl.If(gate.outputs["decision"] == GATE_PASS, name="gate-passed"):
        version = _retry(register(config=config, run_id=run_id, model=model.outputs["model"],
                                  metrics=gate.outputs["metrics"]))
        version.set_display_name("register (Model Registry)").set_caching_options(False)
        # No step-level retry: a failed smoke test is deterministic and already rolled back; the Google
        # clients retry transient API errors inside the step.
        # The champion the gate compared against: deploy promotes only if it still is the champion.
        rollout = deploy(config=config, run_id=run_id, model_name=version.outputs["model_resource"],
                         version=version.outputs["version"],
                         champion_version=champion.outputs["champion_version"], test=splits.outputs["test"])
        rollout.set_display_name("deploy (staging, smoke, production)").set_caching_options(False)
    with dsl.Else(name="gate-failed"):
        rejected = report_rejection(config=config, run_id=run_id, reasons=gate.outputs["reasons"],
                                    trigger_uri=trigger_uri)
        rejected.set_display_name("report rejection").set_caching_options(False)
