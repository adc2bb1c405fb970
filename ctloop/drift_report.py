"""The drift check's HTML report: the decision and its reasons, a table of every feature, and per-feature
histograms (reference vs recent) as inline SVG, so the file renders anywhere with nothing else."""

from __future__ import annotations

import html
import math
from typing import Any

from ctloop.drift import DriftReport, Histogram

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:1150px;color:#1f2328}
h1{font-size:1.45rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f6f8fa}.drift{color:#cf222e;font-weight:600}.warn{color:#9a6700;font-weight:600}
.ok{color:#1a7f37}.plots{display:flex;gap:1.2rem;flex-wrap:wrap}.plots figure{margin:0}
figcaption{font-size:.85rem;text-align:center}.legend span{display:inline-block;width:.8rem;height:.8rem;
margin:0 .3rem 0 1rem;vertical-align:middle}
"""
REFERENCE_COLOUR = "#8c959f"
RECENT_COLOUR = "#0969da"


def _e(value: Any) -> str:
    return html.escape(str(value))


def _n(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.2g}"


def histogram_svg(hist: Histogram, title: str, width: int = 330, height: int = 170) -> str:
    """Grouped bars per bin: reference (grey) and recent (blue) fractions; bin labels below, rotated."""
    pad_l, pad_b, pad_t = 34, 62, 18
    n = max(len(hist.labels), 1)
    plot_w, plot_h = width - pad_l - 6, height - pad_b - pad_t
    top = max([*hist.reference, *hist.recent, 1e-9])
    slot = plot_w / n
    bar = max(slot * 0.38, 1.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}">',
             f'<text x="{pad_l}" y="12" font-size="11">{_e(title)}</text>',
             f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" stroke="#999"/>',
             f'<text x="{pad_l - 4}" y="{pad_t + 4}" font-size="9" text-anchor="end">{top:.2f}</text>',
             f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" font-size="9" text-anchor="end">0</text>']
    for i, label in enumerate(hist.labels):
        x0 = pad_l + i * slot + slot * 0.1
        for j, (value, colour) in enumerate(((hist.reference[i], REFERENCE_COLOUR), (hist.recent[i], RECENT_COLOUR))):
            h = plot_h * value / top
            parts.append(f'<rect x="{x0 + j * bar:.1f}" y="{pad_t + plot_h - h:.1f}" width="{bar:.1f}" '
                         f'height="{h:.1f}" fill="{colour}"><title>{_e(label)}: {value:.3f}</title></rect>')
        lx, ly = pad_l + (i + 0.5) * slot, pad_t + plot_h + 8
        short = label if len(label) <= 16 else label[:15] + "…"
        parts.append(f'<text x="{lx:.1f}" y="{ly}" font-size="8" text-anchor="end" '
                     f'transform="rotate(-45 {lx:.1f} {ly})">{_e(short)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _status(status: str) -> str:
    return f'<span class="{status}">{_e(status)}</span>'


def render_html(report: DriftReport, context: dict[str, Any]) -> str:
    """``context``: what was compared (champion, reference and recent sources, window, run id), shown as is."""
    s = report.scores
    rows = []
    for f in sorted(report.features, key=lambda f: (-(f.psi if math.isfinite(f.psi) else -1.0), f.name)):
        rows.append(f"<tr><td>{_e(f.name)}</td><td>{f.kind}</td><td>{_n(f.psi)}</td><td>{f.test}</td>"
                    f"<td>{_n(f.statistic)}</td><td>{_p(f.p_value)}</td><td>{_n(f.missing_reference, 3)} → "
                    f"{_n(f.missing_recent, 3)}</td><td>{_status(f.status)}</td></tr>")
    table = ("<table><tr><th>feature</th><th>kind</th><th>PSI</th><th>test</th><th>statistic</th><th>p</th>"
             "<th>missing rate</th><th>status</th></tr>" + "".join(rows) + "</table>")
    reasons = "".join(f'<li class="{"drift" if r.drifted else "warn"}">{_e(r.message)}</li>'
                      for r in report.reasons[1:]) or "<li>No feature moved past the warning level.</li>"
    score_html = "<p>Not measured: " + _e("; ".join(report.notes) or "no scores") + "</p>"
    if s is not None:
        score_html = (
            f"<p>Score PSI {_n(s.psi)}, KS statistic {_n(s.ks_statistic)}, "
            f"p {_p(s.p_value)}; predicted positive rate at threshold {s.threshold}: "
            f"{_n(s.positive_rate_reference, 3)} → {_n(s.positive_rate_recent, 3)}. Status {_status(s.status)}.</p>"
            f'<div class="plots"><figure>{histogram_svg(s.histogram, "champion score")}</figure></div>')
    plots = "".join(f"<figure>{histogram_svg(f.histogram, f'{f.name} (PSI {_n(f.psi, 3)})')}"
                    f"<figcaption>{_status(f.status)}</figcaption></figure>" for f in report.features)
    ctx = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in context.items())
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.notes)
    headline = "DRIFT" if report.decision == "drift" else "no drift"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>ctloop drift check: {headline}</title>"
        f"<style>{_CSS}</style></head><body>"
        f'<h1>Drift check: <span class="{"drift" if report.decision == "drift" else "ok"}">{headline}</span></h1>'
        f"<p>{_e(report.reasons[0].message)}</p>"
        f"<p>{report.rows_reference} reference rows, {report.rows_recent} recent rows; {report.tests} tests, "
        f"each at the Bonferroni level alpha = {report.alpha:.3g}.</p>"
        f"<h2>Findings</h2><ul>{reasons}</ul>"
        + (f"<h2>Not compared</h2><ul>{notes}</ul>" if notes else "")
        + f"<h2>Features</h2>{table}"
        f"<h2>Prediction distribution</h2>{score_html}"
        f'<h2>Histograms</h2><p class="legend"><span style="background:{REFERENCE_COLOUR}"></span>reference'
        f'<span style="background:{RECENT_COLOUR}"></span>recent</p><div class="plots">{plots}</div>'
        f"<h2>Inputs</h2><table>{ctx}</table></body></html>\n"
    )
