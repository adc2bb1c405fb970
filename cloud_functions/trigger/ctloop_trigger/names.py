"""What a notification means: reject unsafe input, ignore irrelevant objects, or name the batch to train on.

Object names are attacker-controlled text. Nothing here builds a path or a query: ``check_name`` only proves a
name safe to carry (as a URI and as a relative path below a directory we own), and ``decide`` applies the
configured filters. Rejections and ignores are both acknowledged; the difference is the log severity.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from ctloop_trigger.notification import OBJECT_FINALIZE, Notification
from ctloop_trigger.settings import TriggerSettings

_GENERATION = re.compile(r"^[1-9][0-9]{0,18}$")  # a positive int64
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
# Cc control, Cf format (bidi overrides, zero-width), Cs surrogates: never legitimate in a data file's name.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})


class UnsafeName(ValueError):
    """The object name or an attribute is unsafe to use; the message says why."""


@dataclass(frozen=True)
class Decision:
    action: Literal["launch", "ignore", "reject"]
    reason: str
    batch: str = ""  # launch: the folder (batch mode) or the object itself, as gs://bucket/name
    score: bool = False  # launch: the object landed under the score prefix: a scoring run over ``batch``


def check_name(name: str, max_bytes: int) -> None:
    """Raise UnsafeName unless ``name`` is a plain relative object path with no traversal or control chars."""
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise UnsafeName(f"object name is {size} bytes, longer than the {max_bytes}-byte limit")
    for ch in name:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise UnsafeName(f"object name contains control/format character U+{ord(ch):04X}")
    if "\\" in name:
        raise UnsafeName("object name contains a backslash")
    if name.startswith("/"):
        raise UnsafeName("object name is absolute (starts with '/')")
    if re.match(r"^[A-Za-z]:", name):
        raise UnsafeName("object name starts with a drive letter")
    segments = name.split("/")
    if any(seg in (".", "..") for seg in segments):
        raise UnsafeName("object name has a '.' or '..' path segment")
    if any(seg == "" for seg in segments[:-1]):
        raise UnsafeName("object name has an empty path segment ('//')")


def check_attributes(note: Notification, max_bytes: int) -> None:
    if not _BUCKET.match(note.bucket):
        raise UnsafeName(f"bucket {note.bucket!r:.80} is not a valid bucket name")
    if not _GENERATION.match(note.generation):
        raise UnsafeName(f"generation {note.generation!r:.40} is not a positive integer")
    check_name(note.name, max_bytes)


def _hidden_segment(relative: str) -> str | None:
    """The first folder or file name starting with '_' or '.' (Spark/Hadoop temporaries, dotfiles)."""
    for seg in relative.split("/"):
        if seg.startswith(("_", ".")):
            return seg
    return None


def data_file_ignore_reason(relative: str, settings: TriggerSettings) -> str | None:
    """Why the object at ``relative`` (below the prefix) is not a data file, or None when it is one."""
    hidden = _hidden_segment(relative)
    if hidden:
        return f"temporary/hidden name segment {hidden!r}"
    base = relative.rpartition("/")[2]
    for suffix in settings.ignore_suffixes:
        if base.endswith(suffix):
            return f"partial/temporary file suffix {suffix!r}"
    if settings.suffixes and not base.endswith(settings.suffixes):
        return f"suffix not one of {list(settings.suffixes)}"
    return None


def decide(note: Notification, settings: TriggerSettings) -> Decision:
    """Reject, ignore, or launch; the first matching rule wins and its reason is logged.

    Objects under the training prefix are new training data; objects under the score prefix (when set) are
    rows to score. Both follow the same batch rules (markers, or one object = one batch)."""
    try:
        check_attributes(note, settings.max_name_bytes)
    except UnsafeName as exc:
        return Decision("reject", str(exc))
    if note.event_type != OBJECT_FINALIZE:
        return Decision("ignore", f"event type {note.event_type!r:.60} is not {OBJECT_FINALIZE}")
    if note.bucket != settings.bucket:
        return Decision("ignore", f"bucket {note.bucket!r} is not the watched bucket {settings.bucket!r}")
    score = bool(settings.score_prefix) and note.name.startswith(settings.score_prefix)
    prefix = settings.score_prefix if score else settings.prefix
    if not note.name.startswith(prefix):
        return Decision("reject", f"object is outside the watched prefix {settings.prefix!r}"
                        + (f" and the score prefix {settings.score_prefix!r}" if settings.score_prefix else ""))
    what = "batch to score" if score else "batch"
    relative = note.name[len(prefix):]
    if not relative or note.name.endswith("/"):
        return Decision("ignore", "folder placeholder object")
    folder, _, base = relative.rpartition("/")
    if settings.batch_mode:
        if base not in settings.markers:
            return Decision("ignore", f"not a batch marker {list(settings.markers)}; waiting for one")
        hidden = _hidden_segment(folder) if folder else None
        if hidden:
            return Decision("ignore", f"marker inside temporary/hidden folder {hidden!r}")
        batch_folder = note.name[: len(note.name) - len(base)]
        if settings.name_pattern and not settings.name_pattern.fullmatch(batch_folder):
            return Decision("reject", "batch folder does not match the configured name pattern")
        return Decision("launch", f"{what} marker landed", batch=f"gs://{note.bucket}/{batch_folder}", score=score)
    reason = data_file_ignore_reason(relative, settings)
    if reason:
        return Decision("ignore", reason)
    if settings.name_pattern and not settings.name_pattern.fullmatch(note.name):
        return Decision("reject", "object name does not match the configured name pattern")
    return Decision("launch", "new object to score" if score else "new object",
                    batch=f"gs://{note.bucket}/{note.name}", score=score)
