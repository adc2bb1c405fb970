"""The benchmark harness's pure pieces on tiny inputs: statistics, the /proc RSS sampler, report and chart
rendering, the pandas baseline of the transform, the load generator and the command line. No timing asserts."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import rss
from bench.__main__ import RESULTS_DIR, parse_args
from bench.loadgen import check_loopback, closed_loop
from bench.machine import describe, loadavg
from bench.pandas_transform import compare_splits, transform
from bench.report import Figure, Section, Table, fmt_number, markdown_report, markdown_table, write_results
from bench.stats import growth_exponent, percentile, ratio, summarize
from bench.svg import line_chart, nice_ticks, short_number
from ctloop.features import FeatureSpec

MB = 2**20


# ---- statistics ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy_linear_interpolation(q: float) -> None:
    values = list(np.random.default_rng(3).exponential(10.0, size=101))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_small_inputs_and_errors() -> None:
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0  # unsorted input
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"within \[0, 100\], found 101"):
        percentile([1.0], 101)


def test_ratio_and_summary() -> None:
    assert ratio(30.0, 10.0) == 3.0
    assert ratio(1.0, 0.0) is None and ratio(None, 2.0) is None and ratio(2.0, float("nan")) is None
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s.n, s.mean, s.minimum, s.maximum, s.p50) == (4, 2.5, 1.0, 4.0, 2.5)


def test_growth_exponent() -> None:
    sizes = [1e5, 1e6, 5e6]
    assert growth_exponent(sizes, [2 * n for n in sizes]) == pytest.approx(1.0)
    assert growth_exponent(sizes, [7.0, 7.0, 7.0]) == pytest.approx(0.0)
    assert growth_exponent(sizes, [n**0.5 for n in sizes]) == pytest.approx(0.5)
    assert growth_exponent([1e5], [3.0]) is None
    assert growth_exponent(sizes, [1.0, 0.0, 2.0]) is None


# ---- /proc sampler --------------------------------------------------------------------------------------------

# A parent that starts a child which holds ``MB`` megabytes resident, then both wait for stdin to close.
_ALLOCATOR = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import sys; b = b'x' * ({mb} << 20); print('ready', flush=True); "
                          "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
child.stdout.readline()
print('ready', flush=True)
sys.stdin.read()
child.stdin.close()
child.wait()
"""


@pytest.fixture
def allocating_tree() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", _ALLOCATOR.format(mb=200)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def test_tree_rss_counts_a_grandchild_that_allocates(allocating_tree: subprocess.Popen[bytes]) -> None:
    tree = rss.process_tree(allocating_tree.pid)
    assert tree[0] == allocating_tree.pid and len(tree) == 2
    own = rss.rss_bytes(allocating_tree.pid)
    child = rss.rss_bytes(tree[1])
    assert child > 200 * MB > own  # the 200 MB live in the grandchild, not in the process we started
    with rss.TreeSampler(allocating_tree.pid, interval=0.01) as sampler:
        sampler.sample()
    assert sampler.peak_bytes >= own + 200 * MB
    assert sampler.max_processes == 2 and sampler.samples >= 2
    assert sampler.cpu_seconds >= 0.0


_FORKER = """
import os, sys
b = b'x' * (200 << 20)
if os.fork() == 0:  # a child that never execs: the same pages as its parent, copy-on-write
    sys.stdin.read()
    os._exit(0)
print('ready', flush=True)
sys.stdin.read()
os.wait()
"""


