"""A deterministic, realistic customer-churn event table written as Parquet into the local landing area.

Each row is one observation of a customer at ``event_ts`` with that customer's current attributes and whether
they churned. Customers recur across rows (and across batches), so per-customer history exists. The data
carries what a real feed does: missing values, ~0.5% exact duplicate rows and ~0.2% malformed rows (null id,
null timestamp, a label outside {0, 1}, negative monthly charges) for the transform to quarantine.

Output: ``<landing_dir>/<bq_dataset>/<bq_table>/<batch>/part-NNNNN.parquet``. Rows are generated chunk by
chunk (one file each), so memory stays flat at any size; each chunk's randomness comes from (seed, batch,
chunk index) and customer attributes from a hash of (seed, customer index), so every file is the same whatever
order or process writes it.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctloop.config import Settings

ROWS_PER_FILE = 250_000
EVENTS_PER_CUSTOMER = 8  # on average; sets the size of the customer pool
DUPLICATE_FRACTION = 0.005
MALFORMED_FRACTION = 0.002

CONTRACTS = ("month-to-month", "one-year", "two-year")
PAYMENT_METHODS = ("electronic-check", "mailed-check", "bank-transfer", "credit-card")
INTERNET_SERVICES = ("fiber", "dsl", "none")
REGIONS = ("north", "south", "east", "west")

NUMERIC_COLUMNS = ("tenure_months", "monthly_charges", "total_charges", "support_calls", "data_usage_gb",
                   "late_payments", "satisfaction_score")
CATEGORICAL_COLUMNS = ("contract_type", "payment_method", "internet_service", "region")

# Share of missing values per column (after generation, before the malformed rows).
_MISSING = {"tenure_months": 0.02, "total_charges": 0.01, "data_usage_gb": 0.03, "satisfaction_score": 0.08,
            "payment_method": 0.01, "internet_service": 0.005}

_SECONDS_PER_MONTH = 30.44 * 24 * 3600
_TENURE_CYCLE = 66  # months


@dataclass(frozen=True)
class SampleDataResult:
    """What ``write_sample_data`` wrote. ``positive_rate`` is over rows whose label is 0 or 1."""

    batch_dir: Path
    paths: list[Path]
    rows: int
    files: int
    positives: int
    positive_rate: float
    duplicate_rows: int
    malformed_rows: int
    customers: int
    start: datetime
    end: datetime
    seed: int
    drift: float
    columns: list[str] = field(default_factory=list)
    concept_drift: float = 0.0


def default_window() -> tuple[datetime, datetime]:
    """18 months ending at the start of the current UTC month: recent enough for the default extract window,
    fixed for a whole month so re-running the same command writes the same data."""
    now = datetime.now(UTC)
    end = datetime(now.year, now.month, 1, tzinfo=UTC)
    months = end.year * 12 + end.month - 1 - 18
    return datetime(months // 12, months % 12 + 1, 1, tzinfo=UTC), end


def write_sample_data(
    landing_dir: Path,
    settings: Settings,
    rows: int = 100_000,
    seed: int = 7,
    drift: float = 0.0,
    batch: str = "base",
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    rows_per_file: int = ROWS_PER_FILE,
    concept_drift: float = 0.0,
) -> SampleDataResult:
    """Write ``rows`` sample events for ``settings``' source table into ``landing_dir`` and return the counts.

    ``drift`` in [0, 1] raises charges, moves customers to month-to-month contracts and changes which features
    drive churn (data usage and region gain weight, support calls and satisfaction lose it). ``concept_drift`` in
    [0, 1] changes only the latter, the label relation, and leaves every input distribution as it is (the label
    relation follows the larger of the two). ``start``/``end``
    bound ``event_ts`` (default: ``default_window()``). Re-running with the same arguments rewrites identical
    files and removes part files a previous, larger run of the same batch left behind.
    """
    gen = _generator(settings, rows, seed, drift, batch, start, end, rows_per_file, concept_drift)
    batch_dir = Path(landing_dir) / settings.data.bq_dataset / settings.data.bq_table / batch
    batch_dir.mkdir(parents=True, exist_ok=True)
    n_files = -(-rows // rows_per_file)
    paths: list[Path] = []
    positives = labelled = duplicates = malformed = 0
    columns: list[str] = []
    for index in range(n_files):
        n = min(rows_per_file, rows - index * rows_per_file)
        chunk = gen.chunk(index, n)
        path = batch_dir / f"part-{index:05d}.parquet"
        _write_atomically(chunk.table, path)
        paths.append(path)
        positives += chunk.positives
        labelled += chunk.labelled
        duplicates += chunk.duplicates
        malformed += chunk.malformed
        columns = chunk.table.column_names
    _remove_stale_parts(batch_dir, keep=n_files)
    return SampleDataResult(
        batch_dir=batch_dir, paths=paths, rows=rows, files=n_files, positives=positives,
        positive_rate=positives / labelled if labelled else 0.0, duplicate_rows=duplicates,
        malformed_rows=malformed, customers=gen.customers, start=gen.start, end=gen.end, seed=seed,
        drift=drift, columns=columns, concept_drift=concept_drift,
    )


def generate_part(
    settings: Settings,
    index: int,
    rows: int = 100_000,
    seed: int = 7,
    drift: float = 0.0,
    batch: str = "base",
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    rows_per_file: int = ROWS_PER_FILE,
    concept_drift: float = 0.0,
) -> pa.Table:
    """Part file ``index`` of what ``write_sample_data`` with the same arguments writes, on its own.

    Lets parallel writers split a very large batch: any process can produce any part.
    """
    gen = _generator(settings, rows, seed, drift, batch, start, end, rows_per_file, concept_drift)
    n_files = -(-rows // rows_per_file)
    if not 0 <= index < n_files:
        raise ValueError(f"sample data: part index must be within [0, {n_files}), found {index}")
    return gen.chunk(index, min(rows_per_file, rows - index * rows_per_file)).table


def _generator(settings: Settings, rows: int, seed: int, drift: float, batch: str,
               start: datetime | str | None, end: datetime | str | None, rows_per_file: int,
               concept_drift: float = 0.0) -> _Generator:
    if rows < 1:
        raise ValueError(f"sample data: rows must be >= 1, found {rows}")
    if seed < 0:
        raise ValueError(f"sample data: seed must be >= 0, found {seed}")
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"sample data: drift must be within [0, 1], found {drift}")
    if not 0.0 <= concept_drift <= 1.0:
        raise ValueError(f"sample data: concept_drift must be within [0, 1], found {concept_drift}")
    if rows_per_file < 1:
        raise ValueError(f"sample data: rows_per_file must be >= 1, found {rows_per_file}")
    if not batch or "/" in batch or "\\" in batch or batch.startswith("."):
        raise ValueError(f"sample data: batch must be a plain folder name, found {batch!r}")
    default_start, default_end = default_window()
    t0 = _as_utc(start, "start") if start is not None else default_start
    t1 = _as_utc(end, "end") if end is not None else default_end
    if t1 <= t0:
        raise ValueError(f"sample data: end ({t1.isoformat()}) must be after start ({t0.isoformat()})")
    return _Generator(settings, seed=seed, drift=drift, batch=batch, start=t0, end=t1,
                      customers=max(1, rows // EVENTS_PER_CUSTOMER), concept_drift=concept_drift)


def _as_utc(value: datetime | str, name: str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"sample data: {name} {value!r} is not an ISO timestamp") from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _write_atomically(table: pa.Table, path: Path) -> None:
    # The temp name does not end in .parquet, so a reader globbing *.parquet never sees a half-written file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="snappy")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_parts(batch_dir: Path, keep: int) -> None:
    for old in batch_dir.glob("part-*.parquet"):
        suffix = old.stem.removeprefix("part-")
        if suffix.isdigit() and int(suffix) >= keep:
            old.unlink()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A stateless 64-bit mixer: per-customer randomness without a per-customer generator."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class _Chunk:
    table: pa.Table
    positives: int
    labelled: int
    duplicates: int
    malformed: int


class _Generator:
    """Customer attributes (stable per customer) plus per-event observations for one batch."""

    def __init__(self, settings: Settings, *, seed: int, drift: float, batch: str, start: datetime,
                 end: datetime, customers: int, concept_drift: float = 0.0) -> None:
        self.cols = settings.columns
        self.seed = seed
        self.drift = drift
        self.concept = max(drift, concept_drift)
        self.batch_key = zlib.crc32(batch.encode())
        self.start = start
        self.end = end
        self.span_s = int((end - start).total_seconds())
        self.customers = customers

    def _customer_uniform(self, idx: np.ndarray, stream: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            key = (idx.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
                   + np.uint64(self.seed & 0xFFFFFFFF) * np.uint64(0x8CB92BA72F3D8DD7)
                   + np.uint64(stream) * np.uint64(0xA0761D6478BD642F))
            bits = _splitmix64(key)
        return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)

    def chunk(self, index: int, n: int) -> _Chunk:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.batch_key, index]))
        n_dup = int(round(n * DUPLICATE_FRACTION)) if n >= 200 else 0
        n_unique = n - n_dup
        data = self._events(rng, n_unique)
        n_bad = int(round(n_unique * MALFORMED_FRACTION)) if n_unique >= 500 else 0
        bad = rng.choice(n_unique, size=n_bad, replace=False) if n_bad else np.empty(0, dtype=np.int64)
        self._corrupt(rng, data, bad)
        good = np.setdiff1d(np.arange(n_unique), bad)
        dup_src = rng.choice(good, size=n_dup, replace=True) if n_dup else np.empty(0, dtype=np.int64)
        order = rng.permutation(np.concatenate([np.arange(n_unique), dup_src]))
        table = self._to_table(data).take(pa.array(order))
        label = data["label"]
        labelled_mask = (label == 0) | (label == 1)
        lab_rows = labelled_mask[order]
        positives = int((label[order][lab_rows] == 1).sum())
        return _Chunk(table=table, positives=positives, labelled=int(lab_rows.sum()), duplicates=n_dup,
                      malformed=n_bad)

    def _events(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        d = self.drift
        cust = rng.integers(0, self.customers, size=n)
        offset_s = rng.integers(0, self.span_s, size=n)
        u = {k: self._customer_uniform(cust, k) for k in range(8)}

        # Customer attributes: fixed per customer; drift moves some customers to month-to-month.
        p_m2m, p_one = 0.50 + 0.25 * d, 0.27 - 0.12 * d
        contract = np.where(u[0] < p_m2m, 0, np.where(u[0] < p_m2m + p_one, 1, 2))
        payment = np.searchsorted(np.cumsum([0.34, 0.20, 0.22, 0.24]), u[1], side="right").clip(0, 3)
        internet = np.searchsorted(np.cumsum([0.45, 0.35, 0.20]), u[2], side="right").clip(0, 2)
        region = np.searchsorted(np.cumsum([0.30, 0.25, 0.25, 0.20]), u[3], side="right").clip(0, 3)
        phase = u[4] * _TENURE_CYCLE
        plan_charge = np.choose(internet, [70.0, 45.0, 20.0]) + u[5] * np.choose(internet, [35.0, 20.0, 10.0])
        risk = np.sqrt(-2 * np.log(1 - u[6])) * np.cos(2 * np.pi * u[7]) * 0.6  # unobserved propensity

        # Tenure grows a month a month and wraps after _TENURE_CYCLE months (the slot's customer leaves and a new
        # one starts): with the phase uniform, the tenure distribution is the same at every date, so a batch
        # without drift is stationary however long its window.
        tenure = contract * 10 + np.floor((phase + offset_s / _SECONDS_PER_MONTH) % _TENURE_CYCLE)
        monthly = np.round(plan_charge * (1 + 0.25 * d) * (1 + rng.normal(0, 0.03, n)), 2)
        total = np.round(monthly * np.maximum(tenure, 1) * rng.uniform(0.95, 1.05, n), 2)
        support = rng.poisson(0.7 + 0.9 * np.maximum(risk, 0) + 0.3 * (internet == 0))
        usage_mean = np.choose(internet, [180.0, 90.0, 2.0]) * (1 + 0.3 * d)
        usage = np.round(usage_mean * rng.lognormal(0, 0.35, n), 2)
        late = rng.poisson(0.25 + 0.45 * (payment == 0) + 0.3 * np.maximum(risk, 0))
        satisfaction = np.round(3.7 - 0.35 * support - 0.6 * risk + rng.normal(0, 0.6, n), 1).clip(1.0, 5.0)

        # The label relation; drift (or concept drift alone) interpolates towards a different set of drivers.
        c = self.concept

        def w(base: float, drifted: float) -> float:
            return (1 - c) * base + c * drifted

        logit = (
            w(-1.98, -2.7)
            + w(1.1, 0.5) * (contract == 0) - w(0.9, 0.6) * (contract == 2)
            - w(0.035, 0.02) * tenure
            + w(0.02, 0.03) * (monthly - 65)
            + w(0.5, 0.05) * support
            + w(0.4, 0.35) * late
            - w(0.6, 0.15) * (satisfaction - 3)
            + w(0.35, 0.1) * (internet == 0)
            + w(0.3, 0.3) * (payment == 0)
            + w(0.0, 0.012) * (usage - usage_mean)
            + w(0.0, 1.1) * (region == 1)
            + 0.8 * risk
        )
        label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)

        data: dict[str, np.ndarray] = {
            "customer": cust, "offset_s": offset_s, "tenure_months": tenure.astype(np.int64),
            "monthly_charges": monthly, "total_charges": total, "support_calls": support.astype(np.int64),
            "data_usage_gb": usage, "late_payments": late.astype(np.int64),
            "satisfaction_score": satisfaction, "contract_type": contract, "payment_method": payment,
            "internet_service": internet, "region": region, "label": label,
        }
        for name, share in _MISSING.items():
            data[f"{name}__null"] = rng.random(n) < share
        data["customer__null"] = np.zeros(n, dtype=bool)
        data["offset_s__null"] = np.zeros(n, dtype=bool)
        return data

    def _corrupt(self, rng: np.random.Generator, data: dict[str, np.ndarray], rows: np.ndarray) -> None:
        kind = rng.integers(0, 4, size=len(rows))
        data["customer__null"][rows[kind == 0]] = True
        data["offset_s__null"][rows[kind == 1]] = True
        bad_label = rows[kind == 2]
        data["label"][bad_label] = rng.choice(np.array([2, -1]), size=len(bad_label))
        neg = rows[kind == 3]
        data["monthly_charges"][neg] = -np.abs(data["monthly_charges"][neg]) - 1.0

    def _to_table(self, data: dict[str, np.ndarray]) -> pa.Table:
        def mask(name: str) -> np.ndarray | None:
            m = data.get(f"{name}__null")
            return m if m is not None and m.any() else None

        digits = pc.utf8_lpad(pc.cast(pa.array(data["customer"] + 1), pa.string()), 7, "0")
        ids = pc.binary_join_element_wise("C", digits, "")  # the last argument is the separator
        ids = pc.if_else(pa.array(data["customer__null"]), pa.scalar(None, pa.string()), ids)
        start_us = int(self.start.timestamp()) * 1_000_000
        ts = pa.array(start_us + data["offset_s"] * 1_000_000, type=pa.int64(), mask=mask("offset_s"))
        columns: dict[str, pa.Array] = {
            self.cols.id_column: ids,
            self.cols.timestamp_column: ts.cast(pa.timestamp("us", tz="UTC")),
        }
        for name in NUMERIC_COLUMNS:
            columns[name] = pa.array(data[name], mask=mask(name))
        for name, values in zip(CATEGORICAL_COLUMNS, (CONTRACTS, PAYMENT_METHODS, INTERNET_SERVICES, REGIONS),
                                strict=True):
            labels = np.asarray(values, dtype=object)[data[name]]
            columns[name] = pa.array(labels, type=pa.string(), mask=mask(name))
        columns[self.cols.label_column] = pa.array(data["label"], type=pa.int64())
        return pa.table(columns)
