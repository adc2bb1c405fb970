"""Copy the triggering object(s) from Cloud Storage (or its emulator) into a local directory, atomically.

Local runs read the landing area from disk; this makes ``gs://bucket/<name>`` appear at
``<mirror_dir>/<name>``. Names are validated by ``names.check_name`` and the resolved target is checked again
to stay under the mirror root.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ctloop_trigger.jobs import LaunchRequest
from ctloop_trigger.names import UnsafeName, check_name, data_file_ignore_reason
from ctloop_trigger.settings import TriggerSettings


def safe_target(root: Path, name: str, max_bytes: int) -> Path:
    """``root/name``, refusing anything that would resolve outside ``root``."""
    check_name(name, max_bytes)
    root = root.resolve()
    target = (root / name).resolve()
    if not target.is_relative_to(root) or target == root:
        raise UnsafeName(f"object name resolves outside the mirror directory {root}")
    return target


def _download(blob, target: Path) -> None:  # noqa: ANN001 - a google.cloud.storage Blob
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".mirror-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            blob.download_to_file(out)
        os.replace(tmp, target)  # readers never see a half-written file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mirror_batch(request: LaunchRequest, settings: TriggerSettings) -> list[Path]:
    """Download the object generation that fired (or, for a batch marker, the data files of its folder)."""
    from google.cloud import storage

    root = Path(settings.mirror_dir)
    bucket = storage.Client().bucket(request.bucket)
    written: list[Path] = []
    if not settings.batch_mode:
        target = safe_target(root, request.name, settings.max_name_bytes)
        _download(bucket.blob(request.name, generation=int(request.generation)), target)
        return [target]
    folder = request.batch[len(f"gs://{request.bucket}/"):]
    for blob in bucket.list_blobs(prefix=folder):
        relative = blob.name[len(folder):]  # the folder itself passed the checks (training or score prefix)
        if blob.name.endswith("/") or data_file_ignore_reason(relative, settings):
            continue  # markers, temporaries and other non-data files stay in the bucket
        target = safe_target(root, blob.name, settings.max_name_bytes)
        _download(bucket.blob(blob.name, generation=blob.generation), target)
        written.append(target)
    return written
