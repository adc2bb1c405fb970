from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ctloop.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_repo_settings_file_loads_and_round_trips_as_a_pipeline_parameter() -> None:
    s = load_settings(REPO / "ctloop.yaml")
    assert s.columns.label_column == "churned"
    assert s.source_table == "ctloop-dev.ctloop.events"
    again = Settings.from_param(s.to_param())
    assert again == s


def test_overrides_are_typed_and_validated() -> None:
    s = load_settings(None, ["model.type=logistic_regression", "gate.min_roc_auc=0.8", "deploy.canary_percent=10"])
    assert s.model.type == "logistic_regression"
    assert s.gate.min_roc_auc == 0.8
    assert s.deploy.canary_percent == 10
    with pytest.raises(ValidationError, match="canary_percent"):
        load_settings(None, ["deploy.canary_percent=0"])
    with pytest.raises(ValidationError, match="model.type|type"):
        load_settings(None, ["model.type=random_forest"])


def test_unknown_keys_are_rejected_not_ignored(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gate:\n  min_roc_aucc: 0.9\n")
    with pytest.raises(ValidationError, match="min_roc_aucc"):
        load_settings(cfg)
    with pytest.raises(ValueError, match="not a settings section"):
        load_settings(None, ["nosuch.key=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_settings(None, ["model.seed"])


def test_role_columns_must_differ_and_not_be_features() -> None:
    with pytest.raises(ValidationError, match="must differ"):
        load_settings(None, ["columns.label_column=customer_id"])
    with pytest.raises(ValidationError, match="cannot also be a feature"):
        load_settings(None, ["columns.numeric_features=[churned, tenure_months]"])


def test_identifiers_are_checked_before_they_reach_sql() -> None:
    with pytest.raises(ValidationError, match="plain identifier"):
        load_settings(None, ["data.bq_table=events; DROP TABLE x"])
    with pytest.raises(ValidationError, match="valid GCP project id"):
        load_settings(None, ["gcp.project=Bad_Project"])


def test_missing_settings_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_settings(tmp_path / "nope.yaml")
