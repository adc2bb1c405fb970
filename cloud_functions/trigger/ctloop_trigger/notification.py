"""Parse a Pub/Sub ``messagePublished`` CloudEvent carrying a Cloud Storage notification.

Accepts both the real format (Eventarc: attributes + base64 JSON_API_V1 object resource,
``notificationConfig``, ``message_id`` twins) and the thinner one the GCS emulator sends. Everything here is
untrusted input: the result only holds type-checked strings; their content is validated by ``names``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

MESSAGE_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
OBJECT_FINALIZE = "OBJECT_FINALIZE"
MAX_PAYLOAD_BYTES = 1 << 20  # an object resource is a few KB; anything this large is not a notification


class MalformedMessage(ValueError):
    """The message cannot be a Cloud Storage notification: acknowledge it, never retry."""


@dataclass(frozen=True)
class Notification:
    event_id: str
    event_type: str  # OBJECT_FINALIZE, OBJECT_DELETE, ...
    bucket: str
    name: str
    generation: str
    payload_format: str
    resource: dict[str, Any]  # the decoded object resource ({} when the payload format is NONE)


def _get(obj: Any, key: str) -> Any:
    """CloudEvent objects (cloudevents SDK) and plain dicts alike."""
    if isinstance(obj, dict):
        return obj.get(key)
    try:
        return obj[key]
    except (KeyError, TypeError):
        return getattr(obj, key, None)


def _message(event: Any) -> dict[str, Any]:
    data = getattr(event, "data", None) if not isinstance(event, dict) else event.get("data")
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise MalformedMessage("event data is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("message"), dict):
        raise MalformedMessage("event data has no Pub/Sub 'message' object")
    return data["message"]


def _payload(message: dict[str, Any]) -> dict[str, Any]:
    raw = message.get("data")
    if raw in (None, ""):
        return {}
    if not isinstance(raw, str):
        raise MalformedMessage(f"message data: expected a base64 string, found {type(raw).__name__}")
    if len(raw) > MAX_PAYLOAD_BYTES * 4 // 3 + 4:
        raise MalformedMessage(f"message data: {len(raw)} base64 chars is larger than any object resource")
    try:
        decoded = base64.b64decode(raw, validate=True)
        resource = json.loads(decoded)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise MalformedMessage("message data: expected base64 of an object resource JSON") from None
    if not isinstance(resource, dict):
        raise MalformedMessage(f"message data: expected a JSON object, found {type(resource).__name__}")
    return resource


def _text(value: Any, what: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and what == "generation":
        return str(value)
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f"{what}: expected a non-empty string, found {value!r:.80}")
    return value


def parse_event(event: Any) -> Notification:
    """The notification inside ``event``; raises MalformedMessage saying what is missing or inconsistent."""
    event_type = _get(event, "type")
    if event_type != MESSAGE_PUBLISHED:
        raise MalformedMessage(f"event type: expected {MESSAGE_PUBLISHED}, found {event_type!r:.120}")
    event_id = str(_get(event, "id") or "")
    message = _message(event)
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise MalformedMessage(f"message attributes: expected an object, found {type(attributes).__name__}")
    default_format = "JSON_API_V1" if message.get("data") else "NONE"
    payload_format = str(attributes.get("payloadFormat") or default_format)
    resource = _payload(message) if payload_format == "JSON_API_V1" else {}
    # Attributes are authoritative (in every real notification); the payload fills gaps and must agree.
    fields = {"bucket": ("bucketId", "bucket"), "name": ("objectId", "name"),
              "generation": ("objectGeneration", "generation")}
    values: dict[str, str] = {}
    for what, (attr_key, res_key) in fields.items():
        attr, res = attributes.get(attr_key), resource.get(res_key)
        if attr is not None and res is not None and str(attr) != str(res):
            raise MalformedMessage(f"{what}: attribute {attr_key}={attr!r:.80} disagrees with the payload's "
                                   f"{res_key}={res!r:.80}")
        values[what] = _text(attr if attr is not None else res, what)
    notification_type = attributes.get("eventType")
    if not isinstance(notification_type, str) or not notification_type:
        raise MalformedMessage("attribute eventType: missing; not a Cloud Storage notification")
    return Notification(
        event_id=event_id or str(message.get("messageId") or message.get("message_id") or ""),
        event_type=notification_type,
        bucket=values["bucket"],
        name=values["name"],
        generation=values["generation"],
        payload_format=payload_format,
        resource=resource,
    )
