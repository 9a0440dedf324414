"""Decoding the messages the ClickHouse engine refuses: access events as rows, user events, or invalid.

The loader never parses a message in Python on the way: the engine parses every value of a batch
(store.STAGE_SELECT). `decode_message` has the last word on the values the engine refused: user events,
unusual encodings of valid access events (staged as rows from here), and invalid messages (`InvalidEvent`:
the loader dead-letters them).
"""

from __future__ import annotations

import math
import uuid
from typing import get_args

from orjson import loads as _json_loads

from registry_shared.consumer_policy import PermanentError, decode_cloud_event
from registry_shared.events import AccessKind, FileAccessed, UserRegistered

ACCESS_TYPE = FileAccessed.event_type
USER_TYPE = UserRegistered.event_type
_KINDS = frozenset(get_args(AccessKind))
_ACCESS_KEYS = frozenset(FileAccessed.model_fields)
_OPT_STR = (str, type(None))
_MAX_INT = 2**63

#: An access event as a row: (event_id, ts in ms, user_id, kind, repo_id, version, rfilename, bytes).
AccessRow = tuple[str, int, int, str, str, str, str, int]
UserRow = tuple[int, str, str, str, int]  # user_id, email, name, role, updated_at_ms


class InvalidEvent(PermanentError, ValueError):
    """A message that is not a valid CloudEvent of the contract (dead-lettered with this error)."""


def decode_message(value: bytes | None) -> tuple[str, AccessRow | UserRow | None]:
    """Decode one Kafka message value: ("access", row), ("user", row) or ("other", None).

    The loader calls this only for the messages the engine's own parse (store.STAGE_SELECT) refused. A
    well-formed registry.file.accessed.v1 event takes a fast path of plain type checks (the same checks the
    engine makes); anything else goes through the shared decoder (registry_shared.consumer_policy), which has
    the last word. Raises InvalidEvent for anything that is not a valid CloudEvent of the contract (an id that
    is not a UUID, a type it does not know, data that does not match its type).
    """
    try:
        doc = _json_loads(value)  # type: ignore[arg-type]
    except Exception as exc:
        raise InvalidEvent(f"not JSON: {exc}") from exc
    if type(doc) is dict and doc.get("type") == ACCESS_TYPE and doc.get("specversion") == "1.0":
        data, eid = doc.get("data"), doc.get("id")
        if (
            type(data) is dict
            and type(eid) is str
            and eid
            and type(doc.get("source")) is str
            and doc.get("datacontenttype", "application/json") == "application/json"
            and data.keys() <= _ACCESS_KEYS
        ):
            uid, kind, ts, nbytes = data.get("user_id"), data.get("kind"), data.get("ts"), data.get("bytes", 0)
            repo, version, rfilename = data.get("repo_id"), data.get("version"), data.get("rfilename")
            if (
                type(uid) is int
                and 0 <= uid < _MAX_INT
                and kind in _KINDS
                and type(ts) in (float, int)
                and 0 <= ts < 1e11
                and type(nbytes) is int
                and 0 <= nbytes < _MAX_INT
                and type(repo) in _OPT_STR
                and type(version) in _OPT_STR
                and type(rfilename) in _OPT_STR
                and _is_uuid(eid)
            ):
                row = (eid, math.floor(ts * 1000), uid, kind, repo or "", version or "", rfilename or "", nbytes)
                return "access", row
    return _decode_slow(value)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _decode_slow(value: bytes | None) -> tuple[str, AccessRow | UserRow | None]:
    try:
        event, payload = decode_cloud_event(value)
    except PermanentError as exc:
        raise InvalidEvent(str(exc)) from None
    if isinstance(payload, FileAccessed):
        if not (0 <= payload.user_id < _MAX_INT and 0 <= payload.bytes < _MAX_INT and 0 <= payload.ts < 1e11):
            raise InvalidEvent("user_id, bytes and ts must be non-negative and in range")
        p = payload
        row = (
            event.id,
            math.floor(p.ts * 1000),
            p.user_id,
            p.kind,
            p.repo_id or "",
            p.version or "",
            p.rfilename or "",
        )
        return "access", (*row, p.bytes)
    if isinstance(payload, UserRegistered):
        if not 0 <= payload.user_id < _MAX_INT:
            raise InvalidEvent("user_id out of range")
        updated = math.floor(event.time.timestamp() * 1000)
        return "user", (payload.user_id, payload.email, payload.name, payload.role, updated)
    return "other", None
