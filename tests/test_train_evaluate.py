import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Markdown, Metrics, Model
from threadpoolctl import threadpool_limits

from components.evaluate import NO_CHAMPION_METRIC, champion_path, run_evaluate, run_evaluate_step
from components.train import run_train_step
from ctloop.config import Settings
from ctloop.errors import ChampionError
from ctloop.features import FeatureSpec
from ctloop.metrics import classification_metrics
from ctloop.model_runtime import ONNX_CHECK_FILE, ONNX_FILE, frame_columns, load_model
from ctloop.modeling import CARD_FILE, MODEL_FILE, read_split, train_model
from tests.modeling_fixtures import settings_for, write_split, write_splits

# Only the champion comparison can fail under these settings: floors and calibration band are wide open.
OPEN_GATE = {"min_roc_auc": 0.0, "min_brier_skill": -100.0, "min_log_loss_skill": -100.0, "min_pr_auc_lift": 0.0,
             "max_calibration_intercept": 100.0, "min_calibration_slope": 1e-6, "max_calibration_slope": 1e6}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train_evaluate")


@pytest.fixture(scope="module")
def splits(work: Path) -> dict[str, Path]:
    return write_splits(work / "splits")


@pytest.fixture(scope="module")
def models(work: Path, splits: dict[str, Path]) -> dict[str, Path]:
    """strong: trained on the real labels; weak: trained on shuffled labels (no signal)."""
    # Small trees: on 2,400 rows the default 31-leaf trees overfit into overconfident probabilities (see
    # test_an_overconfident_booster_fails_the_calibration_slope).
    settings = settings_for(work, model={"type": "hist_gradient_boosting", "params": STRONG_PARAMS})
    strong = train_model(settings, splits["train"], splits["valid"], work / "strong", "run-strong").model_dir

    shuffled = work / "shuffled"
    for name in ("train", "valid"):
        frame = pd.read_parquet(splits[name])
        frame["churned"] = np.random.default_rng(1).permutation(frame["churned"].to_numpy())
        write_split(shuffled / name, frame, FeatureSpec.read(splits[name]))
    weak_settings = settings_for(work, model={"type": "logistic_regression"})
    weak = train_model(weak_settings, shuffled / "train", shuffled / "valid", work / "weak", "run-weak")
    return {"strong": strong, "weak": weak.model_dir}


STRONG_PARAMS = {"max_iter": 60, "max_leaf_nodes": 8}


def _by_check(result: Any) -> dict[str, dict[str, Any]]:
    return {r["check"]: r for r in result.decision.reasons}


# ----------------------------------------------------------------------------------------------- run_evaluate
def test_first_model_scores_the_test_split_and_passes(work: Path, splits: dict[str, Path],
                                                      models: dict[str, Path]) -> None:
    result = run_evaluate(settings_for(work), models["strong"], splits["test"], None)  # the default gate
    test = read_split(splits["test"], FeatureSpec.read(splits["test"]), "test")
    loaded = load_model(models["strong"])
    assert result.candidate_metrics == classification_metrics(test["churned"], loaded.predict_proba(test),
                                                              loaded.threshold)
    assert result.champion_metrics is None and result.decision.passed
    assert _by_check(result)["champion"]["passed"]
    assert sum(map(sum, result.confusion)) == len(test)
    assert len(result.roc["fpr"]) == len(result.roc["thresholds"]) <= 200


def test_an_overconfident_booster_fails_the_calibration_slope(work: Path, splits: dict[str, Path]) -> None:
    settings = settings_for(work, model={"type": "hist_gradient_boosting", "params": {"max_iter": 60}})
    model = train_model(settings, splits["train"], splits["valid"], work / "overfit", "run-overfit").model_dir
    result = run_evaluate(settings_for(work), model, splits["test"], None)
    assert [r["check"] for r in result.decision.failed] == ["calibration_slope"]
    assert result.candidate_metrics["calibration_slope"] < 0.8 and result.candidate_metrics["roc_auc"] > 0.7


