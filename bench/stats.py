"""Small, dependency-free statistics for timings: percentiles, summaries, ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's default).

    Raises ValueError on an empty sequence or ``q`` outside [0, 100].
    """
    if not values:
        raise ValueError("percentile: no values")
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile: q must be within [0, 100], found {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    frac = pos - low
    return ordered[low] + (ordered[high] - ordered[low]) * frac


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; None when either is missing or the baseline is zero (no meaningful ratio)."""
    if value is None or baseline is None or baseline == 0 or math.isnan(value) or math.isnan(baseline):
        return None
    return value / baseline


@dataclass(frozen=True)
class Summary:
    """Count, mean and the percentiles latency reports use, in the unit of the input."""

    n: int
    mean: float
    minimum: float
    p50: float
    p95: float
    p99: float
    maximum: float

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "mean": self.mean, "min": self.minimum, "p50": self.p50, "p95": self.p95,
                "p99": self.p99, "max": self.maximum}


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summarize: no values")
    return Summary(n=len(values), mean=sum(values) / len(values), minimum=min(values),
                   p50=percentile(values, 50), p95=percentile(values, 95), p99=percentile(values, 99),
                   maximum=max(values))


def growth_exponent(sizes: Sequence[float], costs: Sequence[float]) -> float | None:
    """Slope of log(cost) over log(size) by least squares: 1 = linear growth, 0 = flat.

    None with fewer than two distinct sizes or any non-positive value.
    """
    pairs = [(s, c) for s, c in zip(sizes, costs, strict=True) if s > 0 and c > 0]
    if len(pairs) != len(sizes) or len({s for s, _ in pairs}) < 2:
        return None
    xs = [math.log(s) for s, _ in pairs]
    ys = [math.log(c) for _, c in pairs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
