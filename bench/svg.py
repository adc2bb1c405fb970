"""A minimal SVG line chart (matplotlib is not a dependency): series of (x, y) points, optional log x axis."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
Point = tuple[float, float]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def short_number(value: float) -> str:
    """1_000_000 -> '1M', 250_000 -> '250k', 0.5 -> '0.5'."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            text = f"{value / factor:.3g}"
            return text + suffix
    return f"{value:.3g}"


def line_chart(title: str, x_label: str, y_label: str, series: Mapping[str, Sequence[Point]], *,
               log_x: bool = False, x_ticks: Sequence[float] | None = None, width: int = 640,
               height: int = 400) -> str:
    """The SVG text of a chart with one polyline + markers per series and a legend."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError(f"chart {title!r}: no points to plot")
    if log_x and any(x <= 0 for x, _ in points):
        raise ValueError(f"chart {title!r}: a log x axis needs positive x values")
    left, right, top, bottom = 70, 20, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom

    def fx(x: float) -> float:
        return math.log10(x) if log_x else x

    xs = [fx(x) for x, _ in points]
    x_min, x_max = min(xs), max(xs)
    if x_max == x_min:
        x_min, x_max = x_min - 1, x_max + 1
    pad = (x_max - x_min) * 0.05
    x_min, x_max = x_min - pad, x_max + pad
    y_ticks = nice_ticks(0.0, max(y for _, y in points) or 1.0)
    y_min, y_max = y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return left + (fx(x) - x_min) / (x_max - x_min) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y_min) / (y_max - y_min) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.0f}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>']
    for t in y_ticks:
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e0e0e0"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(short_number(t))}</text>')
    ticks = sorted(set(x_ticks if x_ticks is not None else (x for x, _ in points)))
    for t in ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#f0f0f0"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                   f'{escape(short_number(t))}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 10}" text-anchor="middle">{escape(x_label)}'
               f'{" (log scale)" if log_x else ""}</text>')
    out.append(f'<text x="16" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + plot_h / 2:.0f})">{escape(y_label)}</text>')
    longest = max(len(name) for name in series)
    out.append(f'<rect x="{left + 4}" y="{top + 2}" width="{40 + 7 * longest}" height="{16 * len(series) + 4}" '
               f'fill="white" fill-opacity="0.85" stroke="#ccc"/>')
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        ordered = sorted(pts)
        if len(ordered) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ordered)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in ordered:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"/>')
        ly = top + 14 + i * 16
        out.append(f'<line x1="{left + 10}" y1="{ly - 4}" x2="{left + 28}" y2="{ly - 4}" stroke="{color}" '
                   f'stroke-width="2"/>')
        out.append(f'<text x="{left + 34}" y="{ly}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