def test_a_child_not_yet_past_exec_counts_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        tree = rss.process_tree(proc.pid)
        assert len(tree) == 2 and rss.address_space(tree[0]) == rss.address_space(tree[1])
        naive = sum(rss.rss_bytes(p) for p in tree)
        assert naive > 400 * MB  # each process reports the 200 MB
        sampler = rss.TreeSampler(proc.pid)
        sampler.sample()
        assert 200 * MB < sampler.peak_bytes < 300 * MB
        assert 200 * MB < rss.tree_rss_bytes(proc.pid) < 300 * MB
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def test_tree_walk_falls_back_to_parent_scan(allocating_tree: subprocess.Popen[bytes],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    expected = rss.process_tree(allocating_tree.pid)
    monkeypatch.setattr(rss, "_children_file", lambda pid: None)  # a kernel without task/*/children
    assert rss.process_tree(allocating_tree.pid) == expected


def test_gone_process_reads_as_zero() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert rss.rss_bytes(proc.pid) == 0 and rss.cpu_seconds(proc.pid) is None


def test_run_sampled_reports_exit_code_and_peak(tmp_path: Path) -> None:
    code = "import sys; b = b'x' * (120 << 20); import time; time.sleep(0.3); sys.exit(3)"
    done = rss.run_sampled([sys.executable, "-c", code], tmp_path / "log.txt", interval=0.02)
    assert done.returncode == 3
    assert done.peak_rss_bytes > 120 * MB
    assert done.samples >= 2 and done.log_path.is_file()


# ---- reporting ------------------------------------------------------------------------------------------------

def test_figure_ratio_and_targets() -> None:
    f = Figure("loop total", 50.0, "s", "floor", 25.0, target=("<", 60.0))
    assert f.ratio == 2.0 and f.met is True
    assert Figure("x", 70.0, "s", target=("<", 60.0)).met is False
    assert Figure("overhead", 3.0, "s", "total", 10.0, target=("<", 0.15), target_on_ratio=True).met is False
    assert Figure("n/a", None, "s", target=("<", 1.0)).met is None
    with pytest.raises(ValueError, match="target operator"):
        Figure("bad", 1.0, "s", target=("~", 1.0))


def test_number_formatting() -> None:
    assert fmt_number(None) == "n/a"
    assert fmt_number(12345) == "12,345"
    assert fmt_number(0.012345) == "0.0123"
    assert fmt_number(3.14159) == "3.14"
    assert short_number(5_000_000) == "5M" and short_number(250_000) == "250k"


def test_markdown_escapes_cells_and_report_lists_machine(tmp_path: Path) -> None:
    assert "a\\|b" in markdown_table(["h"], [["a|b"]])
    section = Section("demo", "Demo suite", figures=[Figure("t", 2.0, "s", "b", 1.0)],
                      tables=[Table("T", ["x"], [[1]])], notes=["a note"],
                      plots={"demo.svg": line_chart("c", "x", "y", {"s": [(1.0, 2.0), (2.0, 3.0)]})})
    machine = describe()
    assert machine["nproc"] >= 1 and machine["python"]
    text = markdown_report([section], machine, {"load_before": loadavg(), "load_after": loadavg()})
    assert "| demo | t | 2.00 s | b | 1.00 s | 2.00× |  |" in text
    assert "nproc" in text and "![demo.svg](demo.svg)" in text and "- a note" in text
    paths = write_results(tmp_path / "out", [section], machine, {})
    assert sorted(p.name for p in paths) == ["demo.svg", "results.json", "results.md"]
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["sections"][0]["figures"][0]["ratio"] == 2.0
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_line_chart_is_valid_svg() -> None:
    svg = line_chart("t", "rows", "MB", {"a": [(1e5, 1.0), (1e6, 3.0)], "b": [(1e5, 2.0)]}, log_x=True)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polyline")) == 1 and len(root.findall(f"{ns}circle")) == 3
    with pytest.raises(ValueError, match="positive x"):
        line_chart("t", "x", "y", {"a": [(0.0, 1.0)]}, log_x=True)
    assert nice_ticks(0, 87) == [0, 20, 40, 60, 80, 100]


# ---- pandas baseline of the transform ----------------------------------------------------------------------------

def _ts(day: int) -> datetime:
    return datetime(2025, 1, 1, tzinfo=UTC) + timedelta(days=day)


SPEC = FeatureSpec(id_column="id", timestamp_column="ts", label_column="y", numeric=["x"], categorical=["c"],
                   history_means=["x"])


def _tiny_input(folder: Path) -> Path:
    rows = [
        ("A", _ts(1), 0, 1.0, "a"),
        ("A", _ts(2), 1, 9.0, "c"),   # same id + timestamp as the next row: the lower x (3.0) is kept
        ("A", _ts(2), 1, 3.0, "b"),
        ("A", _ts(3), 0, None, "a"),
        ("A", _ts(4), 1, 5.0, "b"),
        ("B", _ts(1), 1, 2.0, "a"),
        ("B", _ts(1), 1, 2.0, "a"),   # exact duplicate
        ("B", _ts(2), 2, 1.0, "a"),   # invalid label
        (None, _ts(1), 0, 1.0, "a"),  # null id
        ("C", _ts(5), 0, -1.0, "a"),  # negative value
        ("C", None, 0, 1.0, "a"),     # null timestamp
    ]
    folder.mkdir(parents=True)
    frame = pd.DataFrame(rows, columns=["id", "ts", "y", "x", "c"])
    frame.to_parquet(folder / "part-00000.parquet")
    return folder


def test_pandas_transform_quarantines_dedups_and_adds_point_in_time_history(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Fractions exact in binary: 1 - 0.25 - 0.25 is exactly 0.5, so the cut ranks below are exact too.
    report = transform(_tiny_input(tmp_path / "in"), out, SPEC, valid_fraction=0.25, test_fraction=0.25)
    assert report["input_rows"] == 11
    assert report["duplicates_dropped"] == {"exact": 1, "same_id_timestamp": 1}
    assert report["quarantined"] == {"rows": 4, "by_reason": {"invalid_label": 1, "negative_value": 1,
                                                              "null_id": 1, "null_timestamp": 1}}
    # 5 clean rows; timestamps d1, d1, d2, d3, d4: the 50% and 75% quantiles are d2 and d3.
    assert {s: report["splits"][s]["rows"] for s in ("train", "valid", "test")} == {"train": 2, "valid": 1,
                                                                                   "test": 2}
    rows = pd.concat([pd.read_parquet(out / s) for s in ("train", "valid", "test")]).sort_values(["id", "ts"])
    a = rows[rows["id"] == "A"]
    assert a["x"].tolist()[:2] == [1.0, 3.0]
    assert a["hist_prior_events"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert a["hist_days_since_prior"].tolist()[1:] == [1.0, 1.0, 1.0]
    assert np.isnan(a["hist_days_since_prior"].iloc[0])
    means = a["hist_prior_mean_x"].tolist()
    assert np.isnan(means[0]) and means[1:] == [1.0, 2.0, 2.0]  # the null x at d3 does not count
    quarantine = pd.read_parquet(out / "quarantine")
    assert sorted(zip(quarantine["_reason"], quarantine["_reason_column"], strict=True)) == [
        ("invalid_label", "y"), ("negative_value", "x"), ("null_id", "id"), ("null_timestamp", "ts")]
    assert FeatureSpec.read(out / "train") == SPEC
    same = compare_splits(out, out, SPEC)
    assert same["features_agree"] and same["only_spark"] == same["only_pandas"] == same["split_disagreements"] == 0


def test_pandas_transform_names_missing_columns(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    pd.DataFrame({"id": ["A"], "ts": [_ts(1)]}).to_parquet(folder / "part-0.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['y', 'x', 'c'\]"):
        transform(folder, tmp_path / "out", SPEC, 0.2, 0.2)


# ---- load generator and command line ----------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 500 if body == b"fail" else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_closed_loop_counts_requests_and_errors() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        result = closed_loop(url, [b"a", b"fail"], concurrency=1, max_requests=10, max_seconds=30)
        assert (result.requests, result.errors) == (5, 5)  # round robin: every second body fails
        assert result.first_error.startswith("HTTP 500")
        assert len(result.latencies_ms) == 5 and result.rate > 0
        many = closed_loop(url, [b"a"], concurrency=3, max_requests=12, max_seconds=30)
        assert (many.requests, many.errors) == (12, 0)
    finally:
        server.shutdown()
        server.server_close()


def test_load_generator_refuses_other_hosts() -> None:
    check_loopback("http://127.0.0.1:8080/predict")
    with pytest.raises(ValueError, match="only loopback"):
        check_loopback("http://example.com/predict")


def test_command_line_options(tmp_path: Path) -> None:
    full = parse_args(["--workdir", str(tmp_path)])
    assert full.out == RESULTS_DIR and full.suites == ["loop", "scaling", "trigger", "serving", "compile", "scoring"]
    partial = parse_args(["--only", "serving,compile", "--only", "loop", "--workdir", str(tmp_path)])
    assert partial.suites == ["loop", "serving", "compile"] and partial.out == tmp_path / "results"
    assert parse_args(["--quick", "--workdir", str(tmp_path)]).out == tmp_path / "results"
    with pytest.raises(SystemExit):
        parse_args(["--only", "nope"])


def test_memory_guard_extrapolates_and_skips_what_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import scaling

    assert scaling.estimated_peak_bytes([1, 10], [100, 1000], 100) == pytest.approx(10_000)  # linear
    assert scaling.estimated_peak_bytes([1, 10], [500, 500], 1000) == pytest.approx(500)  # flat
    assert scaling.estimated_peak_bytes([10], [100], 100) is None
    results = {10**6: {"pandas-transform": {"peak_rss_bytes": 1 * 2**30}},
               5 * 10**6: {"pandas-transform": {"peak_rss_bytes": 5 * 2**30}, "train": {"error": "failed"}}}
    monkeypatch.setattr(scaling, "meminfo_bytes", lambda key: 16 * 2**30)
    reason = scaling.memory_guard("pandas-transform", 20 * 10**6, results)
    assert reason.startswith("needs about 20.0 GiB") and "16.0 GiB available" in reason
    assert scaling.memory_guard("pandas-transform", 6 * 10**6, results) == ""  # ~6 GiB fits in half of 16
    assert scaling.memory_guard("train", 20 * 10**6, results) == ""  # nothing measured to extrapolate from


def test_step_phases_split_a_runner_log(tmp_path: Path) -> None:
    from bench.loop import step_phases

    log = tmp_path / "pipeline.log"
    log.write_text(
        "\x1b[1m10:00:00.000 - INFO - Executing task \x1b[96m'train'\x1b[0m\n"
        "    [KFP Executor 2026-01-01 10:00:00,050 INFO]: Looking for component `train` in ...\n"
        "    [KFP Executor 2026-01-01 10:00:02,550 INFO]: Wrote executor output file to /x.json.\n"
        "10:00:03.000 - INFO - Task 'train' finished with status SUCCESS\n"
        "23:59:59.900 - INFO - Executing task 'deploy'\n"
        "    [KFP Executor 2026-01-01 23:59:59,950 INFO]: Looking for component `deploy` in ...\n"
        "    [KFP Executor 2026-01-02 00:00:00,950 INFO]: Wrote executor output file to /y.json.\n"
        "00:00:01.000 - INFO - Task 'deploy' finished with status SUCCESS\n"
        "00:00:01.100 - INFO - Executing task 'register'\n")  # never finished: left out
    phases = step_phases(log)
    assert set(phases) == {"train", "deploy"}
    assert phases["train"] == pytest.approx({"executor_start": 0.05, "body": 2.5, "exit": 0.45})
    assert phases["deploy"] == pytest.approx({"executor_start": 0.05, "body": 1.0, "exit": 0.05})


def test_the_contention_section_reports_the_shipped_ratio_against_its_target() -> None:
    from bench import contention

    results = {"alone": {"seconds": 4.0, "cpu": 7.0, "wall": 5.0},
               contention.SHIPPED: {"seconds": 5.0, "cpu": 7.5, "wall": 6.0},
               "competing, OMP_NUM_THREADS=1": {"seconds": 6.0, "cpu": 6.0, "wall": 7.0}}
    assert contention.contention_ratio(results) == 1.25
    section = Section("loop", "Loop")
    contention.add_to(section, results)
    shipped, one_thread = section.figures
    assert shipped.name == f"train, {contention.SHIPPED} (contention ratio)"
    assert (shipped.ratio, shipped.met) == (1.25, True) and one_thread.target is None
    results[contention.SHIPPED]["seconds"] = 6.0
    assert contention.contention_ratio(results) == 1.5


_THREAD_FORKER = """
import ctypes, os, sys, threading
def fork_from_a_named_thread():
    ctypes.CDLL(None).prctl(15, b"heartbeat-thr", 0, 0, 0)  # PR_SET_NAME: this thread's name
    if os.fork() == 0:  # the child carries the forking thread's name, as a JVM helper does before exec
        sys.stdin.read()
        os._exit(0)
    print('ready', flush=True)
    sys.stdin.read()  # the named thread stays alive while the test looks
    os.wait()
t = threading.Thread(target=fork_from_a_named_thread)
t.start(); t.join()
"""


def test_a_child_named_after_a_parent_thread_is_the_parent_memory() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _THREAD_FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        parent, child = rss.process_tree(proc.pid)
        assert rss.process_name(child) == "heartbeat-thr"
        assert rss._is_clone_of_a_thread(child, parent)
        assert rss.address_space(child) == rss.address_space(parent)
        # An exec'd process is its own memory, whatever its parent runs.
        assert not rss._is_clone_of_a_thread(parent, os.getpid())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def test_compile_suite_measures_every_pipeline_and_the_one_step_baseline() -> None:
    from bench.compile_time import measure

    result = measure(1)
    assert result["pipelines"] == ["monitoring", "scoring", "training"]
    assert len(result["compile_all"]) == len(result["tiny"]) == 1 and min(result["tiny"]) > 0
    assert set(result["yaml_bytes"]) == {"monitoring", "scoring", "training"}
