"""Request-side model work: check JSON instances against a model card, and fetch a model directory from GCS.

Loading and scoring belong to ``ctloop.model_runtime`` (the serving image ships the ``ctloop`` package).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ctloop.errors import ModelLoadError
from ctloop.model_runtime import MODEL_FILES, OPTIONAL_FILES, ModelCard

Columns = dict[str, list[Any]]


class InstanceError(ValueError):
    """A request instance does not match the model card; the message names the instance index and field."""


class InstanceValidator:
    """Checks JSON instances against a card in plain Python (fast on one-row requests); pivots to columns."""

    def __init__(self, card: ModelCard) -> None:
        self.numeric = card.numeric
        self.categorical = card.categorical
        self.expected = frozenset(card.features)

    def columns(self, instances: list[Any]) -> Columns:
        """Validate every instance; raise InstanceError naming the first bad instance index and field."""
        cols: Columns = {name: [] for name in (*self.numeric, *self.categorical)}
        for i, inst in enumerate(instances):
            if type(inst) is not dict:
                raise InstanceError(f"instances[{i}]: expected an object of feature values, "
                                    f"found {_json_type(inst)}")
            if inst.keys() != self.expected:
                self._key_error(i, inst)
            for name in self.numeric:
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
        return cols

    def _key_error(self, i: int, inst: dict[str, Any]) -> None:
        missing = sorted(self.expected - inst.keys())
        unknown = sorted(inst.keys() - self.expected)
        parts = []
        if missing:
            parts.append(f"missing field(s) {missing}")
        if unknown:
            parts.append(f"unknown field(s) {unknown}")
        field_name = (missing or unknown)[0]
        raise InstanceError(f"instances[{i}].{field_name}: {'; '.join(parts)}; expected exactly the fields "
                            f"{sorted(self.expected)} (null for a missing value)")


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