def test_worse_champion_loses(work: Path, splits: dict[str, Path], models: dict[str, Path]) -> None:
    result = run_evaluate(settings_for(work, gate=OPEN_GATE), models["strong"], splits["test"],
                          str(models["weak"]))
    assert result.champion_metrics is not None
    assert result.champion_metrics["n"] == result.candidate_metrics["n"]  # the same test rows
    assert result.champion_metrics["roc_auc"] < 0.6 < 0.7 < result.candidate_metrics["roc_auc"]
    assert result.decision.passed and not result.decision.champion_below_floors
    check = _by_check(result)["champion_non_inferiority"]
    comparison = result.decision.comparison
    assert comparison["difference"] == pytest.approx(result.candidate_metrics["roc_auc"]
                                                     - result.champion_metrics["roc_auc"])
    assert check["passed"] and check["value"] == comparison["lower"] > 0
    assert check["threshold"] == -0.015 and comparison["method"] == "delong"


def test_champion_below_the_floors_raises_an_alert_and_is_replaced(work: Path, splits: dict[str, Path],
                                                                    models: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """The default floors: the no-signal champion fails them, which the reasons, the report and metrics say."""
    settings = settings_for(work)
    result = run_evaluate(settings, models["strong"], splits["test"], str(models["weak"]))
    d = result.decision
    assert d.passed and d.champion_below_floors
    alerts = {r["check"] for r in d.reasons if r["alert"]}
    assert {"champion_min_roc_auc", "champion_below_floors"} <= alerts
    assert "ALERT: the serving champion is below the gate's floors" in result.markdown
    assert "| champion_min_roc_auc | roc_auc |" in result.markdown and "**ALERT**" in result.markdown

    outs = {"metrics": _artifact(Metrics, tmp_path / "m"), "classification": _artifact(ClassificationMetrics,
            tmp_path / "c"), "report": _artifact(Markdown, tmp_path / "report.md")}
    _, _, _, reasons = run_evaluate_step(settings.to_param(), "run-a", _artifact(Model, models["strong"]),
                                         _artifact(Dataset, splits["test"]), str(models["weak"]),
                                         outs["metrics"], outs["classification"], outs["report"])
    assert outs["metrics"].metadata["champion_below_floors"] == 1
    assert any(r["check"] == "champion_below_floors" and r["alert"] for r in json.loads(reasons))


def test_better_champion_keeps_its_place(work: Path, splits: dict[str, Path],
                                         models: dict[str, Path]) -> None:
    result = run_evaluate(settings_for(work, gate=OPEN_GATE), models["weak"], splits["test"],
                          str(models["strong"]))
    assert not result.decision.passed and result.decision.decision == "fail"
    assert [r["check"] for r in result.decision.failed] == ["champion_non_inferiority"]
    assert "interval [" in _by_check(result)["champion_non_inferiority"]["message"]
    # Scored independently on the same rows, the champion's numbers match what the gate used.
    test = read_split(splits["test"], FeatureSpec.read(splits["test"]), "test")
    champion = load_model(models["strong"])
    expected = classification_metrics(test["churned"], champion.predict_proba(test), champion.threshold)
    assert result.champion_metrics == expected


def test_min_lift_against_an_identical_champion(work: Path, splits: dict[str, Path],
                                                models: dict[str, Path]) -> None:
    same = run_evaluate(settings_for(work, gate=OPEN_GATE), models["strong"], splits["test"],
                        str(models["strong"]))
    assert same.decision.passed  # identical scores: difference 0, standard error 0
    assert same.decision.comparison["lower"] == pytest.approx(0.0, abs=1e-12)
    lifted = run_evaluate(settings_for(work, gate={**OPEN_GATE, "min_lift": 0.001}), models["strong"],
                          splits["test"], str(models["strong"]))
    assert [r["check"] for r in lifted.decision.failed] == ["champion_min_lift"]


def test_report_lists_metrics_and_every_check(work: Path, splits: dict[str, Path],
                                              models: dict[str, Path]) -> None:
    result = run_evaluate(settings_for(work, gate=OPEN_GATE), models["weak"], splits["test"],
                          str(models["strong"]))
    md = result.markdown
    assert md.startswith("# Gate decision: **FAIL**")
    for name, value in result.candidate_metrics.items():
        champ = result.champion_metrics[name]
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in (value, champ)]
        assert f"| {name} | {cells[0]} | {cells[1]} |" in md
    for reason in result.decision.reasons:
        assert f"| {reason['check']} | {reason['metric']} | {reason['value']:.4f} |" in md
    assert f"1 of {len(result.decision.reasons)} checks failed." in md
    c = result.decision.comparison
    assert f"90% interval [{c['lower']:+.4f}, {c['upper']:+.4f}]" in md


