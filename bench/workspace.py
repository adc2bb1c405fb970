"""Where the benchmarks keep their data, and the shared context every suite gets."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctloop.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "ctloop.yaml"
PYTHON = sys.executable
SAMPLE_SEED = 7
DEFAULT_WORKDIR = REPO / "build" / "bench"


def python_module(module: str, *args: str) -> list[str]:
    """argv running ``module`` with this interpreter (children run with cwd = the repository)."""
    return [PYTHON, "-m", module, *args]


def bench_settings(workdir: Path, overrides: list[str] | None = None) -> Settings:
    """The project's ``ctloop.yaml`` with the local state under ``workdir``."""
    return load_settings(CONFIG, [f"local.workdir={workdir}", *(overrides or [])])


def _generator_fingerprint() -> str:
    from devtools import sample_data

    return hashlib.sha256(Path(sample_data.__file__).read_bytes()).hexdigest()[:16]


def ensure_sample_data(data_root: Path, rows: int, settings: Settings) -> Path:
    """A landing directory holding ``rows`` sample rows; reused when an identical one was written before.

    Identical = same row count, seed, event window and generator source (the generator is deterministic, so
    rewriting would produce the same files). Returns the landing directory (``<landing>/<dataset>/<table>/``
    below it holds the batch).
    """
    from devtools.sample_data import default_window, write_sample_data

    root = data_root / f"rows-{rows}"
    landing = root / "landing"
    start, end = default_window()
    wanted = {"rows": rows, "seed": SAMPLE_SEED, "start": start.isoformat(), "end": end.isoformat(),
              "generator": _generator_fingerprint(), "dataset": settings.data.bq_dataset,
              "table": settings.data.bq_table}
    marker = root / "sample.json"
    if marker.is_file():
        found = json.loads(marker.read_text())
        files = [Path(p) for p in found.get("paths", [])]
        if {k: found.get(k) for k in wanted} == wanted and files and all(p.is_file() for p in files):
            return landing
    marker.unlink(missing_ok=True)
    result = write_sample_data(landing, settings, rows=rows, seed=SAMPLE_SEED, start=start, end=end)
    marker.write_text(json.dumps({**wanted, "paths": [str(p) for p in result.paths]}, indent=2))
    return landing


def batch_dir(landing: Path, settings: Settings) -> Path:
    """The folder of Parquet part files ``ensure_sample_data`` wrote (the transform's input shape)."""
    return landing / settings.data.bq_dataset / settings.data.bq_table / "base"


@dataclass
class Context:
    """Options and shared state for one ``python -m bench`` invocation."""

    workdir: Path
    quick: bool = False
    rows_max: int = 5_000_000
    echo: Any = print
    shared: dict[str, Any] = field(default_factory=dict)  # e.g. the model the loop suite trained

    @property
    def data_root(self) -> Path:
        return self.workdir / "data"

    @property
    def loop_rows(self) -> int:
        return 20_000 if self.quick else 100_000

    def scaling_sizes(self) -> list[int]:
        sizes = [20_000, 100_000] if self.quick else [100_000, 1_000_000, 5_000_000, 20_000_000]
        kept = [n for n in sizes if n <= self.rows_max]
        return kept or [min(sizes)]

    def settings(self, name: str, overrides: list[str] | None = None) -> Settings:
        return bench_settings(self.workdir / name, overrides)
