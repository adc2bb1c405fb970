"""A self-contained HTML report of one local run: steps and timings, data quality, metrics and curves, the gate
decision with its reasons, and lineage. Plots are inline SVG, so the file needs nothing else to render."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ctloop.html import CSS, table
from ctloop.html import escape as _e
from pipelines.local_run import RunRecord


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else _e(value)


def _curve_svg(xs: list[float], ys: list[float], title: str, xlabel: str, ylabel: str, diagonal: bool) -> str:
    size, pad = 260, 34
    pts = sorted(zip(xs, ys, strict=True))
    path = " ".join(f"{pad + x * size:.1f},{pad + (1 - y) * size:.1f}" for x, y in pts)
    diag = (f'<line x1="{pad}" y1="{pad + size}" x2="{pad + size}" y2="{pad}" stroke="#bbb" '
            'stroke-dasharray="4"/>' if diagonal else "")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 2 * pad}" height="{size + 2 * pad + 10}" '
        f'role="img" aria-label="{_e(title)}">'
        f'<text x="{pad}" y="18" font-size="13" font-weight="600">{_e(title)}</text>'
        f'<rect x="{pad}" y="{pad}" width="{size}" height="{size}" fill="none" stroke="#888"/>{diag}'
        f'<polyline points="{path}" fill="none" stroke="#0969da" stroke-width="2"/>'
        f'<text x="{pad + size / 2}" y="{pad + size + 24}" font-size="11" text-anchor="middle">{_e(xlabel)}</text>'
        f'<text x="10" y="{pad + size / 2}" font-size="11" transform="rotate(-90 10 {pad + size / 2})" '
        f'text-anchor="middle">{_e(ylabel)}</text></svg>'
    )


def _confusion_svg(matrix: list[list[float]], labels: list[str]) -> str:
    cell, pad = 80, 60
    peak = max((v for row in matrix for v in row), default=1) or 1
    cells = []
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            shade = int(240 - 160 * (v / peak))
            cells.append(
                f'<rect x="{pad + j * cell}" y="{pad + i * cell}" width="{cell}" height="{cell}" '
                f'fill="rgb({shade},{shade + 10 if shade < 245 else 250},255)" stroke="#fff"/>'
                f'<text x="{pad + j * cell + cell / 2}" y="{pad + i * cell + cell / 2 + 5}" font-size="14" '
                f'text-anchor="middle">{int(v)}</text>'
            )
    ticks = "".join(
        f'<text x="{pad + k * cell + cell / 2}" y="{pad - 8}" font-size="11" text-anchor="middle">pred {_e(lbl)}</text>'
        f'<text x="{pad - 8}" y="{pad + k * cell + cell / 2 + 4}" font-size="11" '
        f'text-anchor="end">true {_e(lbl)}</text>'
        for k, lbl in enumerate(labels)
    )
    n = len(matrix)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{pad + n * cell + 20}" height="{pad + n * cell + 20}" '
            f'role="img" aria-label="confusion matrix">'
            f'<text x="4" y="16" font-size="13" font-weight="600">Confusion matrix (test)</text>'
            f'{ticks}{"".join(cells)}</svg>')


def _plots(classification: dict[str, Any]) -> str:
    out = []
    conf = classification.get("confidenceMetrics") or []
    if conf:
        fpr = [float(c.get("falsePositiveRate", 0.0)) for c in conf]
        tpr = [float(c.get("recall", 0.0)) for c in conf]
        out.append(_curve_svg(fpr, tpr, "ROC curve (test)", "false positive rate", "true positive rate", True))
    pr = classification.get("prCurve") or {}
    if pr.get("recall") and pr.get("precision"):
        out.append(_curve_svg([float(x) for x in pr["recall"]], [float(y) for y in pr["precision"]],
                              "Precision-recall curve (test)", "recall", "precision", False))
    cm = classification.get("confusionMatrix") or {}
    if cm.get("rows"):
        labels = [s.get("displayName", str(i)) for i, s in enumerate(cm.get("annotationSpecs", []))]
        out.append(_confusion_svg([r["row"] for r in cm["rows"]], labels))
    return f'<div class="plots">{"".join(out)}</div>' if out else "<p>No curves were recorded.</p>"


def _reasons(reasons_json: str) -> str:
    try:
        reasons = json.loads(reasons_json) if reasons_json else []
    except json.JSONDecodeError:
        return f"<pre>{_e(reasons_json)}</pre>"
    rows = [[_e(r.get("check", "")), _num(r.get("value")), _e(r.get("comparator", "")), _num(r.get("threshold")),
             '<span class="ok">pass</span>' if r.get("passed") else '<span class="bad">fail</span>',
             _e(r.get("message", ""))] for r in reasons]
    return table(rows, ["check", "value", "comparator", "threshold", "result", "detail"])


_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*")


def _inline(text: str) -> str:
    """`code` and **bold**, everything else escaped."""
    out, last = [], 0
    for m in _INLINE.finditer(text):
        out.append(_e(text[last:m.start()]))
        out.append(f"<code>{_e(m.group(1))}</code>" if m.group(1) is not None else f"<b>{_e(m.group(2))}</b>")
        last = m.end()
    return "".join(out) + _e(text[last:])


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_html(text: str, heading_level: int = 3) -> str:
    """The Markdown the steps write (headings, paragraphs, pipe tables, `code`, **bold**) as HTML, headings
    starting at ``heading_level`` so they nest under the report's own sections."""
    parts: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: "):
            header, i = _cells(line), i + 2
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([_inline(c) for c in _cells(lines[i])])
                i += 1
            parts.append(table(rows, header))
            continue
        if m := re.match(r"^(#{1,6})\s+(.*)$", line):
            level = min(6, heading_level + len(m.group(1)) - 1)
            parts.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif line:
            parts.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "".join(parts)


