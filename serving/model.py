"""Request-side model work: check JSON instances against a model card, and fetch a model directory from GCS.

Loading and scoring belong to ``ctloop.model_runtime`` (the serving image ships the ``ctloop`` package).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ctloop.errors import ModelLoadError
from ctloop.features import FeatureSpec
from ctloop.history import to_micros
from ctloop.model_runtime import MODEL_FILES, OPTIONAL_FILES, ModelCard

Columns = dict[str, list[Any]]


class InstanceError(ValueError):
    """A request instance does not match the model card; the message names the instance index and field."""


@dataclass(frozen=True)
class Lookup:
    """An instance whose history features the server derives: its index, entity id and event time (µs)."""

    index: int
    entity: str
    ts_us: int


@dataclass
class Parsed:
    """Validated instances as columns; ``lookups`` lists the instances sent without history features, whose
    derived columns hold None until the server fills them in."""

    columns: Columns
    lookups: list[Lookup] = field(default_factory=list)


class InstanceValidator:
    """Checks JSON instances against a card in plain Python (fast on one-row requests); pivots to columns.

    A model trained with history features takes either form of instance: the entity id, the event time
    (optional, default now) and the source features, whose history features the server derives from the
    online store; or all model features, the history features included, used as sent.
    """

    def __init__(self, card: ModelCard) -> None:
        self.numeric = card.numeric
        self.categorical = card.categorical
        self.expected = frozenset(card.features)
        spec = FeatureSpec(**card.data["feature_spec"]) if "feature_spec" in card.data else None
        self.spec = spec if spec is not None and spec.derived else None
        self.derived = tuple(spec.derived) if self.spec is not None else ()
        self.source_numeric = tuple(c for c in self.numeric if c not in self.derived)
        if self.spec is not None:
            self.id_field, self.ts_field = self.spec.id_column, self.spec.timestamp_column
            self.raw_required = frozenset((*self.source_numeric, *self.categorical, self.id_field))
            self.raw_allowed = self.raw_required | {self.ts_field}

    def columns(self, instances: list[Any]) -> Columns:
        """Validate instances that carry every model feature; raise InstanceError naming the index and field."""
        parsed = self.parse(instances, now_us=0)
        if parsed.lookups:
            first = parsed.lookups[0].index
            raise InstanceError(f"instances[{first}]: expected every model feature {sorted(self.expected)}")
        return parsed.columns

    def parse(self, instances: list[Any], now_us: int) -> Parsed:
        """Validate every instance; raise InstanceError naming the first bad instance index and field.

        ``now_us``: the event time of instances that do not give one (µs since the epoch).
        """
        cols: Columns = {name: [] for name in (*self.numeric, *self.categorical)}
        parsed = Parsed(cols)
        for i, inst in enumerate(instances):
            if type(inst) is not dict:
                raise InstanceError(f"instances[{i}]: expected an object of feature values, "
                                    f"found {_json_type(inst)}")
            numeric = self.numeric
            if inst.keys() != self.expected:
                if self.spec is None or not (self.raw_required <= inst.keys() <= self.raw_allowed):
                    self._key_error(i, inst)
                parsed.lookups.append(Lookup(i, self._entity(i, inst[self.id_field]),
                                             self._ts_us(i, inst.get(self.ts_field), now_us)))
                numeric = self.source_numeric
                for name in self.derived:
                    cols[name].append(None)
            for name in numeric:
                value = inst[name]
                kind = type(value)
                if kind is float:
                    if not math.isfinite(value):
                        raise InstanceError(f"instances[{i}].{name}: expected a finite number or null, "
                                            f"found {value}")
                elif kind is not int and value is not None:
                    raise InstanceError(f"instances[{i}].{name}: expected a number or null, "
                                        f"found {_json_type(value)} {_show(value)}")
                cols[name].append(value)
            for name in self.categorical:
                value = inst[name]
                if type(value) is not str and value is not None:
                    raise InstanceError(f"instances[{i}].{name}: expected a string or null, "
                                        f"found {_json_type(value)} {_show(value)}")
                cols[name].append(value)
        return parsed

    def _entity(self, i: int, value: Any) -> str:
        # The transform reads ids as strings: a number is its decimal text.
        if type(value) is int:
            return str(value)
        if type(value) is not str or not value.strip():
            raise InstanceError(f"instances[{i}].{self.id_field}: expected the entity id (a non-empty string), "
                                f"found {_json_type(value)} {_show(value)}")
        return value

    def _ts_us(self, i: int, value: Any, now_us: int) -> int:
        if value is None:
            return now_us
        if type(value) is str:
            try:
                return to_micros(datetime.fromisoformat(value))
            except ValueError:
                pass
        raise InstanceError(f"instances[{i}].{self.ts_field}: expected an ISO 8601 time such as "
                            f"2024-05-01T12:00:00Z (or null for now), found {_json_type(value)} {_show(value)}")

    def _key_error(self, i: int, inst: dict[str, Any]) -> None:
        if self.spec is not None:
            missing = sorted(self.raw_required - inst.keys())
            unknown = sorted(inst.keys() - self.raw_allowed - self.expected)
            if not missing and not unknown:  # some history features sent, not all
                missing = sorted(self.expected - inst.keys())
            expected = (f"expected {self.id_field!r}, optionally {self.ts_field!r} (default now), and the fields "
                        f"{sorted(self.raw_required - {self.id_field})}, or every model feature including "
                        f"{list(self.derived)} (null for a missing value)")
        else:
            missing = sorted(self.expected - inst.keys())
            unknown = sorted(inst.keys() - self.expected)
            expected = f"expected exactly the fields {sorted(self.expected)} (null for a missing value)"
        parts = []
        if missing:
            parts.append(f"missing field(s) {missing}")
        if unknown:
            parts.append(f"unknown field(s) {unknown}")
        field_name = (missing or unknown)[0]
        raise InstanceError(f"instances[{i}].{field_name}: {'; '.join(parts)}; {expected}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def fetch_model_dir(uri: str, dest: str | Path | None = None) -> Path:
    """A local directory holding the model files: ``uri`` itself, or a download of a ``gs://`` prefix.

    Downloads go to a temporary directory first and are renamed into place, so a crash never leaves a
    directory with only some of the files. The ONNX model and its check are fetched when present.
    """
    if not uri.startswith("gs://"):
        return Path(uri)
    from google.cloud import storage  # only the gs:// path needs it

    bucket_name, _, prefix = uri[len("gs://"):].partition("/")
    if not bucket_name:
        raise ModelLoadError(f"{uri}: expected gs://BUCKET/PATH")
    prefix = prefix.rstrip("/")
    target = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="ctloop-model-"))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        client = _storage_client(storage)
        bucket = client.bucket(bucket_name)
        for name in MODEL_FILES:
            blob = bucket.blob(f"{prefix}/{name}" if prefix else name)
            if not blob.exists():
                raise ModelLoadError(f"{uri}: missing {name}; a model directory holds {list(MODEL_FILES)}")
            blob.download_to_filename(str(staging / name))
        for name in OPTIONAL_FILES:
            blob = bucket.blob(f"{prefix}/{name}" if prefix else name)
            if blob.exists():
                blob.download_to_filename(str(staging / name))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _storage_client(storage: Any) -> Any:
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # The emulator needs no credentials; without this the client would look for default credentials.
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local"),
                              credentials=AnonymousCredentials())
    return storage.Client()
