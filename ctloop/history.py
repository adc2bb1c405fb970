"""The history features' one definition outside Spark: per-entity state and the features of a new event.

The transform job (``components/spark/transform_job.py``, ``add_history``) computes, for every kept row, from
the same entity's strictly earlier rows: ``hist_prior_events`` (their count), ``hist_days_since_prior`` (days
since the latest of them, null without one) and ``hist_prior_mean_<col>`` (Spark's ``avg``: the sum of the
non-null values, added in timestamp order, over their count; null without one). ``HistoryState`` holds what
those features of an entity's next event need, and ``features`` derives them with the same arithmetic, so the
values equal the job's bit for bit (tests/test_history.py checks every row of a real transform output).

The state keeps the latest event apart from the ones before it: an event at the latest event's own instant
(the job never lets rows at one instant see each other) gets the features from the earlier events alone, which
is how a stored event is replayed exactly. An event before the latest one cannot be answered from the state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ctloop.features import DAYS_SINCE_PRIOR, PRIOR_EVENTS, PRIOR_MEAN_PREFIX, FeatureSpec
from ctloop.parquet_files import parquet_files

MICROS_PER_DAY = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


class HistoryOrderError(ValueError):
    """The event is earlier than the entity's latest event in the state: its history is not in the state."""


def to_micros(ts: datetime) -> int:
    """Microseconds since the epoch (a naive datetime is UTC, as in the job's session), exactly."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - _EPOCH) // _MICRO


def from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def iso(us: int) -> str:
    return from_micros(us).isoformat().replace("+00:00", "Z")


def _value(v: Any) -> float | None:
    """A numeric value as the job sees it: float, NaN and None both missing."""
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


@dataclass(frozen=True)
class HistoryState:
    """One entity's history after its latest event.

    ``events`` counts all its events; ``last_us`` is the latest one's time (µs since the epoch) and
    ``last_values`` its values of the averaged columns; ``prior_*`` describe the events before it:
    ``prior_last_us`` the latest of them (None when there is none), ``prior_sums``/``prior_counts`` the sum
    (in timestamp order, from 0.0) and the count of each averaged column's non-null values.
    """

    events: int
    last_us: int
    last_values: dict[str, float | None]
    prior_last_us: int | None = None
    prior_sums: dict[str, float] = field(default_factory=dict)
    prior_counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def first(cls, ts_us: int, values: Mapping[str, Any], columns: Iterable[str]) -> HistoryState:
        cols = list(columns)
        return cls(events=1, last_us=ts_us, last_values={c: _value(values.get(c)) for c in cols},
                   prior_sums={c: 0.0 for c in cols}, prior_counts={c: 0 for c in cols})

    @property
    def columns(self) -> list[str]:
        return list(self.last_values)

    def _totals(self, col: str) -> tuple[float, int]:
        """Sum and count over all events, the latest included (the job's fold order: it comes last)."""
        s, n, last = self.prior_sums[col], self.prior_counts[col], self.last_values[col]
        return (s + last, n + 1) if last is not None else (s, n)

    def then(self, ts_us: int, values: Mapping[str, Any]) -> HistoryState:
        """The state after a strictly later event with these values."""
        if ts_us <= self.last_us:
            raise HistoryOrderError(f"event at {iso(ts_us)} is not after the latest event {iso(self.last_us)}")
        totals = {c: self._totals(c) for c in self.columns}
        return HistoryState(events=self.events + 1, last_us=ts_us,
                            last_values={c: _value(values.get(c)) for c in self.columns},
                            prior_last_us=self.last_us, prior_sums={c: t[0] for c, t in totals.items()},
                            prior_counts={c: t[1] for c, t in totals.items()})

    def to_json(self) -> str:
        return json.dumps({"events": self.events, "last_us": self.last_us, "last_values": self.last_values,
                           "prior_last_us": self.prior_last_us, "prior_sums": self.prior_sums,
                           "prior_counts": self.prior_counts}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HistoryState:
        return cls(**json.loads(text))


def features(state: HistoryState | None, ts_us: int, spec: FeatureSpec) -> dict[str, float | None]:
    """The derived features (``spec.derived``) of an event at ``ts_us`` of the entity with ``state``.

    ``None`` (an entity never seen) gives first-event features. Raises HistoryOrderError for an event before
    the state's latest event and KeyError naming an averaged column the state does not carry.
    """
    if not spec.history_enabled:
        return {}
    means = spec.history_means
    if state is None:
        return {PRIOR_EVENTS: 0.0, DAYS_SINCE_PRIOR: None} | {PRIOR_MEAN_PREFIX + c: None for c in means}
    missing = [c for c in means if c not in state.last_values]
    if missing:
        raise KeyError(f"the history state has no sums for {missing}; it carries {state.columns}")
    if ts_us > state.last_us:
        count, latest = state.events, state.last_us
        totals = {c: state._totals(c) for c in means}
    elif ts_us == state.last_us:  # rows at one instant never see each other: the earlier events only
        count, latest = state.events - 1, state.prior_last_us
        totals = {c: (state.prior_sums[c], state.prior_counts[c]) for c in means}
    else:
        raise HistoryOrderError(f"event at {iso(ts_us)} is before the entity's latest event "
                                f"{iso(state.last_us)}; its history features cannot be derived")
    out: dict[str, float | None] = {
        PRIOR_EVENTS: float(count),
        DAYS_SINCE_PRIOR: None if latest is None else (ts_us - latest) / MICROS_PER_DAY,
    }
    for c, (s, n) in totals.items():
        out[PRIOR_MEAN_PREFIX + c] = s / n if n else None
    return out


def fold_states(rows: Iterable[tuple[str, int, Mapping[str, Any]]], columns: list[str]) -> dict[str, HistoryState]:
    """Each entity's latest state from ``(entity, ts_us, values)`` rows sorted by entity, then time.

    The rows are the transform's output (one per entity and instant), so timestamps within an entity are
    strictly increasing; a repeat raises HistoryOrderError.
    """
    states: dict[str, HistoryState] = {}
    for entity, ts_us, values in rows:
        state = states.get(entity)
        states[entity] = (HistoryState.first(ts_us, values, columns) if state is None
                          else state.then(ts_us, values))
    return states


def states_from_splits(split_dirs: Iterable[str], spec: FeatureSpec) -> dict[str, HistoryState]:
    """Each entity's latest state over the transform's split directories (their rows are the history).

    Reads the ``*.parquet`` files with ``pyarrow.parquet`` alone: ``pyarrow.dataset`` and pandas would add 0.4 s
    of imports to the step.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [spec.id_column, spec.timestamp_column, *spec.history_means]
    files = [f for d in split_dirs for f in parquet_files(d)]
    if not files:
        return {}
    table = pa.concat_tables([pq.ParquetFile(f).read(columns=cols) for f in files], promote_options="permissive")
    micros = table[spec.timestamp_column].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    table = table.append_column("__us", micros).sort_by([(spec.id_column, "ascending"), ("__us", "ascending")])
    ids = table[spec.id_column].cast(pa.string()).to_pylist()
    times = table["__us"].to_pylist()
    value_lists = {c: table[c].cast(pa.float64()).to_pylist() for c in spec.history_means}
    rows = ((ids[i], times[i], {c: value_lists[c][i] for c in spec.history_means}) for i in range(len(ids)))
    return fold_states(rows, list(spec.history_means))