# ------------------------------------------------------------------------------------------- broken champions
def test_missing_champion_is_an_error_not_a_pass(work: Path, splits: dict[str, Path],
                                                 models: dict[str, Path]) -> None:
    with pytest.raises(ChampionError, match=r"champion model .*nowhere cannot be loaded: .*not found"):
        run_evaluate(settings_for(work), models["strong"], splits["test"], str(work / "nowhere"))


def test_champion_with_other_feature_columns(work: Path, splits: dict[str, Path], models: dict[str, Path],
                                             tmp_path: Path) -> None:
    other = write_splits(tmp_path / "other", extra_numeric={"promo_score": 1.5})
    champion = train_model(settings_for(tmp_path, model={"type": "logistic_regression"}), other["train"],
                           other["valid"], tmp_path / "champion", "run-old").model_dir
    expected = r"needs feature column\(s\) \['promo_score'\] that the test split"
    with pytest.raises(ChampionError, match=expected):
        run_evaluate(settings_for(work), models["strong"], splits["test"], str(champion))
    # A champion that loads but cannot score the test split is never set aside, whatever the setting.
    with pytest.raises(ChampionError, match=expected):
        run_evaluate(settings_for(work, gate={"unloadable_champion": "replace"}), models["strong"], splits["test"],
                     str(champion))


def test_champion_from_another_sklearn(work: Path, splits: dict[str, Path], models: dict[str, Path],
                                       tmp_path: Path) -> None:
    champion = shutil.copytree(models["weak"], tmp_path / "champion")
    card = json.loads((champion / CARD_FILE).read_text())
    card["versions"]["sklearn"] = "0.24.2"
    (champion / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ChampionError, match="cannot be loaded: .*saved with scikit-learn 0.24.2"):
        run_evaluate(settings_for(work), models["strong"], splits["test"], str(champion))


def test_champion_that_fails_to_score(work: Path, splits: dict[str, Path], models: dict[str, Path],
                                      tmp_path: Path) -> None:
    """The champion was trained when ``region`` was numeric codes; the test split now holds strings."""
    spec = FeatureSpec.read(splits["train"])
    coded = FeatureSpec(**{**spec.__dict__, "numeric": [*spec.numeric, "region"],
                           "categorical": ["contract_type"]})
    for name in ("train", "valid"):
        frame = pd.read_parquet(splits[name])
        frame["region"] = frame["region"].map({"north": 0.0, "south": 1.0, "east": 2.0, "west": 3.0})
        write_split(tmp_path / name, frame, coded)
    champion = train_model(settings_for(tmp_path, model={"type": "logistic_regression"}), tmp_path / "train",
                           tmp_path / "valid", tmp_path / "champion", "run-old").model_dir
    expected = "cannot score the test split .*could not convert string to float"
    with pytest.raises(ChampionError, match=expected):
        run_evaluate(settings_for(work), models["strong"], splits["test"], str(champion))


def _old_sklearn_champion(source: Path, target: Path) -> Path:
    champion = shutil.copytree(source, target)
    card = json.loads((champion / CARD_FILE).read_text())
    card["versions"]["sklearn"] = "0.24.2"
    (champion / CARD_FILE).write_text(json.dumps(card))
    return champion


