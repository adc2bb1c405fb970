"""The smoke test a candidate passes on the staging endpoint before it may take production traffic.

``deploy.smoke_instances`` rows of the test split are sent as one request and then one by one; every answer
must hold one prediction per instance, label 0/1 and a finite probability in [0, 1], within
``deploy.smoke_max_latency_ms``. For a model with history features the rows are entities' latest events, sent
as a client sends them (entity id, event time, source features; no history): the server derives the history
from the online store, and each served probability must equal offline scoring of the same row with the
features the transform job computed (``SMOKE_TOLERANCE``), which checks the online features end to end.
"""

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctloop.config import Settings
from ctloop.errors import CtloopError
from ctloop.registry.base import Predict

# Served vs offline probability: the same model and runtime on the same features agree to rounding.
SMOKE_TOLERANCE = 1e-6


class SmokeRows(list):
    """The smoke test's JSON instances; ``offline`` holds the same rows with every model feature as the
    transform wrote them, and ``expected`` the model's offline probabilities for them once computed
    (``expect_offline_scores``)."""

    offline: Any = None
    expected: list[float] | None = None
    offline_error: str | None = None  # offline scoring failed: a smoke-test finding, reported by run_smoke


class SmokeTestFailed(CtloopError):
    """The candidate answered the smoke test wrongly, too slowly or not at all; it was rolled back."""


@dataclass(frozen=True)
class SmokeReport:
    instances: int
    problems: list[str]
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def max_latency_ms(self) -> float:
        return max(self.latencies_ms, default=0.0)

    @property
    def median_latency_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else 0.0




def smoke_instances(settings: Settings, test_dir: str | Path, n: int) -> SmokeRows:
    """``n`` rows of the test split as JSON-ready instances (NaN as null).

    With history features: each of the first ``n`` entities' latest event (the online store's latest state of
    the entity ends there, so replaying it derives the job's values), as the entity id, the event time and
    the source features. Without: the first rows' model features.
    """
    import pandas as pd

    from ctloop.features import SPEC_FILE, FeatureSpec

    test_dir = Path(test_dir)
    if not (test_dir / SPEC_FILE).is_file():
        frame = pd.read_parquet(test_dir)
        frame = frame.drop(columns=[c for c in settings.columns.role_columns if c in frame.columns])
        rows = SmokeRows(json_records(frame.head(n)))
        if not rows:
            raise ValueError(f"test split {test_dir} has no rows to smoke-test the deployed model with")
        return rows
    spec = FeatureSpec.read(test_dir)
    if not spec.derived:
        offline = pd.read_parquet(test_dir, columns=spec.model_features).head(n)
        rows = SmokeRows(json_records(offline))
    else:
        frame = pd.read_parquet(test_dir, columns=[spec.id_column, spec.timestamp_column, *spec.model_features])
        latest = (frame.sort_values([spec.id_column, spec.timestamp_column], kind="stable")
                  .groupby(spec.id_column, sort=True).tail(1).head(n))
        raw = latest[[spec.id_column, *spec.numeric, *spec.categorical]].assign(**{
            spec.timestamp_column: pd.to_datetime(latest[spec.timestamp_column], utc=True).map(
                lambda t: t.isoformat().replace("+00:00", "Z"))})
        offline = latest[spec.model_features]
        rows = SmokeRows(json_records(raw))
    if not rows:
        raise ValueError(f"test split {test_dir} has no rows to smoke-test the deployed model with")
    rows.offline = offline.reset_index(drop=True)
    return rows


def expect_offline_scores(rows: SmokeRows, model_dir: str | Path) -> None:
    """Score ``rows.offline`` with the model as served (ctloop.model_runtime) into ``rows.expected``; a model
    that cannot be loaded or cannot score leaves ``rows.offline_error`` instead."""
    from ctloop.model_runtime import load_model

    if rows.offline is None:
        return
    try:
        model = load_model(model_dir)
        rows.expected = [float(p) for p in model.probabilities(
            {c: rows.offline[c].tolist() for c in rows.offline.columns})]
    except Exception as exc:  # noqa: BLE001 - any failure is a smoke-test finding
        rows.offline_error = f"offline scoring of the smoke rows failed: {type(exc).__name__}: {exc}"


