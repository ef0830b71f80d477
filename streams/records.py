"""Records in and out of the worker: what it reads of the events topic, and what it sends."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One record of the events topic, as the fold sees it: its bytes and its position in the log.
    Kafka lets a producer leave out the key and the value (a tombstone): both may be None."""
    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    timestamp_ms: int
    topic: str = "crm.events"


@dataclass(frozen=True, slots=True)
class TopicRecord:
    """One record to send: its topic, key, value and headers (the partition follows from the key)."""
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
