"""The smoke test a candidate passes on the staging endpoint before it may take production traffic.

``deploy.smoke_instances`` rows of the test split (features only) are sent as one request and then one by one;
every answer must hold one prediction per instance, label 0/1 and a finite probability in [0, 1], within
``deploy.smoke_max_latency_ms``.
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




def smoke_instances(settings: Settings, test_dir: str | Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of the test split as JSON-ready instances: model features only, NaN as null."""
    import pandas as pd

    from ctloop.features import SPEC_FILE, FeatureSpec

    test_dir = Path(test_dir)
    if (test_dir / SPEC_FILE).is_file():
        frame = pd.read_parquet(test_dir, columns=FeatureSpec.read(test_dir).model_features)
    else:
        frame = pd.read_parquet(test_dir)
        frame = frame.drop(columns=[c for c in settings.columns.role_columns if c in frame.columns])
    rows = frame.head(n).to_dict(orient="records")
    if not rows:
        raise ValueError(f"test split {test_dir} has no rows to smoke-test the deployed model with")
    return [{k: _json_value(v) for k, v in row.items()} for row in rows]


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


def run_smoke(predict: Predict, instances: list[dict[str, Any]], max_latency_ms: float) -> SmokeReport:
    """Send all instances in one request, then each alone (timed); collect every problem."""
    problems: list[str] = []
    latencies: list[float] = []
    try:
        problems += [f"batch of {len(instances)}: {p}" for p in check_predictions(predict(instances),
                                                                                   len(instances))]
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
    if latencies and max(latencies) > max_latency_ms:
        problems.append(f"latency: slowest single-instance request took {max(latencies):.0f} ms, the limit "
                        f"is {max_latency_ms:.0f} ms (deploy.smoke_max_latency_ms)")
    return SmokeReport(instances=len(instances), problems=problems[:20], latencies_ms=latencies)


def smoke_failed(where: str, report: SmokeReport) -> SmokeTestFailed:
    shown = "; ".join(report.problems[:5])
    more = f" (+{len(report.problems) - 5} more)" if len(report.problems) > 5 else ""
    return SmokeTestFailed(f"smoke test on {where} failed, candidate rolled back, production untouched: "
                           f"{shown}{more}")
