"""What `ctloop run` says when a run cannot end with a served model, under the KFP local runner:

1. a batch whose label column arrived as strings fails at extract, once, and the reason is the last line of the
   terminal summary, in run.json and in the HTML report;
2. a first candidate the gate rejects leaves nothing to serve: the run says so, with the gate's reason, and exits
   with its own code instead of starting a server that has no model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ctloop.config import Settings, load_settings
from ctloop.registry import LocalRegistry
from devtools.sample_data import write_sample_data
from pipelines.local_run import RunRecord
from pipelines.main_job import EXIT_NOTHING_DEPLOYED, run_training_local

REPO = Path(__file__).resolve().parents[1]
REASON = "ctloop-dev.ctloop.events: column 'churned' has type STRING; expected INT64 or BOOL"

pytestmark = [pytest.mark.slow, pytest.mark.spark]


def _settings(workdir: Path, *overrides: str) -> Settings:
    s = load_settings(REPO / "ctloop.yaml", [f"local.workdir={workdir}", "local.spark_master=local[1]",
                                             "local.spark_shuffle_partitions=2", "model.params={max_iter: 40}",
                                             *overrides])
    write_sample_data(s.local.landing_dir, s, rows=4000, seed=5)
    return s


def test_a_failed_validation_says_why_everywhere_and_runs_once(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    for part in s.local.landing_dir.rglob("*.parquet"):  # the label arrives as "yes"/"no"
        table = pq.read_table(part)
        i = table.schema.get_field_index("churned")
        words = pc.if_else(pc.equal(table["churned"], 1), "yes", "no")
        pq.write_table(table.set_column(i, pa.field("churned", pa.string()), words), part)
    lines: list[str] = []
    code = run_training_local(s, run_id="run-strings", serve=True, echo=lines.append)

    assert code == 1
    assert lines[-1] == f"error: extract: {REASON}", lines
    assert not any("Traceback" in ln or "executor" in ln.lower() for ln in lines), lines
    run_dir = s.local.runs_dir / "run-strings"
    record = RunRecord.load(run_dir / "run.json")
    assert record.status == "FAILED" and record.error == f"extract: {REASON}"
    extract = record.step("extract")
    assert (extract.status, extract.error, extract.attempts) == ("FAILED", REASON, 1)
    log = (run_dir / "pipeline.log").read_text()
    assert sum("Executing task" in ln and "extract" in ln for ln in log.splitlines()) == 1  # not retried
    html = (run_dir / "report.html").read_text()
    assert REASON.replace("'", "&#x27;") in html
    assert LocalRegistry(s.local.registry_db).list_models() == []


def test_a_rejected_first_candidate_says_nothing_is_deployed_and_why(tmp_path: Path) -> None:
    s = _settings(tmp_path, "gate.min_roc_auc=0.999")
    lines: list[str] = []
    code = run_training_local(s, run_id="run-rejected-first", serve=True, echo=lines.append)

    assert code == EXIT_NOTHING_DEPLOYED and code not in (0, 1, 2)
    record = RunRecord.load(s.local.runs_dir / "run-rejected-first" / "run.json")
    assert record.status == "SUCCEEDED" and record.output("evaluate-gate", "decision") == "fail"
    reasons = [r["message"] for r in json.loads(record.output("evaluate-gate", "reasons")) if not r["passed"]]
    assert any("0.999" in r for r in reasons), reasons
    assert lines[-1].startswith("no model is deployed yet: the first candidate was rejected (")
    assert all(r in lines[-1] for r in reasons), lines[-1]
    assert not any("Traceback" in ln or "LookupError" in ln for ln in lines), lines
    # Without serving (as the trigger runs it) the run did all it was asked: same message, exit 0.
    quiet: list[str] = []
    assert run_training_local(s, run_id="run-rejected-again", serve=False, echo=quiet.append) == 0
    assert quiet[-1].startswith("no model is deployed yet: the first candidate was rejected (")
