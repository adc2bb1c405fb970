"""train: fit the configured scikit-learn Pipeline on the train split and score the valid split.

Outputs a ``Model`` directory (``model.joblib`` + ``model_card.json``) with its lineage in the metadata, and
the validation metrics. The run is logged to Vertex AI Experiments (cloud) or
``<runs_dir>/experiments.jsonl`` (local).
"""

from typing import Any

from kfp.dsl import Dataset, Input, Metrics, Model, Output

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.errors import CtloopError
from ctloop.modeling import TrainResult, train_model


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def train(
    config: dict,
    run_id: str,
    train: Input[Dataset],
    valid: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Fit on train, score valid, write the model and its card."""
    from components.train import run_train_step
    from ctloop.steps import run_step

    run_step(run_train_step, config, run_id, train, valid, model, metrics)


def lineage_for(settings: Settings, train: Any, valid: Any) -> dict[str, Any]:
    """What the model was built from: split URIs, their upstream source and the code version.

    The git sha comes from the split's metadata if an upstream step recorded it, else the ``git_sha`` label.
    """
    meta = dict(train.metadata or {})
    return {
        "git_sha": meta.get("git_sha") or settings.labels.get("git_sha") or "unknown",
        "train_uri": train.uri,
        "valid_uri": valid.uri,
        "source": meta.get("source", ""),
    }


# The train step's peak memory per row of its train + valid splits, rounded up from the bench (4.0 GB at 5M
# extracted rows, docs/architecture.md): pandas frames plus the model's working copies.
TRAIN_BYTES_PER_ROW = 1000


def check_memory(settings: Settings, train_dir: str, valid_dir: str) -> None:
    """On Vertex, refuse splits that would not fit the step's memory limit (``resources.train.memory``) with a
    line saying so, rather than being killed out of memory. Reads only the Parquet footers."""
    if settings.backend != "cloud":
        return
    import pyarrow.dataset as ds
    from kfp.compiler import compiler_utils

    rows = sum(ds.dataset(d, format="parquet").count_rows() for d in (train_dir, valid_dir))
    limit = settings.resources["train"].memory
    need_gb = rows * TRAIN_BYTES_PER_ROW / 1e9
    if need_gb > compiler_utils._memory_to_float(limit):
        raise CtloopError(f"train: {rows:,} train + valid rows need about {need_gb:.3g}G of memory at "
                          f"{TRAIN_BYTES_PER_ROW} bytes per row; resources.train.memory is {limit}: raise it, or "
                          f"shorten data.window_days")


def run_train_step(config: dict, run_id: str, train: Any, valid: Any, model: Any,
                   metrics: Any) -> TrainResult:
    """The component body: settings from the parameter, artifact paths in, model + lineage + metrics out."""
    settings = Settings.from_param(config)
    check_memory(settings, train.path, valid.path)
    lineage = lineage_for(settings, train, valid)
    result = train_model(settings, train.path, valid.path, model.path, run_id, lineage)
    card = result.card
    model.metadata.update({
        "framework": "scikit-learn",
        "framework_version": card["versions"]["sklearn"],
        "python_version": card["versions"]["python"],
        "model_type": card["model_type"],
        "threshold": card["threshold"],
        "training_data_checksum": result.checksum,
        "train_rows": result.rows["train"],
        "valid_rows": result.rows["valid"],
        "git_sha": card["git_sha"],
        "run_id": run_id,
    })
    for name, value in result.valid_metrics.items():
        metrics.log_metric(name, value)
    metrics.metadata["split"] = "valid"
    metrics.metadata["run_id"] = run_id
    return result