def _markdown_file(uri: str) -> str:
    p = Path(uri)
    return markdown_html(p.read_text()) if uri and p.is_file() else ""


def render_run_report(record: RunRecord) -> str:
    """The whole report as one HTML string."""
    steps = [[_e(s.name), '<span class="ok">' + s.status + "</span>" if s.status == "SUCCEEDED"
              else '<span class="bad">' + s.status + "</span>", f"{s.seconds:.2f}s", _e(s.error)]
             for s in record.steps]
    decision = record.output("evaluate-gate", "decision", "")
    gate = record.step("evaluate-gate")
    metrics = record.artifact("evaluate-gate", "metrics").get("metadata", {})
    classification = record.artifact("evaluate-gate", "classification").get("metadata", {})
    extract_meta = record.artifact("extract", "dataset").get("metadata", {})
    model_meta = record.artifact("train", "model").get("metadata", {})
    dq = record.artifact("transform", "report")
    register, deploy = record.step("register"), record.step("deploy")
    rollout = {**register.outputs, **deploy.outputs} if register and deploy else {}
    parts = [
        f"<h1>ctloop run <code>{_e(record.run_id)}</code></h1>",
        f"<p>Status: <b>{_e(record.status)}</b> · started {_e(record.started_at)} · {record.seconds:.1f}s total · "
        f"gate decision: <b>{_e(decision or 'n/a')}</b></p>",
        f'<p class="bad">{_e(record.error)}</p>' if record.error else "",
        "<h2>Steps</h2>", table(steps, ["step", "status", "wall time", "reason"]),
        "<h2>Data quality</h2>", _markdown_file(dq.get("uri", "")) or "<p>No data-quality report.</p>",
        "<h2>Metrics (test split)</h2>",
        table([[_e(k), _num(v)] for k, v in sorted(metrics.items())], ["metric", "value"]) if metrics else "",
        _plots(classification),
        "<h2>Gate decision</h2>",
        _reasons(record.output("evaluate-gate", "reasons", "")) if gate else "<p>The gate did not run.</p>",
        "<h2>Deployment</h2>",
        table([[_e(k), _e(v)] for k, v in rollout.items()], ["field", "value"]) if rollout else
        "<p>Nothing was registered or deployed in this run.</p>",
        "<h2>Lineage</h2>",
        table([[_e(k), f"<code>{_e(v)}</code>"] for k, v in sorted({**extract_meta, **model_meta}.items())],
               ["field", "value"]),
        table([[_e(k), f"<code>{_e(v)}</code>"] for k, v in sorted(record.parameters.items())],
               ["parameter", "value"]),
    ]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ctloop run {_e(record.run_id)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def write_run_report(record: RunRecord, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_run_report(record))
    tmp.replace(path)
    return path
