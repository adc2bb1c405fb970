"""The transform's outputs as the step names them, and its data-quality report rendered as Markdown."""

from typing import Any

from ctloop.features import FeatureSpec

SPLITS = ("train", "valid", "test")
REPORT_JSON = "transform_report.json"
QUARANTINE_DIR = "quarantine"


def render_report(report: dict[str, Any], spec: FeatureSpec, run_id: str,
                  roles: list[tuple[str, str, str]] | None = None) -> str:
    """The data-quality report as Markdown; ``roles``: (column, role, origin) rows (ctloop.features)."""
    q = report["quarantined"]
    d = report["duplicates_dropped"]
    lines = [
        f"# Transform data quality (run `{run_id}`)",
        "",
        f"Input `{report['input']}`: **{report['input_rows']}** rows; **{report['output_rows']}** rows kept.",
        "",
        "| step | rows |",
        "|---|---|",
        f"| input | {report['input_rows']} |",
        f"| exact duplicates dropped | {d['exact']} |",
        f"| quarantined | {q['rows']} |",
        f"| same id + timestamp duplicates dropped | {d['same_id_timestamp']} |",
        f"| kept | {report['output_rows']} |",
        "",
        "## Quarantined rows by reason",
        "",
    ]
    if q["by_reason_column"]:
        lines += ["| reason | column | rows |", "|---|---|---|"]
        for key, n in q["by_reason_column"].items():
            reason, column = key.split(":", 1)
            lines.append(f"| {reason} | `{column}` | {n} |")
    else:
        lines.append("None.")
    lines += [
        "",
        "## Temporal split",
        "",
        f"Cut points: valid from `{report['cut_points']['valid_start']}`, test from "
        f"`{report['cut_points']['test_start']}` (a row exactly at a cut belongs to the later split).",
        "",
        "| split | rows | positive rate | first timestamp | last timestamp |",
        "|---|---|---|---|---|",
    ]
    for split in SPLITS:
        s = report["splits"][split]
        rate = "n/a" if s["positive_rate"] is None else f"{s['positive_rate']:.4f}"
        lines.append(f"| {split} | {s['rows']} | {rate} | {s['ts_min']} | {s['ts_max']} |")
    lines += ["", "## Null rate per feature", "", "| feature | kind | null rate |", "|---|---|---|"]
    kinds = {**{c: "numeric" for c in spec.numeric}, **{c: "categorical" for c in spec.categorical},
             **{c: "derived" for c in spec.derived}}
    for feature, rate in report["null_rate"].items():
        lines.append(f"| `{feature}` | {kinds.get(feature, '?')} | {rate:.4f} |")
    if roles:
        lines += ["", "## Columns and their roles", "", "| column | role | chosen by |", "|---|---|---|"]
        lines += [f"| `{column}` | {role} | {origin} |" for column, role, origin in roles]
    return "\n".join(lines) + "\n"
