"""Batch scoring, the model side: score a frame of featured rows into output rows, and score histograms.

The Spark scoring job calls ``score_frame`` on each batch of rows (``mapInPandas``), so the probabilities are
the model's own ``predict_proba`` on exactly the columns training used; the same functions summarise the scores
for the run report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctloop.model_runtime import LoadedModel, load_model

PROBABILITY = "probability"
LABEL = "label"
MODEL_VERSION = "model_version"
RUN_ID = "run_id"
SCORED_AT = "scored_at"
HISTOGRAM_BINS = 10


@dataclass(frozen=True)
class OutputColumns:
    """The scored table: one row per entity."""

    id_column: str
    timestamp_column: str

    @property
    def names(self) -> list[str]:
        return [self.id_column, self.timestamp_column, PROBABILITY, LABEL, MODEL_VERSION, RUN_ID, SCORED_AT]


def load_scoring_model(model_dir: str | Path) -> LoadedModel:
    """The model the scores come from: the loader the gate and the server use, with scikit-learn as the runtime
    (the gate's own scores are scikit-learn's)."""
    return load_model(model_dir, runtime="sklearn")


def score_frame(model: LoadedModel, frame: pd.DataFrame, columns: OutputColumns, *, model_version: str,
                run_id: str, scored_at: pd.Timestamp) -> pd.DataFrame:
    """Output rows for ``frame``'s featured rows: probability, label at the model's threshold, provenance."""
    proba = model.predict_proba(frame) if len(frame) else np.empty(0)
    return pd.DataFrame({
        columns.id_column: frame[columns.id_column].astype(str).to_numpy(),
        columns.timestamp_column: frame[columns.timestamp_column].to_numpy(),
        PROBABILITY: proba.astype("float64"),
        LABEL: (proba >= model.threshold).astype("int32"),
        MODEL_VERSION: model_version,
        RUN_ID: run_id,
        SCORED_AT: scored_at,
    }, columns=columns.names)


def histogram(probabilities: np.ndarray, bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of ``probabilities`` in ``bins`` equal-width bins over [0, 1] (1.0 falls in the last bin)."""
    index = np.minimum((np.asarray(probabilities, dtype="float64") * bins).astype("int64"), bins - 1)
    return np.bincount(index, minlength=bins).tolist()


def shares(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]
