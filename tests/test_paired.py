"""ctloop.paired: DeLong against a brute-force implementation and the bootstrap, and the non-inferiority rule's
error rates in a seeded simulation of a 15,000-row test split (the figures docs/monitoring.md quotes)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ctloop.config import GateSettings
from ctloop.paired import bootstrap, delong, paired_difference


def _brute_force_delong_se(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """DeLong (1988) written out: placement values from every positive/negative pair."""
    def placements(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos, neg = p[y == 1], p[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)

    (v10a, v01a), (v10b, v01b) = placements(a), placements(b)
    s10, s01 = np.cov(v10a - v10b), np.cov(v01a - v01b)
    return float(np.sqrt(s10 / len(v10a) + s01 / len(v01a)))


def test_delong_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    a = np.round(y * 0.4 + rng.random(80), 1)  # rounded: many ties
    b = np.round(y * 0.2 + rng.random(80), 1)
    d = delong(y, a, b, 0.05)
    assert d.candidate == pytest.approx(roc_auc_score(y, a)) and d.champion == pytest.approx(roc_auc_score(y, b))
    assert d.standard_error == pytest.approx(_brute_force_delong_se(y, a, b), rel=1e-9)
    assert d.lower == pytest.approx(d.difference - 1.6448536269514722 * d.standard_error)
    assert d.upper == pytest.approx(d.difference + 1.6448536269514722 * d.standard_error)


def _scores(n: int, noise_candidate: float, noise_champion: float, seed: int):
    """Labels from a latent risk u (base rate 0.18); each model sees u through its own noise."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(-1.989 + 1.34 * u)))).astype(int)
    return y, u + noise_candidate * rng.standard_normal(n), u + noise_champion * rng.standard_normal(n)


def test_bootstrap_agrees_with_delong_and_handles_other_metrics() -> None:
    y, a, b = _scores(4000, 0.5, 0.7, 1)
    d = delong(y, a, b, 0.05)
    boot = bootstrap(y, a, b, "roc_auc", 0.05, samples=300, seed=0)
    assert boot.difference == pytest.approx(d.difference)
    assert boot.standard_error == pytest.approx(d.standard_error, rel=0.2)
    pr = paired_difference(y, a, b, "pr_auc", 0.05, samples=200)
    assert pr.method == "bootstrap" and pr.lower < pr.difference < pr.upper
    f1 = paired_difference(y, a, b, "f1", 0.05, samples=200, thresholds=(0.5, 0.5))
    assert f1.metric == "f1" and f1.lower < f1.upper
    with pytest.raises(ValueError, match="same rows"):
        paired_difference(y, a[:-1], b, "roc_auc", 0.05)


# Noise 0.5: population ROC AUC 0.768; noise 0.678: 0.748, i.e. 0.02 worse (both measured on 10^6 rows).
EQUAL_NOISE, WORSE_NOISE, TEST_ROWS, RUNS = 0.5, 0.678, 15_000, 20


def test_non_inferiority_error_rates_with_the_default_margin_and_level() -> None:
    gate = GateSettings()
    outcomes = {}
    for name, noise in (("equivalent", EQUAL_NOISE), ("worse by 0.02", WORSE_NOISE)):
        rejected, ses = 0, []
        for seed in range(RUNS):
            y, candidate, champion = _scores(TEST_ROWS, noise, EQUAL_NOISE, seed)
            d = paired_difference(y, candidate, champion, "roc_auc", gate.alpha)
            rejected += d.lower < -gate.margin
            ses.append(d.standard_error)
        outcomes[name] = rejected
        print(f"\n{name}: rejected {rejected}/{RUNS} (margin {gate.margin}, alpha {gate.alpha}, "
              f"mean standard error {np.mean(ses):.4f})")
    assert outcomes["equivalent"] <= 2
    assert outcomes["worse by 0.02"] >= 18
