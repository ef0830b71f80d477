"""What happens to one record of the events topic, as a pure function of the record and the state
it finds. The Faust agent (app.py) only feeds records in and sends the outputs; tests and the
replay checker call `process` directly with dictionaries as state.

Exactness under at-least-once delivery rests on two guards, both kept in state:
- `CustomerProfile.last_offset`: a record at or before it was already applied (a redelivery after a
  crash or rebalance). Its outputs are sent again, because the crash may have lost them; every
  projection row is versioned or keyed, so sending twice changes nothing.
- `seen_events[event_id]`: the producer sent this event before, at another offset. Identical
  content: a duplicate, ignored. Different content: a producer bug, dead-lettered.
The two tables are written separately, so each guard covers the case where the other's write was
lost: see `process` for the four cases."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, MutableMapping, Union

from schemas.codec import DecodeError, decode_event, fingerprint
from schemas.envelope import Envelope
from streams.profile import CustomerProfile, fold_profile


@dataclass(frozen=True, slots=True)
class SourceRecord:
    key: bytes | None
    value: bytes
    partition: int
    offset: int
    timestamp_ms: int
    topic: str = "crm.events"


@dataclass(frozen=True, slots=True)
class SeenEvent:
    fingerprint: str
    partition: int
    offset: int

    def to_list(self) -> list[Any]:
        return [self.fingerprint, self.partition, self.offset]

    @classmethod
    def from_list(cls, data: list[Any]) -> SeenEvent:
        return cls(*data)


# --- outputs ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Accepted:
    event: Envelope
    record: SourceRecord


@dataclass(frozen=True, slots=True)
class ProfileChanged:
    profile: CustomerProfile


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    detail: str
    record: SourceRecord


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Not sent anywhere; reported so that the worker can count what it ignored."""
    event_id: str
    record: SourceRecord


Output = Union[Accepted, ProfileChanged, DeadLetter, Duplicate]


def process(
    record: SourceRecord,
    profiles: MutableMapping[str, CustomerProfile],
    seen_events: MutableMapping[str, SeenEvent],
) -> list[Output]:
    decoded = decode_event(record.value)
    if isinstance(decoded, DecodeError):
        return [DeadLetter(decoded.reason, decoded.detail, record)]
    event = decoded
    if event.received_at is None:
        # Producers that write straight to Kafka: the broker's timestamp is the receipt time.
        event = event.model_copy(update={"received_at": datetime.fromtimestamp(record.timestamp_ms / 1000, UTC)})
    key = event.customer_key
    if record.key != key.encode():
        # Per-customer order and the offset guard both need every event of a customer in one partition.
        return [DeadLetter("wrong_key", f"record key {record.key!r} is not the event's customer key {key!r}", record)]

    event_id = str(event.event_id)
    content = fingerprint(event)
    seen = seen_events.get(event_id)
    profile = profiles.get(key)
    already_applied = profile is not None and profile.last_offset >= record.offset

    if seen is not None and (seen.partition, seen.offset) != (record.partition, record.offset):
        if seen.fingerprint != content:
            return [DeadLetter(
                "conflicting_duplicate",
                f"event_id {event_id} was accepted before (partition {seen.partition}, offset {seen.offset}) "
                "with different content",
                record,
            )]
        return [Duplicate(event_id, record)]

    if already_applied:
        # Redelivered record (this offset or an earlier one was applied). Make sure the marker exists,
        # and send the outputs again in case the crash lost them.
        if seen is None:
            seen_events[event_id] = SeenEvent(content, record.partition, record.offset)
        return [Accepted(event, record), ProfileChanged(profile)]  # type: ignore[arg-type]

    profile = fold_profile(profile, event, record.offset)
    profiles[key] = profile
    seen_events[event_id] = SeenEvent(content, record.partition, record.offset)
    return [Accepted(event, record), ProfileChanged(profile)]
