"""Small deterministic train/valid/test split directories in the transform step's output layout.

The label is learnable from the features (logistic in tenure, charges, support calls and contract type).
Numerics carry NaNs, categoricals carry None, and the test split holds a contract type the other splits
never show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctloop.config import Settings
from ctloop.features import FeatureSpec

NUMERIC = ["tenure_months", "monthly_charges", "support_calls"]
CATEGORICAL = ["contract_type", "region"]
UNSEEN_CONTRACT = "biennial"
_CONTRACT_EFFECT = {"month_to_month": 1.2, "one_year": 0.0, "two_year": -1.0}


def feature_spec(extra_numeric: list[str] | None = None) -> FeatureSpec:
    return FeatureSpec(
        id_column="customer_id",
        timestamp_column="event_ts",
        label_column="churned",
        numeric=NUMERIC + list(extra_numeric or []),
        categorical=list(CATEGORICAL),
        history_means=["tenure_months"],
        history_enabled=True,
    )


def make_frame(n: int, seed: int, start: str, unseen_share: float = 0.0) -> pd.DataFrame:
    """``n`` rows starting at ``start``; ``unseen_share`` of the contract types become ``UNSEEN_CONTRACT``."""
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, n).astype("float64")
    charges = rng.normal(70, 20, n).round(2)
    calls = rng.poisson(1.5, n).astype("float64")
    contract = rng.choice(list(_CONTRACT_EFFECT), n, p=[0.5, 0.3, 0.2]).astype(object)
    region = rng.choice(["north", "south", "east", "west"], n).astype(object)
    prior = rng.integers(0, 6, n).astype("float64")
    days_since = np.where(prior > 0, rng.integers(1, 400, n).astype("float64"), np.nan)
    prior_mean_tenure = np.where(prior > 0, tenure - rng.integers(0, 6, n), np.nan)

    logit = (-0.8 - 0.05 * (tenure - 30) + 0.03 * (charges - 70) + 0.45 * (calls - 1.5)
             + np.array([_CONTRACT_EFFECT[c] for c in contract]))
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype("int64")

    # Missing values after the label is drawn: the label depends on the true value, the model sees a gap.
    tenure[rng.random(n) < 0.05] = np.nan
    charges[rng.random(n) < 0.03] = np.nan
    contract[rng.random(n) < 0.05] = None
    region[rng.random(n) < 0.03] = None
    if unseen_share:
        contract[rng.random(n) < unseen_share] = UNSEEN_CONTRACT

    return pd.DataFrame({
        "customer_id": [f"c{seed}-{i:05d}" for i in range(n)],
        "event_ts": pd.date_range(start, periods=n, freq="min", tz="UTC"),
        "churned": label,
        "tenure_months": tenure,
        "monthly_charges": charges,
        "support_calls": calls,
        "contract_type": pd.Series(contract, dtype=object),
        "region": pd.Series(region, dtype=object),
        "hist_prior_events": prior,
        "hist_days_since_prior": days_since,
        "hist_prior_mean_tenure_months": prior_mean_tenure,
    })


def write_split(directory: Path, frame: pd.DataFrame, spec: FeatureSpec, parts: int = 2) -> Path:
    """Parquet part files plus ``_SUCCESS`` and ``_feature_spec.json``, as the Spark transform writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(frame)), parts)):
        frame.iloc[chunk].to_parquet(directory / f"part-{i:05d}.snappy.parquet", index=False)
    (directory / "_SUCCESS").write_text("")
    spec.write(directory)
    return directory


def write_splits(root: Path, seed: int = 7, sizes: tuple[int, int, int] = (2400, 800, 800),
                 extra_numeric: dict[str, Any] | None = None) -> dict[str, Path]:
    """train/valid/test split dirs under ``root``; ``extra_numeric`` adds constant-seeded columns to all."""
    spec = feature_spec(list(extra_numeric or []))
    starts = ("2024-01-01", "2024-03-01", "2024-05-01")
    out = {}
    for k, (name, n, start) in enumerate(zip(("train", "valid", "test"), sizes, starts, strict=True)):
        frame = make_frame(n, seed + k, start, unseen_share=0.05 if name == "test" else 0.0)
        for col, value in (extra_numeric or {}).items():
            frame[col] = float(value)
        out[name] = write_split(root / name, frame, spec)
    return out


def settings_for(workdir: Path, **sections: dict[str, Any]) -> Settings:
    """Settings with the local state under ``workdir`` and the given section overrides."""
    data: dict[str, Any] = {"local": {"workdir": str(workdir)}, "model": {"threshold": 0.35}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Settings.model_validate(data)