def json_records(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame's rows as JSON-ready dicts (NaN and NA as None, numpy scalars as Python ones)."""
    return [{k: _json_value(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def _json_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def check_predictions(predictions: Any, expected: int) -> list[str]:
    """What is wrong with a server's ``predictions`` for ``expected`` instances (empty when all is well)."""
    if not isinstance(predictions, list):
        return [f"predictions: expected a list, found {type(predictions).__name__}"]
    problems = []
    if len(predictions) != expected:
        problems.append(f"predictions: expected {expected}, found {len(predictions)}")
    for i, p in enumerate(predictions):
        label = p.get("label") if isinstance(p, dict) else None
        prob = p.get("probability") if isinstance(p, dict) else None
        if isinstance(label, bool) or label not in (0, 1):
            problems.append(f"predictions[{i}].label: expected 0 or 1, found {label!r}")
        if isinstance(prob, bool) or not isinstance(prob, int | float) or not (math.isfinite(prob)
                                                                                 and 0 <= prob <= 1):
            problems.append(f"predictions[{i}].probability: expected a number in [0, 1], found {prob!r}")
    return problems


def check_against_offline(predictions: Any, expected: list[float] | None, first: int = 0) -> list[str]:
    """Served probabilities that differ from the offline ones (``expected[first:]``) by more than the tolerance."""
    if expected is None or not isinstance(predictions, list):
        return []
    problems = []
    for i, (p, want) in enumerate(zip(predictions, expected[first:], strict=False)):
        got = p.get("probability") if isinstance(p, dict) else None
        if isinstance(got, int | float) and abs(got - want) > SMOKE_TOLERANCE:
            problems.append(f"predictions[{first + i}].probability: served {got}, offline scoring of the same "
                            f"row gives {want}")
    return problems


def run_smoke(predict: Predict, instances: list[dict[str, Any]], max_latency_ms: float) -> SmokeReport:
    """Send all instances in one request, then each alone (timed); collect every problem. ``SmokeRows`` with
    ``expected`` probabilities are also checked against them."""
    problems: list[str] = []
    latencies: list[float] = []
    expected = getattr(instances, "expected", None)
    try:
        answer = predict(instances)
        problems += [f"batch of {len(instances)}: {p}" for p in check_predictions(answer, len(instances))]
        problems += [f"batch of {len(instances)}: {p}" for p in check_against_offline(answer, expected)]
    except Exception as exc:  # noqa: BLE001 - any failure is a smoke-test finding
        problems.append(f"batch of {len(instances)}: {type(exc).__name__}: {exc}")
    for i, inst in enumerate(instances):
        start = time.perf_counter()
        try:
            answer = predict([inst])
        except Exception as exc:  # noqa: BLE001
            problems.append(f"instance {i}: {type(exc).__name__}: {exc}")
            continue
        latencies.append((time.perf_counter() - start) * 1000)
        problems += [f"instance {i}: {p}" for p in check_predictions(answer, 1)]
        problems += [f"instance {i}: {p}" for p in check_against_offline(answer, expected, i)]
    if latencies and max(latencies) > max_latency_ms:
        problems.append(f"latency: slowest single-instance request took {max(latencies):.0f} ms, the limit "
                        f"is {max_latency_ms:.0f} ms (deploy.smoke_max_latency_ms)")
    offline_error = getattr(instances, "offline_error", None)
    if offline_error:
        problems.append(offline_error)
    return SmokeReport(instances=len(instances), problems=problems[:20], latencies_ms=latencies)


def smoke_failed(where: str, report: SmokeReport) -> SmokeTestFailed:
    shown = "; ".join(report.problems[:5])
    more = f" (+{len(report.problems) - 5} more)" if len(report.problems) > 5 else ""
    return SmokeTestFailed(f"smoke test on {where} failed, candidate rolled back, production untouched: "
                           f"{shown}{more}")