def _renamed_function_champion(source: Path, target: Path) -> Path:
    """A champion whose pickle refers to an input coercion that no longer exists under that name."""
    champion = shutil.copytree(source, target)
    pickled = (champion / MODEL_FILE).read_bytes()
    assert b"to_float64" in pickled
    (champion / MODEL_FILE).write_bytes(pickled.replace(b"to_float64", b"as_float_v"))
    return champion


@pytest.mark.parametrize("make_champion,reason", [
    (_old_sklearn_champion, r"saved with scikit-learn 0\.24\.2, installed is"),
    (_renamed_function_champion, r"model\.joblib: cannot load \(AttributeError: .*as_float_v"),
])
def test_unloadable_champion_fails_by_default_and_is_replaced_when_configured(
        work: Path, splits: dict[str, Path], models: dict[str, Path], tmp_path: Path, make_champion: Any,
        reason: str) -> None:
    champion = make_champion(models["strong"], tmp_path / "champion")
    with pytest.raises(ChampionError, match=f"cannot be loaded: .*{reason}"):
        run_evaluate(settings_for(work, gate=OPEN_GATE), models["weak"], splits["test"], str(champion))

    settings = settings_for(work, gate={**OPEN_GATE, "unloadable_champion": "replace"})
    result = run_evaluate(settings, models["weak"], splits["test"], str(champion))
    assert result.champion_metrics is None and result.decision.passed  # judged as a first model
    check = _by_check(result)["champion_unloadable"]
    assert check["passed"] and re.search(f"gate.unloadable_champion=replace.*{reason}", check["message"])
    assert re.search(f"set aside .*{reason}", result.markdown)


def test_run_record_carries_the_replaced_champion_reason(work: Path, splits: dict[str, Path],
                                                         models: dict[str, Path], tmp_path: Path) -> None:
    champion = _old_sklearn_champion(models["strong"], tmp_path / "champion")
    config = settings_for(tmp_path, gate={**OPEN_GATE, "unloadable_champion": "replace"}).to_param()
    outs = [_artifact(Metrics, tmp_path / "m"), _artifact(ClassificationMetrics, tmp_path / "c"),
            _artifact(Markdown, tmp_path / "report.md")]
    decision, _, champion_metric, reasons = run_evaluate_step(
        config, "run-10", _artifact(Model, models["weak"]), _artifact(Dataset, splits["test"]), str(champion),
        *outs)
    assert decision == "pass" and champion_metric == NO_CHAMPION_METRIC
    [entry] = [r for r in json.loads(reasons) if r["check"] == "champion_unloadable"]
    assert "saved with scikit-learn 0.24.2" in entry["message"]
    assert "saved with scikit-learn 0.24.2" in outs[0].metadata["champion_unloadable"]


# ------------------------------------------------------------------------------------------------- ONNX check
def test_gate_approves_an_agreeing_onnx_export_for_serving(work: Path, splits: dict[str, Path],
                                                           models: dict[str, Path], tmp_path: Path) -> None:
    for name in ("strong", "weak"):  # hist_gradient_boosting and logistic_regression
        model_dir = shutil.copytree(models[name], tmp_path / name)
        result = run_evaluate(settings_for(work, gate=OPEN_GATE), model_dir, splits["test"], None)
        check = json.loads((model_dir / ONNX_CHECK_FILE).read_text())
        assert check == result.onnx_check
        assert check["agrees"] and check["max_abs_diff"] <= 1e-6 and check["rows"] == result.candidate_metrics["n"]
        assert "## Serving runtime\n\nONNX Runtime: the ONNX export agrees with scikit-learn" in result.markdown
        loaded = load_model(model_dir)
        assert loaded.runtime == "onnx"
        test = read_split(splits["test"], FeatureSpec.read(splits["test"]), "test")
        served = loaded.probabilities(frame_columns(loaded.card, test))
        np.testing.assert_allclose(served, loaded.predict_proba(test), rtol=0, atol=1e-6)


