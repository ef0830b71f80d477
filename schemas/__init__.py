"""The event catalog: the envelope every event shares, one payload model per event type,
and the codec that turns bytes on the events topic into validated events (or a reason why not).

Nothing here knows about Kafka, Faust or ClickHouse; everything else imports from here."""

from schemas.codec import DecodeError, decode_event, encode_event, fingerprint
from schemas.envelope import Channel, Identifiers, Source, personal_fields
from schemas.events import EVENT_TYPES, Event, event_model

__all__ = [
    "Channel", "DecodeError", "EVENT_TYPES", "Event", "Identifiers", "Source",
    "decode_event", "encode_event", "event_model", "fingerprint", "personal_fields",
]
