from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sklearn
from threadpoolctl import threadpool_limits

from ctloop.config import ModelSettings
from ctloop.errors import DataValidationError, ModelLoadError
from ctloop.features import FeatureSpec
from ctloop.metrics import choose_threshold, classification_metrics
from ctloop.model_runtime import ONNX_FILE, load_model
from ctloop.modeling import (
    CARD_FILE,
    MODEL_FILE,
    build_pipeline,
    data_checksum,
    experiment_run_name,
    make_classifier,
    read_split,
    train_model,
)
from tests.modeling_fixtures import UNSEEN_CONTRACT, feature_spec, settings_for, write_split, write_splits

MODEL_TYPES = ["logistic_regression", "hist_gradient_boosting"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # OpenMP threads contend badly on a loaded 2-core machine; one thread is faster and changes no result.
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_splits(tmp_path_factory.mktemp("splits"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, splits: dict[str, Path]) -> dict[str, Any]:
    """One trained model per type, shared by the read-only tests."""
    out = {}
    for model_type in MODEL_TYPES:
        work = tmp_path_factory.mktemp(model_type)
        settings = settings_for(work, model={"type": model_type})
        result = train_model(settings, splits["train"], splits["valid"], work / "model", "run-a",
                             {"git_sha": "abc123"})
        out[model_type] = (settings, result)
    return out


def _test_frame(splits: dict[str, Path]) -> pd.DataFrame:
    return read_split(splits["test"], FeatureSpec.read(splits["test"]), "test")


# -------------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_both_model_types_learn_and_handle_unseen_categories(model_type: str, trained: dict,
                                                             splits: dict[str, Path]) -> None:
    _, result = trained[model_type]
    assert result.valid_metrics["roc_auc"] > 0.7
    test = _test_frame(splits)
    assert (test["contract_type"] == UNSEEN_CONTRACT).sum() > 10  # the fixture really has unseen categories
    proba = load_model(result.model_dir).predict_proba(test)
    assert proba.shape == (len(test),) and np.isfinite(proba).all()
    assert classification_metrics(test["churned"], proba, 0.35)["roc_auc"] > 0.7


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_same_data_and_seed_give_bit_identical_probabilities(model_type: str, tmp_path: Path,
                                                             splits: dict[str, Path], trained: dict) -> None:
    """Same rows, even split into different part files in another order, give the very same model."""
    spec = FeatureSpec.read(splits["train"])
    shuffled = pd.read_parquet(splits["train"]).sample(frac=1.0, random_state=3)
    write_split(tmp_path / "train", shuffled, spec, parts=5)
    settings, first = trained[model_type]
    second = train_model(settings_for(tmp_path, model={"type": model_type}), tmp_path / "train",
                         splits["valid"], tmp_path / "model", "run-b")
    assert second.checksum == first.checksum
    assert second.valid_metrics == first.valid_metrics
    test = _test_frame(splits)
    p1 = load_model(first.model_dir).predict_proba(test)
    p2 = load_model(second.model_dir).predict_proba(test)
    assert np.array_equal(p1, p2)


def test_checksum_tracks_content_not_layout(splits: dict[str, Path]) -> None:
    spec = FeatureSpec.read(splits["train"])
    frame = read_split(splits["train"], spec, "train")
    assert data_checksum(frame) == data_checksum(frame.iloc[::-1])
    changed = frame.copy()
    changed.loc[0, "monthly_charges"] = changed.loc[0, "monthly_charges"] + 0.01
    assert data_checksum(changed) != data_checksum(frame)


def test_model_card_records_what_the_model_is_and_was_trained_on(trained: dict,
                                                                 splits: dict[str, Path]) -> None:
    settings, result = trained["hist_gradient_boosting"]
    card = json.loads((result.model_dir / CARD_FILE).read_text())
    assert card == result.card
    spec = FeatureSpec.read(splits["train"])
    assert card["model_type"] == "hist_gradient_boosting" and card["label"] == "churned"
    # The threshold is the F1 optimum on the valid split (the default objective), recorded with how it was chosen.
    valid = read_split(splits["valid"], spec, "valid")
    proba = load_model(result.model_dir).pipeline.predict_proba(valid[spec.model_features])[:, 1]
    threshold, best_f1 = choose_threshold(valid["churned"].to_numpy(), proba, "f_beta")
    assert card["threshold"] == threshold != settings.model.threshold
    assert card["threshold_selection"] | {"objective_value": None} == {
        "objective": "f_beta", "beta": 1.0, "cost_false_positive": 1.0, "cost_false_negative": 1.0,
        "split": "valid", "objective_value": None}
    assert card["threshold_selection"]["objective_value"] == pytest.approx(best_f1)
    assert result.valid_metrics["f1"] == pytest.approx(best_f1)
    assert card["features"] == [{"name": c, "type": "numeric"} for c in spec.model_numeric] + [
        {"name": c, "type": "categorical"} for c in spec.categorical]
    assert FeatureSpec(**card["feature_spec"]) == spec
    train = pd.read_parquet(splits["train"])
    valid = pd.read_parquet(splits["valid"])
    assert card["training_data"]["rows"] == {"train": len(train), "valid": len(valid)}
    assert card["training_data"]["positive_rate"]["train"] == pytest.approx(train["churned"].mean())
    assert card["training_data"]["checksum"] == data_checksum(read_split(splits["train"], spec, "train"))
    assert card["hyperparameters"]["early_stopping"] is False
    assert card["hyperparameters"]["random_state"] == settings.model.seed
    assert card["versions"]["sklearn"] == sklearn.__version__
    assert card["versions"]["python"] == platform.python_version()
    assert card["versions"]["pandas"] == pd.__version__
    assert card["git_sha"] == "abc123" and card["run_id"] == "run-a"
    assert card["validation_metrics"] == result.valid_metrics
    assert card["created_at"].endswith("+00:00")
    # The ONNX export beside the pickle; no temp files left.
    assert sorted(p.name for p in result.model_dir.iterdir()) == sorted([MODEL_FILE, ONNX_FILE, CARD_FILE])
    assert card["onnx"] == {"file": ONNX_FILE, "reason": ""}


def test_git_sha_defaults_to_unknown(tmp_path: Path, splits: dict[str, Path]) -> None:
    result = train_model(settings_for(tmp_path, model={"type": "logistic_regression"}), splits["train"],
                         splits["valid"], tmp_path / "m", "run-c")
    assert result.card["git_sha"] == "unknown"


# ------------------------------------------------------------------------------------------ hyper-parameters
def test_unknown_hyperparameter_names_it_and_the_allowed_keys(splits: dict[str, Path]) -> None:
    model = ModelSettings(type="hist_gradient_boosting", params={"max_itr": 10, "learning_rate": 0.1})
    expected = r"unknown hyper-parameter\(s\) \['max_itr'\] for hist_gradient_boosting; allowed: .*'max_iter'"
    with pytest.raises(ValueError, match=expected):
        build_pipeline(FeatureSpec.read(splits["train"]), model)
    with pytest.raises(ValueError, match="set model.seed instead"):
        make_classifier(ModelSettings(type="logistic_regression", params={"random_state": 1}))


def test_params_override_defaults_and_integral_floats_become_ints() -> None:
    # Pipeline parameters arrive through protobuf Structs: every number is a float.
    params = {"max_iter": 50.0, "l2_regularization": 1.0, "max_depth": 4.0}
    clf = make_classifier(ModelSettings(type="hist_gradient_boosting", seed=5, params=params))
    params = clf.get_params()
    assert params["max_iter"] == 50 and type(params["max_iter"]) is int
    assert params["max_depth"] == 4 and type(params["max_depth"]) is int
    assert params["l2_regularization"] == 1.0 and type(params["l2_regularization"]) is float
    assert params["random_state"] == 5 and params["early_stopping"] is False
    lr = make_classifier(ModelSettings(type="logistic_regression", params={"C": 0.5, "class_weight": None}))
    assert lr.get_params()["C"] == 0.5 and lr.get_params()["class_weight"] is None
    default_lr = make_classifier(ModelSettings(type="logistic_regression"))
    assert default_lr.get_params()["class_weight"] == "balanced"


def test_missing_values_in_any_spelling_are_missing(trained: dict, splits: dict[str, Path]) -> None:
    """None, NaN and pd.NA in a categorical, NaN and pd.NA in a numeric: all score as one missing value."""
    loaded = load_model(trained["logistic_regression"][1].model_dir)
    row = _test_frame(splits).iloc[[0]].reset_index(drop=True)
    variants = []
    for cat_missing, num_missing in ((None, np.nan), (np.nan, np.nan), (pd.NA, pd.NA)):
        frame = row.copy().astype({"contract_type": object, "tenure_months": object})
        frame.loc[0, "contract_type"] = cat_missing
        frame.loc[0, "tenure_months"] = num_missing
        variants.append(loaded.predict_proba(frame)[0])
    assert variants[0] == variants[1] == variants[2]
    present = loaded.predict_proba(row.assign(contract_type="month_to_month", tenure_months=3.0))[0]
    assert present != variants[0]


# ------------------------------------------------------------------------------------------------ load/score
def test_load_model_rejects_another_sklearn_minor(trained: dict, tmp_path: Path) -> None:
    model_dir = shutil.copytree(trained["logistic_regression"][1].model_dir, tmp_path / "m")
    card = json.loads((model_dir / CARD_FILE).read_text())
    card["versions"]["sklearn"] = "1.4.2"
    (model_dir / CARD_FILE).write_text(json.dumps(card))
    expected = rf"saved with scikit-learn 1\.4\.2, installed is {sklearn.__version__}"
    with pytest.raises(ModelLoadError, match=expected):
        load_model(model_dir)


def test_load_model_missing_or_corrupt_files(trained: dict, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model_card.json not found"):
        load_model(tmp_path / "nowhere")
    model_dir = shutil.copytree(trained["logistic_regression"][1].model_dir, tmp_path / "m")
    (model_dir / MODEL_FILE).write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match=r"model\.joblib: cannot load"):
        load_model(model_dir)
    (model_dir / CARD_FILE).write_text("{")
    with pytest.raises(ModelLoadError, match="not a valid model card"):
        load_model(model_dir)


def test_predict_names_missing_columns(trained: dict, splits: dict[str, Path]) -> None:
    loaded = load_model(trained["logistic_regression"][1].model_dir)
    frame = _test_frame(splits).drop(columns=["region", "support_calls"])
    with pytest.raises(DataValidationError, match=r"lacks feature column\(s\) \['support_calls', 'region'\]"):
        loaded.predict_proba(frame)


# ------------------------------------------------------------------------------------------------ bad input
def _copy_splits(splits: dict[str, Path], root: Path) -> dict[str, Path]:
    return {name: shutil.copytree(path, root / name) for name, path in splits.items()}


def _rewrite(directory: Path, change: Any) -> None:
    frame = change(pd.read_parquet(directory))
    for part in directory.glob("part-*"):
        part.unlink()
    write_split(directory, frame, FeatureSpec.read(directory))


def test_bad_label_values_are_named(tmp_path: Path, splits: dict[str, Path]) -> None:
    copy = _copy_splits(splits, tmp_path)
    _rewrite(copy["train"], lambda f: f.assign(churned=f["churned"].where(f.index != 5, 2)))
    expected = r"train split .*train: label column 'churned' must hold 0/1, found values \[2\]"
    with pytest.raises(DataValidationError, match=expected):
        train_model(settings_for(tmp_path), copy["train"], copy["valid"], tmp_path / "m", "r")
    assert not (tmp_path / "m").exists()


def test_missing_feature_column_is_named(tmp_path: Path, splits: dict[str, Path]) -> None:
    copy = _copy_splits(splits, tmp_path)
    _rewrite(copy["valid"], lambda f: f.drop(columns=["monthly_charges"]))
    expected = r"valid split .*valid: missing column\(s\) \['monthly_charges'\]"
    with pytest.raises(DataValidationError, match=expected):
        train_model(settings_for(tmp_path), copy["train"], copy["valid"], tmp_path / "m", "r")


def test_split_specs_must_agree(tmp_path: Path, splits: dict[str, Path]) -> None:
    copy = _copy_splits(splits, tmp_path)
    feature_spec(["monthly_charges_2"]).write(copy["valid"])
    with pytest.raises(DataValidationError, match="feature specs differ"):
        train_model(settings_for(tmp_path), copy["train"], copy["valid"], tmp_path / "m", "r")


def test_one_class_train_split_is_rejected(tmp_path: Path, splits: dict[str, Path]) -> None:
    copy = _copy_splits(splits, tmp_path)
    _rewrite(copy["train"], lambda f: f.assign(churned=0))
    with pytest.raises(DataValidationError, match="label column 'churned' holds one class only"):
        train_model(settings_for(tmp_path), copy["train"], copy["valid"], tmp_path / "m", "r")


def test_not_a_split_directory(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="is not a directory of Parquet files"):
        read_split(tmp_path / "absent", feature_spec(), "test")


# ----------------------------------------------------------------------------------------------- experiments
def test_local_experiment_log_has_one_record_per_run(tmp_path: Path, splits: dict[str, Path]) -> None:
    settings = settings_for(tmp_path, model={"type": "logistic_regression", "params": {"C": 0.5}})
    for run_id in ("run-1", "run-2", "run-1"):  # a retried run replaces its record
        train_model(settings, splits["train"], splits["valid"], tmp_path / run_id, run_id)
    log = tmp_path / "runs" / "experiments.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["run_id"] for r in records) == ["run-1", "run-2"]
    record = records[-1]
    assert record["run_id"] == "run-1" and record["experiment"] == settings.gcp.experiment
    assert record["params"]["model_type"] == "logistic_regression" and record["params"]["C"] == 0.5
    assert record["params"]["class_weight"] == "balanced"
    assert 0.7 < record["metrics"]["valid_roc_auc"] <= 1.0
    assert not list(log.parent.glob(".*tmp"))


def test_experiment_run_names_follow_the_vertex_format() -> None:
    assert experiment_run_name("run-42", "ctloop") == "run-42"
    odd = experiment_run_name("Run_42/Retry", "ctloop")
    assert odd.startswith("run-42-retry-") and odd != experiment_run_name("run_42/retry", "ctloop")
    long = experiment_run_name("r" * 300, "ctloop")
    assert len("ctloop-" + long) <= 128 and long.rstrip("-") == long


@pytest.fixture
def fresh_aiplatform() -> Iterator[None]:
    """aiplatform keeps process-wide settings and an active experiment: leave none behind for other tests."""
    from google.cloud.aiplatform import initializer
    from google.cloud.aiplatform.metadata import metadata

    yield
    metadata._experiment_tracker.reset()
    initializer.global_config.__init__()


def _fake_metadata_store(server: Any, parent: str) -> dict[str, dict]:
    """Vertex ML Metadata contexts as a dict: get (404 when absent), create (409 when present), patch."""
    contexts: dict[str, dict] = {}
    store = f"{parent}/metadataStores/default"

    def get(req: Any) -> tuple[int, Any]:
        name = req.path.removeprefix("/v1/")
        if name in contexts:
            return 200, contexts[name]
        return 404, {"error": {"code": 404, "message": f"{name} not found", "status": "NOT_FOUND"}}

    def create(req: Any) -> tuple[int, Any]:
        name = f"{store}/contexts/{req.query['contextId'][0]}"
        if name in contexts:
            return 409, {"error": {"code": 409, "message": f"{name} exists", "status": "ALREADY_EXISTS"}}
        contexts[name] = {**req.json, "name": name, "createTime": "2025-01-01T00:00:00Z"}
        return 200, contexts[name]

    def patch(req: Any) -> tuple[int, Any]:
        name = req.path.removeprefix("/v1/")
        contexts[name] = {**contexts[name], **req.json}
        return 200, contexts[name]

    server.route("GET", f"/v1/{store}", {"name": store})
    server.route("GET", f"/v1/{store}/(contexts|artifacts)/[^/:]+", get)
    server.route("POST", f"/v1/{store}/contexts", create)
    server.route("POST", f"/v1/{store}/contexts/[^/]+:addContextChildren", {})
    server.route("PATCH", f"/v1/{store}/contexts/[^/:]+", patch)
    return contexts


def test_cloud_experiment_run_is_logged_to_vertex(recording_server: Any, fresh_aiplatform: None) -> None:
    from google.auth.credentials import AnonymousCredentials

    from ctloop.config import Settings
    from ctloop.modeling import log_experiment

    settings = Settings.model_validate({"backend": "cloud",
                                        "gcp": {"project": "ctloop-test", "experiment": "churn"}})
    parent = "projects/ctloop-test/locations/europe-west4"
    store = f"{parent}/metadataStores/default"
    contexts = _fake_metadata_store(recording_server, parent)
    vertex = {"credentials": AnonymousCredentials(), "api_endpoint": recording_server.url,
              "api_transport": "rest"}

    log_experiment(settings, "Run_7", {"model_type": "logistic_regression", "C": 0.5, "class_weight": None},
                   {"valid_roc_auc": 0.81, "valid_n": 800}, **vertex)

    run_name = experiment_run_name("Run_7", "churn")
    created = recording_server.find("POST", f"/v1/{store}/contexts")
    assert [(r.query["contextId"][0], r.json["schemaTitle"]) for r in created] == [
        ("churn", "system.Experiment"), (f"churn-{run_name}", "system.ExperimentRun")]
    [child] = recording_server.find("POST", f"/v1/{store}/contexts/churn:addContextChildren")
    assert child.json == {"childContexts": [f"{store}/contexts/churn-{run_name}"]}
    run = contexts[f"{store}/contexts/churn-{run_name}"]
    assert run["metadata"]["_params"] == {"model_type": "logistic_regression", "C": 0.5,
                                          "class_weight": "None"}
    assert run["metadata"]["_metrics"] == {"valid_roc_auc": 0.81, "valid_n": 800.0}
    assert run["metadata"]["_state"] == "COMPLETE"

    # A retried step logs the same run again: the 409 on create resumes the existing run.
    log_experiment(settings, "Run_7", {"C": 0.5}, {"valid_roc_auc": 0.82}, **vertex)
    run = contexts[f"{store}/contexts/churn-{run_name}"]
    assert run["metadata"]["_metrics"]["valid_roc_auc"] == 0.82 and run["metadata"]["_state"] == "COMPLETE"
    retried = recording_server.find("POST", f"/v1/{store}/contexts")[2:]
    assert [r.query["contextId"][0] for r in retried] == [f"churn-{run_name}"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pickled_pipeline_refers_to_public_runtime_names_only(model_type: str, trained: dict) -> None:
    """Registered models outlive refactors: the pickle may name only ctloop.model_runtime's public functions."""
    import io
    import pickle

    names: set[tuple[str, str]] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            names.add((module, name))
            return super().find_class(module, name)

    _, result = trained[model_type]
    Recording(io.BytesIO(pickle.dumps(load_model(result.model_dir).pipeline))).load()
    ours = {(module, name) for module, name in names if module.split(".")[0] == "ctloop"}
    assert ours == {("ctloop.model_runtime", "to_float64"), ("ctloop.model_runtime", "to_category_strings")}
