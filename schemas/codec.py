"""Bytes <-> events. Decoding never raises: it returns the event or a DecodeError naming the reason,
which is what the dead-letter record carries."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.alerts import CHURN_MODEL_TYPE, ChurnModelPublished
from schemas.boundaries import SEGMENT_BOUNDARIES_TYPE, SegmentBoundaries
from schemas.clock import CLOCK_TICK_TYPE, ClockTick
from schemas.identity import (
    ALIAS_EVENT_ATTRIBUTED_TYPE, ALIAS_LINKED_TYPE, ALIAS_UNLINKED_TYPE, AliasEventAttributed, AliasLinked, AliasUnlinked,
)
from schemas.envelope import EARLIEST_EVENT_TIME, LATEST_EVENT_TIME, SEALED_PREFIX, Envelope
from schemas.events import EVENT_TYPES, event_model, personal_payload_fields

MAX_EVENT_BYTES = 256 * 1024


@dataclass(frozen=True)
class DecodeError:
    reason: str  # machine-readable: malformed_json, not_an_object, unknown_type, ...
    detail: str  # for a person: what exactly is wrong

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


# Records that the platform itself appends to the events topic; they name no customer.
SystemRecord = ClockTick | SegmentBoundaries | ChurnModelPublished | AliasLinked | AliasEventAttributed | AliasUnlinked
SYSTEM_RECORDS: dict[str, type[SystemRecord]] = {
    CLOCK_TICK_TYPE: ClockTick, SEGMENT_BOUNDARIES_TYPE: SegmentBoundaries, ALIAS_LINKED_TYPE: AliasLinked,
    ALIAS_EVENT_ATTRIBUTED_TYPE: AliasEventAttributed, CHURN_MODEL_TYPE: ChurnModelPublished,
    ALIAS_UNLINKED_TYPE: AliasUnlinked,
}


def decode_event(raw: bytes | None) -> Envelope | SystemRecord | DecodeError:
    """The record a value of the events topic holds; None is a tombstone (a record without a value)."""
    if raw is None:
        return DecodeError("malformed_json", "the record has no value (a tombstone)")
    if len(raw) > MAX_EVENT_BYTES:
        return DecodeError("too_large", f"{len(raw)} bytes, the limit is {MAX_EVENT_BYTES}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return DecodeError("malformed_json", str(exc))
    if not isinstance(data, dict):
        return DecodeError("not_an_object", f"top level is {type(data).__name__}, expected an object")
    type_name = data.get("type")
    if type_name in SYSTEM_RECORDS:
        try:
            record = SYSTEM_RECORDS[type_name].model_validate(data)
        except ValidationError as exc:
            return DecodeError("schema_invalid", _describe(exc))
        return out_of_time(record) or record
    return decode_catalog_event(data)


def decode_catalog_event(data: dict[str, Any]) -> Envelope | DecodeError:
    type_name = data.get("type")
    if type_name not in EVENT_TYPES:
        return DecodeError("unknown_type", f"type {type_name!r} is not in the event catalog")
    version = data.get("schema_version", 1)
    model = event_model(type_name, version) if isinstance(version, int) else None
    if model is None:
        return DecodeError("unsupported_schema_version", f"{type_name} has no schema_version {version!r}")
    plain = _plain_personal_fields(type_name, data.get("payload"))
    if plain:
        return DecodeError("personal_data_in_clear", f"{', '.join(plain)}: personal fields enter the log only sealed; "
                                                     f"send through the ingestion API or crm.intake (docs/privacy.md)")
    try:
        event = model.model_validate(data)
    except ValidationError as exc:
        return DecodeError("schema_invalid", _describe(exc))
    return out_of_time(event) or event


def _plain_personal_fields(type_name: str, payload: Any) -> list[str]:
    if not isinstance(payload, dict):
        return []
    return [f"payload.{name}" for name in personal_payload_fields(type_name)
            if payload.get(name) is not None and not (isinstance(payload[name], str) and payload[name].startswith(SEALED_PREFIX))]


def out_of_time(record: Envelope | SystemRecord) -> DecodeError | None:
    """The refusal of a record whose `occurred_at` or `received_at` is outside the event times the
    projections can store (schemas/envelope.py EARLIEST_EVENT_TIME, LATEST_EVENT_TIME); None if in."""
    for name in ("occurred_at", "received_at"):
        moment = getattr(record, name, None)
        if moment is not None and not EARLIEST_EVENT_TIME <= moment <= LATEST_EVENT_TIME:
            return DecodeError("schema_invalid", f"{name}: {moment.isoformat()} is outside the event times the "
                                                 f"platform stores, {EARLIEST_EVENT_TIME.isoformat()} to "
                                                 f"{LATEST_EVENT_TIME.isoformat()}")
    return None


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"]) or "(event)"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


def to_json_dict(event: Envelope) -> dict[str, Any]:
    return event.model_dump(mode="json", exclude_none=True)


def encode_event(event: Envelope) -> bytes:
    return orjson.dumps(to_json_dict(event))


def fingerprint(event: Envelope) -> str:
    """Identity of an event's content, ignoring received_at (a retried send gets a new one).
    Two deliveries with one event_id and one fingerprint are the same event."""
    content = to_json_dict(event)
    content.pop("received_at", None)
    return hashlib.blake2b(orjson.dumps(content, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()
