"""The canary analysis's false-alarm and detection rates (docs/monitoring.md, "Canary analysis"), measured on
prediction-log windows built from real model scores: the champion and each candidate score the same pool of
rows, every request goes to the canary with the canary share (a random split, as the endpoint splits), and the
decision comes from ``ctloop.canary.judge`` with the default settings. ``pytest -s`` prints the table.

Latencies are drawn from one heavy-tailed distribution for both sides (both latency tests are rank tests, which
do not depend on the distribution's shape when nothing changed). Machine stalls add 100-300 ms to a share of the
requests of both sides at once, as a busy or paused host does.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from ctloop.canary import HOLD, PROMOTE, ROLLBACK, judge
from ctloop.config import CanarySettings
from ctloop.model_runtime import frame_columns, load_model
from ctloop.prediction_log import DEPLOYED_MODEL_ID, ERROR, LATENCY_MS, PROBABILITY, REQUEST_ID
from tests.canary_fixtures import ShiftedClassifier
from tests.serving_fixtures import FEATURES, fit_pipeline, make_model_dir, synthetic_frame, write_model_dir

RUNS = 60
REQUESTS = 3000  # logged requests in the window; the canary gets its share of them (10%: ~300)
BASE_ERROR_RATE = 0.001


@dataclass(frozen=True)
class Scenario:
    name: str
    canary_model: str
    share: float
    errors: float = BASE_ERROR_RATE
    latency_factor: float = 1.0
    slow_tail: float = 0.0  # share of the canary's requests 10x slower
    stalls: float = 0.0  # share of all requests caught in a machine stall
    expect: str = PROMOTE


SCENARIOS = [
    Scenario("same model (A/A), 10% share", "champion", 0.10),
    Scenario("same model (A/A), 50% share", "champion", 0.50),
    Scenario("retrained model (C=0.5), 10% share", "good", 0.10),
    Scenario("errors 0.1% -> 5%, 10% share", "champion", 0.10, errors=0.05, expect=ROLLBACK),
    Scenario("errors 0.1% -> 2%, 50% share", "champion", 0.50, errors=0.02, expect=ROLLBACK),
    Scenario("same model (A/A), 10% share, 3% stalled", "champion", 0.10, stalls=0.03),
    Scenario("latency x2, 10% share", "champion", 0.10, latency_factor=2.0, expect=ROLLBACK),
    Scenario("latency x2, 10% share, 3% stalled", "champion", 0.10, latency_factor=2.0, stalls=0.03,
             expect=ROLLBACK),
    Scenario("5% of requests x10, 10% share", "champion", 0.10, slow_tail=0.05, expect=ROLLBACK),
    Scenario("scores +0.2, 10% share", "shifted", 0.10, expect=HOLD),
    Scenario("scores +0.1, 10% share", "shifted_small", 0.10, expect=HOLD),
]


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    root, frame = tmp_path_factory.mktemp("rate-models"), synthetic_frame()
    dirs: dict[str, Path] = {
        "champion": make_model_dir(root / "champion", seed=0),
        "good": write_model_dir(root / "good", fit_pipeline(frame, LogisticRegression(
            C=0.5, class_weight="balanced", max_iter=1000, random_state=0))),
        "shifted": write_model_dir(root / "shifted", fit_pipeline(frame, ShiftedClassifier(0.2))),
        "shifted_small": write_model_dir(root / "shifted_small", fit_pipeline(frame, ShiftedClassifier(0.1))),
    }
    pool = synthetic_frame(n=20_000, seed=11)[FEATURES]
    out = {}
    for name, directory in dirs.items():
        model = load_model(directory, runtime="sklearn")
        out[name] = np.asarray(model.probabilities(frame_columns(model.card, pool)), dtype=float)
    return out


def _window(sc: Scenario, scores: dict[str, np.ndarray], rng: np.random.Generator) -> pd.DataFrame:
    rows = rng.integers(0, len(scores["champion"]), REQUESTS)
    canary = rng.random(REQUESTS) < sc.share
    prob = np.where(canary, scores[sc.canary_model][rows], scores["champion"][rows])
    failed = rng.random(REQUESTS) < np.where(canary, sc.errors, BASE_ERROR_RATE)
    slow = np.where(canary & (rng.random(REQUESTS) < sc.slow_tail), 10.0, 1.0)
    latency = rng.lognormal(np.log(4.0), 0.5, REQUESTS) * np.where(canary, sc.latency_factor, 1.0) * slow
    latency += (rng.random(REQUESTS) < sc.stalls) * rng.uniform(100.0, 300.0, REQUESTS)
    return pd.DataFrame({DEPLOYED_MODEL_ID: np.where(canary, "canary", "champion"),
                         REQUEST_ID: [f"r{i}" for i in range(REQUESTS)], ERROR: failed.astype(int),
                         LATENCY_MS: latency, PROBABILITY: np.where(failed, np.nan, prob)})


def test_false_alarm_and_detection_rates(scores: dict[str, np.ndarray]) -> None:
    settings = CanarySettings()
    table, fired = {}, {}
    for i, sc in enumerate(SCENARIOS):
        rng = np.random.default_rng(1000 + i)
        verdicts = [judge(_window(sc, scores, rng), "champion", "canary", settings) for _ in range(RUNS)]
        decisions = [v.decision for v in verdicts]
        table[sc.name] = {d: decisions.count(d) for d in (PROMOTE, HOLD, ROLLBACK)}
        names = [c.name for v in verdicts for c in v.checks if c.failed]
        fired[sc.name] = {n: names.count(n) for n in sorted(set(names))}
    print(f"\ncanary analysis, {RUNS} windows of {REQUESTS} logged requests each (default settings):")
    for sc in SCENARIOS:
        print(f"  {sc.name:40s} expected {sc.expect:8s} {table[sc.name]} checks failed: {fired[sc.name]}")
    for sc in SCENARIOS:
        right = table[sc.name][sc.expect]
        if sc.expect == PROMOTE:
            assert right >= RUNS - 2, (sc.name, table[sc.name])  # at most 2 false alarms in 60
        else:
            assert right >= RUNS * 0.9, (sc.name, table[sc.name])  # at least 90% detected
