"""report_rejection: records why the gate rejected a candidate. The champion stays live; nothing is deployed."""

import json
from pathlib import Path

from kfp.dsl import Markdown, Output

# Under the executor (_KFP_RUNTIME=true) kfp.dsl leaves out dsl.component: import the decorator directly.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def report_rejection(config: dict, run_id: str, reasons: str, trigger_uri: str, report: Output[Markdown]):
    """Write the gate's failed checks as a Markdown report."""
    from components.report import write_rejection_report
    from ctloop.steps import run_step

    run_step(write_rejection_report, run_id=run_id, reasons_json=reasons, trigger_uri=trigger_uri,
             out_path=report.path)
    report.metadata["run_id"] = run_id
    report.metadata["decision"] = "fail"


def write_rejection_report(*, run_id: str, reasons_json: str, trigger_uri: str, out_path: str) -> str:
    """Render the gate reasons (a JSON list of checks) as Markdown; returns the text written."""
    reasons = json.loads(reasons_json) if reasons_json else []
    if not isinstance(reasons, list):
        raise ValueError(f"reasons: expected a JSON list of gate checks, found {type(reasons).__name__}")
    failed = [r for r in reasons if not r.get("passed", False)]
    lines = [
        f"# Candidate rejected (run `{run_id}`)",
        "",
        f"Trigger: `{trigger_uri or 'manual'}`. The champion keeps serving; no model was registered or deployed.",
        "",
        "| check | value | comparator | threshold | passed |",
        "|---|---|---|---|---|",
    ]
    for r in reasons:
        lines.append(
            f"| {r.get('check', '?')} | {_fmt(r.get('value'))} | {r.get('comparator', '')} "
            f"| {_fmt(r.get('threshold'))} | {'yes' if r.get('passed') else '**no**'} |"
        )
    lines += ["", f"{len(failed)} of {len(reasons)} checks failed."]
    text = "\n".join(lines) + "\n"
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