def test_disagreeing_onnx_export_is_served_by_sklearn_and_the_report_says_why(
        work: Path, splits: dict[str, Path], models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = shutil.copytree(models["strong"], tmp_path / "strong")
    shutil.copy(models["weak"] / ONNX_FILE, model_dir / ONNX_FILE)  # another model's export
    result = run_evaluate(settings_for(work, gate=OPEN_GATE), model_dir, splits["test"], None)
    assert not result.onnx_check["agrees"] and result.onnx_check["max_abs_diff"] > 1e-6
    why = "ONNX and scikit-learn probabilities differ by up to"
    assert f"scikit-learn: the ONNX export is not served because {why}" in result.markdown
    loaded = load_model(model_dir)
    assert loaded.runtime == "sklearn" and loaded.runtime_reason.startswith(why)


def test_model_without_onnx_export_is_served_by_sklearn(work: Path, splits: dict[str, Path],
                                                        models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = shutil.copytree(models["weak"], tmp_path / "weak")
    (model_dir / ONNX_FILE).unlink()
    result = run_evaluate(settings_for(work, gate=OPEN_GATE), model_dir, splits["test"], None)
    assert result.onnx_check["reason"] == "no model.onnx in the model directory"
    assert load_model(model_dir).runtime_reason == "no model.onnx in the model directory"


@pytest.mark.parametrize(
    ("uri", "path"),
    [("", None), ("  ", None), ("gs://bucket/runs/x/model", "/gcs/bucket/runs/x/model"),
     ("file:///tmp/m", "/tmp/m"), ("/tmp/m", "/tmp/m")],
)
def test_champion_uri_to_path(uri: str, path: str | None) -> None:
    assert champion_path(uri) == path


# ----------------------------------------------------------------------------------------- component bodies
def _artifact(cls: type, path: Path) -> Any:
    return cls(name=path.name, uri=str(path), metadata={})


def test_step_bodies_fill_the_artifacts(work: Path, splits: dict[str, Path], tmp_path: Path) -> None:
    # class_weight="balanced" (the default) miscalibrates: open the calibration band so only roc_auc fails.
    settings = settings_for(tmp_path, model={"type": "logistic_regression"},
                            gate={"min_roc_auc": 0.99, "max_calibration_intercept": 10.0})
    config = settings.to_param()
    train_ds = _artifact(Dataset, splits["train"])
    train_ds.metadata["git_sha"] = "0123abc"
    model, metrics = _artifact(Model, tmp_path / "model"), _artifact(Metrics, tmp_path / "metrics")
    result = run_train_step(config, "run-9", train_ds, _artifact(Dataset, splits["valid"]), model, metrics)
    assert model.metadata["training_data_checksum"] == result.checksum
    assert model.metadata["git_sha"] == "0123abc" and model.metadata["run_id"] == "run-9"
    assert model.metadata["framework"] == "scikit-learn"
    assert metrics.metadata["roc_auc"] == result.valid_metrics["roc_auc"]
    assert result.card["lineage"]["train_uri"] == str(splits["train"])

    outs = {"metrics": _artifact(Metrics, tmp_path / "m"), "classification": _artifact(ClassificationMetrics,
            tmp_path / "c"), "report": _artifact(Markdown, tmp_path / "report.md")}
    test_ds = _artifact(Dataset, splits["test"])
    decision, primary, champion, reasons = run_evaluate_step(
        config, "run-9", model, test_ds, "", outs["metrics"], outs["classification"], outs["report"])
    assert decision == "fail"
    assert champion == NO_CHAMPION_METRIC and primary == outs["metrics"].metadata["roc_auc"]
    assert [r["check"] for r in json.loads(reasons) if not r["passed"]] == ["min_roc_auc"]
    assert outs["metrics"].metadata["decision"] == "fail"
    cm = outs["classification"].metadata["confusionMatrix"]
    assert [a["displayName"] for a in cm["annotationSpecs"]] == ["0", "1"]
    assert sum(sum(row["row"]) for row in cm["rows"]) == outs["metrics"].metadata["n"]
    roc = outs["classification"].metadata["confidenceMetrics"]
    assert roc and all(np.isfinite(p["confidenceThreshold"]) for p in roc)
    assert Path(outs["report"].path).read_text().startswith("# Gate decision: **FAIL**")


# ------------------------------------------------------------------------------------------ KFP local runner
def test_components_run_under_the_kfp_local_runner(work: Path, splits: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """train then evaluate_gate as real KFP tasks: the shells, the artifact wiring and the typed outputs."""
    from kfp import local

    from components.evaluate import evaluate_gate
    from components.train import train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    # The config dict travels as a protobuf Struct: max_iter arrives as 40.0 and must still train.
    settings = settings_for(tmp_path, model={"type": "hist_gradient_boosting",
                                                   "params": {"max_iter": 40, "max_depth": 3}})

    @dsl.pipeline(name="train-evaluate")
    def train_then_gate(config: dict, run_id: str, train_uri: str, valid_uri: str, test_uri: str) -> str:
        train_ds = dsl.importer(artifact_uri=train_uri, artifact_class=Dataset, reimport=True)
        valid_ds = dsl.importer(artifact_uri=valid_uri, artifact_class=Dataset, reimport=True)
        test_ds = dsl.importer(artifact_uri=test_uri, artifact_class=Dataset, reimport=True)
        fitted = train(config=config, run_id=run_id, train=train_ds.output, valid=valid_ds.output)
        gate = evaluate_gate(config=config, run_id=run_id, model=fitted.outputs["model"], test=test_ds.output,
                             champion_uri="")
        return gate.outputs["decision"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    # KFP refuses None inside a dict parameter; every None in the settings is its field's default anyway.
    config = settings.model_dump(mode="json", exclude_none=True)
    assert Settings.from_param(config) == settings
    run = train_then_gate(config=config, run_id="kfp-local-1", train_uri=str(splits["train"]),
                          valid_uri=str(splits["valid"]), test_uri=str(splits["test"]))
    assert run.output == "pass"

    [model_dir] = [p.parent for p in (tmp_path / "root").rglob(MODEL_FILE)]
    card = json.loads((model_dir / CARD_FILE).read_text())
    assert card["hyperparameters"]["max_iter"] == 40 and type(card["hyperparameters"]["max_iter"]) is int
    assert card["run_id"] == "kfp-local-1"
    [report] = list((tmp_path / "root").rglob("report"))
    assert "Gate decision: **PASS**" in report.read_text()
    assert (tmp_path / "runs" / "experiments.jsonl").is_file()


def test_cloud_train_refuses_splits_beyond_its_memory_limit(tmp_path: Path) -> None:
    """Rows counted from the Parquet footers against resources.train.memory: a clear line instead of an OOM kill."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.train import TRAIN_BYTES_PER_ROW, check_memory
    from ctloop.errors import CtloopError

    for split, rows in (("train", 3000), ("valid", 1000)):
        (tmp_path / split).mkdir()
        pq.write_table(pa.table({"x": list(range(rows))}), tmp_path / split / "part-0.parquet")
        (tmp_path / split / "_feature_spec.json").write_text("{}")  # not data: not counted
    fits = Settings().with_overrides({"backend": "cloud", "resources.train.memory": "1G"})
    check_memory(fits, str(tmp_path / "train"), str(tmp_path / "valid"))
    small = fits.with_overrides({"resources.train.memory": "3M"})  # 4,000 rows need 4 MB
    assert 4000 * TRAIN_BYTES_PER_ROW > 3e6
    with pytest.raises(CtloopError, match=r"^train: 4,000 train \+ valid rows need about 0.004G of memory at 1000 "
                                          r"bytes per row; resources.train.memory is 3M: raise it"):
        check_memory(small, str(tmp_path / "train"), str(tmp_path / "valid"))
    check_memory(small.with_overrides({"backend": "local"}), str(tmp_path / "train"), str(tmp_path / "valid"))
