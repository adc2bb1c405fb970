"""collect_recent: the batch the drift check compares with the champion's training data, as a Parquet ``Dataset``.

``monitoring.source``:
- ``extract``: the extract step's own code and SQL (``components.extract.run_extract``: BigQuery export in the
  cloud, DuckDB locally) over the last ``monitoring.recent_days``, so the recent rows are selected exactly as
  training selects its rows;
- ``prediction_log``: the production endpoint's prediction log over the same window (the features as the
  served model saw them, which is what catches training/serving skew).

The window ends at ``monitoring.window_end`` if set, else at the run's snapshot time, else now.
"""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from kfp.dsl import Dataset, Output

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.errors import CtloopError, DataValidationError
from ctloop.prediction_log import MODEL_VERSION, log_root, read_prediction_log
from ctloop.sql import parse_timestamp

RECENT_FILE = "part-00000.parquet"


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def collect_recent(
    config: dict, run_id: str, recent: Output[Dataset], snapshot_time: str = ""
) -> NamedTuple("Outputs", [("row_count", int)]):
    """The recent batch (extract SQL over the recent window, or the prediction log) as Parquet files."""
    from components.recent import collect_recent_to_artifact
    from ctloop.steps import run_step

    return run_step(collect_recent_to_artifact, config, run_id, snapshot_time, recent)


@dataclass(frozen=True)
class RecentBatch:
    row_count: int
    source: str  # extract | prediction_log
    window_start: str
    window_end: str
    origin: str  # the source table, or the prediction log's root
    lineage: dict[str, Any]  # extract: query, checksum...; prediction log: files read


def recent_window(settings: Settings, snapshot_time: str | None) -> tuple[datetime, datetime]:
    """``[end - monitoring.recent_days, end)``; end = monitoring.window_end, else snapshot_time, else now."""
    m = settings.monitoring
    try:
        if m.window_end:
            end = parse_timestamp(m.window_end)
        elif snapshot_time:
            end = parse_timestamp(snapshot_time)
        else:
            end = datetime.now(UTC).replace(microsecond=0)
    except (TypeError, ValueError) as exc:
        raise CtloopError(f"collect_recent: monitoring.window_end/snapshot_time: {exc}") from exc
    return end - timedelta(days=m.recent_days), end


def extract_settings(settings: Settings, end: datetime) -> Settings:
    """The settings the extract step runs with for the recent window (the training window is left alone)."""
    return settings.with_overrides({"data.window_days": settings.monitoring.recent_days,
                                    "data.window_end": end.isoformat(),
                                    "data.min_rows": settings.monitoring.min_rows})


def gather_recent(settings: Settings, *, run_id: str, output_path: str, output_uri: str,
                   snapshot_time: str | None = None, bq_client: Any = None) -> RecentBatch:
    """Write the recent batch to ``output_path`` (a directory of Parquet files) and describe it.

    Raises DataValidationError when the window holds fewer than ``monitoring.min_rows`` rows: too little to
    compare (and, for a table that should be receiving data, a problem worth a failed run).
    """
    start, end = recent_window(settings, snapshot_time)
    window = {"window_start": start.isoformat(), "window_end": end.isoformat()}
    m = settings.monitoring
    if m.source == "extract":
        from components.extract import run_extract

        try:
            result = run_extract(extract_settings(settings, end), run_id=run_id, output_path=output_path,
                                 output_uri=output_uri, snapshot_time=snapshot_time or end.isoformat(),
                                 bq_client=bq_client)
        except DataValidationError as exc:
            raise DataValidationError(f"recent batch (monitoring.recent_days={m.recent_days}, "
                                      f"monitoring.min_rows={m.min_rows}): {exc}") from exc
        return RecentBatch(row_count=result.row_count, source="extract", origin=result.source_table,
                           lineage={"query": result.query, "checksum": result.checksum,
                                    "files": len(result.files)}, **window)
    root = log_root(settings, settings.deploy.production_endpoint)
    frame = read_prediction_log(root, start, end)
    if len(frame) < m.min_rows:
        raise DataValidationError(
            f"prediction log {root}: {len(frame)} logged rows between {start.isoformat()} and {end.isoformat()}; "
            f"expected at least {m.min_rows} (monitoring.min_rows). Raise monitoring.sample_rate or "
            f"monitoring.recent_days")
    write_parquet(frame, Path(output_path))
    versions = sorted(frame[MODEL_VERSION].astype(str).unique().tolist()) if MODEL_VERSION in frame else []
    return RecentBatch(row_count=len(frame), source="prediction_log", origin=root,
                       lineage={"model_versions": ",".join(versions)}, **window)


def write_parquet(frame: pd.DataFrame, directory: Path) -> Path:
    """One Parquet file in ``directory``, written under a temporary name and renamed, replacing earlier parts."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.parquet"):
        old.unlink()
    tmp = directory / f".{RECENT_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        frame.to_parquet(tmp, index=False)
        tmp.replace(directory / RECENT_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    return directory / RECENT_FILE


def collect_recent_to_artifact(config: dict, run_id: str, snapshot_time: str, recent: Any) -> tuple[int]:
    """The component body: collect into the artifact and record where the rows came from."""
    settings = Settings.from_param(config)
    batch = gather_recent(settings, run_id=run_id, output_path=recent.path, output_uri=recent.uri,
                           snapshot_time=snapshot_time)
    recent.metadata.update({
        "row_count": batch.row_count,
        "source": batch.source,
        "origin": batch.origin,
        "window_start": batch.window_start,
        "window_end": batch.window_end,
        "run_id": run_id,
        **batch.lineage,
    })
    return (batch.row_count,)

