"""Shared helpers for the trigger tests: import the function bundle as deployed, build notifications."""

from __future__ import annotations

import base64
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRIGGER_DIR = REPO / "cloud_functions" / "trigger"
TRIGGER_MAIN = TRIGGER_DIR / "main.py"
ENTRY_POINT = "on_object_finalized"



def bundle_on_sys_path() -> None:
    """functions-framework puts the source directory on sys.path; the in-process tests do the same."""
    if str(TRIGGER_DIR) not in sys.path:
        sys.path.insert(0, str(TRIGGER_DIR))


MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"


def object_resource(bucket: str, name: str, generation: str, **extra: Any) -> dict[str, Any]:
    """A full JSON_API_V1 object resource, as real Cloud Storage notifications carry it."""
    resource = {
        "kind": "storage#object",
        "id": f"{bucket}/{name}/{generation}",
        "selfLink": f"https://www.googleapis.com/storage/v1/b/{bucket}/o/{name}",
        "name": name,
        "bucket": bucket,
        "generation": generation,
        "metageneration": "1",
        "contentType": "application/octet-stream",
        "timeCreated": "2025-03-01T10:00:00.000Z",
        "updated": "2025-03-01T10:00:00.000Z",
        "storageClass": "STANDARD",
        "timeStorageClassUpdated": "2025-03-01T10:00:00.000Z",
        "size": "1024",
        "md5Hash": "XUFAKrxLKna5cZ2REBfFkg==",
        "mediaLink": f"https://storage.googleapis.com/download/storage/v1/b/{bucket}/o/{name}?generation="
                     f"{generation}&alt=media",
        "crc32c": "mnG7TA==",
        "etag": "CJ/S3qmF+4oDEAE=",
    }
    resource.update(extra)
    return resource


def notification_attributes(bucket: str, name: str, generation: str,
                            event_type: str = "OBJECT_FINALIZE") -> dict[str, str]:
    """The attributes real Cloud Storage notifications set (notificationConfig included)."""
    return {
        "notificationConfig": f"projects/_/buckets/{bucket}/notificationConfigs/1",
        "eventType": event_type,
        "payloadFormat": "JSON_API_V1",
        "bucketId": bucket,
        "objectId": name,
        "objectGeneration": generation,
        "eventTime": "2025-03-01T10:00:00.123456Z",
    }


def b64json(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def cloud_event(bucket: str, name: str, generation: str, *, event_type: str = "OBJECT_FINALIZE",
                attributes: dict[str, Any] | None = None, data: str | None = None,
                event_id: str = "1234567890", ce_type: str = MESSAGE_PUBLISHED) -> Any:
    """The CloudEvent Eventarc delivers for a Pub/Sub message carrying a Cloud Storage notification."""
    from cloudevents.http import CloudEvent

    attrs = attributes
    if attrs is None:
        attrs = notification_attributes(bucket, name, generation, event_type)
    message = {
        "attributes": attrs,
        "data": data if data is not None else b64json(object_resource(bucket, name, generation)),
        "messageId": event_id,
        "message_id": event_id,
        "publishTime": "2025-03-01T10:00:00.200Z",
        "publish_time": "2025-03-01T10:00:00.200Z",
    }
    return CloudEvent(
        {"type": ce_type, "source": "//pubsub.googleapis.com/projects/proj-one/topics/ctloop-landing",
         "id": event_id, "specversion": "1.0"},
        {"message": message, "subscription": "projects/proj-one/subscriptions/eventarc-trigger-sub"},
    )


RECORDER = textwrap.dedent('''\
    """Stands in for the pipeline CLI: records its argv and exits."""
    import json, os, sys, time
    out = sys.argv[1]
    record = {"argv": sys.argv[2:], "pid": os.getpid(), "cwd": os.getcwd(), "time": time.time()}
    path = os.path.join(out, f"{sys.argv[2]}-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
''')


def write_recorder(directory: Path) -> tuple[Path, Path]:
    """A launch-command stand-in; returns (script, records dir)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "record_launch.py"
    script.write_text(RECORDER)
    records = directory / "launches"
    records.mkdir(exist_ok=True)
    return script, records


def recorded_launches(records: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]


TEMPLATE_SOURCE = """
from kfp import compiler, dsl

@dsl.component(base_image="python:3.11")
def record(config: dict, run_id: str, trigger_uri: str) -> str:
    return run_id

@dsl.pipeline(name="ctloop-training")
def training(config: dict, run_id: str, snapshot_time: str = "", trigger_uri: str = ""):
    record(config=config, run_id=run_id, trigger_uri=trigger_uri)

compiler.Compiler().compile(training, OUT)
"""


def compile_tiny_template(folder: Path) -> Path:
    """A compiled pipeline with the training pipeline's parameters, for launch tests.

    kfp needs real annotations and reads the component's source from its file, so the pipeline lives in a
    module written to ``folder`` (the test modules postpone annotations).
    """
    import importlib.util

    path = folder / "training.yaml"
    source = folder / "tiny_pipeline.py"
    source.write_text(f"OUT = {str(path)!r}\n{TEMPLATE_SOURCE}")
    spec = importlib.util.spec_from_file_location("tiny_pipeline", source)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return path
