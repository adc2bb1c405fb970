"""The scoring run's self-contained HTML report: row counts, the score distribution next to the model's own
test-split distribution, and where the scores went."""

from __future__ import annotations

from typing import Any

from ctloop.html import CSS, escape, table
from ctloop.scoring import HISTOGRAM_BINS, shares


def _bars_svg(run: list[float], reference: list[float] | None) -> str:
    """Side-by-side bars per probability bin: this run (blue) and the test split (grey)."""
    width, height, pad = 520, 200, 30
    peak = max([*run, *(reference or []), 1e-9])
    slot = (width - 2 * pad) / HISTOGRAM_BINS
    bars = []
    for i in range(HISTOGRAM_BINS):
        for j, (values, colour) in enumerate(((run, "#0969da"), (reference, "#8c959f"))):
            if not values:
                continue
            h = (height - 2 * pad) * values[i] / peak
            x = pad + i * slot + j * slot / 2 + 1
            bars.append(f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{slot / 2 - 2:.1f}" '
                        f'height="{h:.1f}" fill="{colour}"/>')
        bars.append(f'<text x="{pad + i * slot:.1f}" y="{height - 12}" font-size="10">{i / HISTOGRAM_BINS:.1f}'
                    f"</text>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="score distribution">{"".join(bars)}</svg>')


def render_scoring_report(run_id: str, meta: dict[str, Any]) -> str:
    """HTML for one scoring run from the ``scores`` artifact's metadata."""
    reference = meta.get("reference") or {}
    run_shares = shares(meta["histogram"])
    ref_shares = shares(reference["histogram"]) if reference.get("histogram") else None
    rows = [[f"{i / HISTOGRAM_BINS:.1f}-{(i + 1) / HISTOGRAM_BINS:.1f}", meta["histogram"][i],
             f"{run_shares[i]:.4f}", f"{ref_shares[i]:.4f}" if ref_shares else "n/a"]
            for i in range(HISTOGRAM_BINS)]
    if ref_shares:
        ref_note = (f"Reference: the model's scores on its test split <code>{escape(reference['uri'])}</code> "
                    f"({reference['rows']} rows, mean {reference['mean_probability']:.4f}).")
    elif reference.get("missing"):
        ref_note = f"Reference: the model's test split <code>{escape(reference['uri'])}</code> is gone."
    else:
        ref_note = "Reference: the model card names no training split."
    summary = table([
        ["input rows", meta["input_rows"]],
        ["scored entities", meta["scored_rows"]],
        ["labelled positive", meta["positives"]],
        ["mean probability", f"{meta['mean_probability']:.4f}"],
        ["model version", escape(meta["model_version"])],
        ["model", escape(meta["model_uri"])],
        ["destination", f"<code>{escape(meta['destination'])}</code>"],
    ], ["", ""])
    return "".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>ctloop scoring {escape(run_id)}</title>",
        f"<style>{CSS}</style></head><body><h1>Scoring run {escape(run_id)}</h1>", summary,
        "<h2>Score distribution</h2>", f"<p>{ref_note} Blue: this run; grey: test split.</p>",
        _bars_svg(run_shares, ref_shares),
        table(rows, ["probability", "entities", "share", "test-split share"]),
        "</body></html>",
    ])
