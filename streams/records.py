"""How each output of the pipeline becomes a record of a topic, in one place: the Faust agent sends
these, and the rebuild (projections/replay.py) feeds the same records to the projection writer's
row makers without Kafka in between."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from schemas.codec import to_json_dict
from schemas.events import money_amount
from streams import topics
from streams.pipeline import (
    Accepted, AlertChanged, BalanceChanged, BoundariesApplied, ChurnModelApplied, DeadLetter, Forward, LedgerEntry, Output, ProfileChanged,
    SegmentChanged,
)


@dataclass(frozen=True, slots=True)
class TopicRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def topic_record(output: Output) -> TopicRecord | None:
    """The record an output is sent as, or None for what is only counted (duplicates)."""
    if isinstance(output, Accepted):
        return TopicRecord(topics.ACCEPTED.name, output.record.key, accepted_value(output))
    if isinstance(output, ProfileChanged):
        profile = output.profile
        return TopicRecord(topics.PROFILES.name, profile.customer_key.encode(), orjson.dumps(profile.to_record()))
    if isinstance(output, LedgerEntry):
        return TopicRecord(topics.POINTS_LEDGER.name, output.customer_key.encode(), orjson.dumps(output.data))
    if isinstance(output, SegmentChanged):
        return TopicRecord(topics.SEGMENT_CHANGES.name, output.customer_key.encode(), orjson.dumps(output.data))
    if isinstance(output, BoundariesApplied):
        return TopicRecord(topics.SEGMENT_CHANGES.name, output.boundaries_id.encode(), orjson.dumps(output.data))
    if isinstance(output, AlertChanged):
        return TopicRecord(topics.ALERTS.name, output.customer_key.encode(), orjson.dumps(output.data))
    if isinstance(output, ChurnModelApplied):
        return TopicRecord(topics.CHURN_MODELS.name, output.model_id.encode(), orjson.dumps(output.data))
    if isinstance(output, BalanceChanged):
        return TopicRecord(topics.POINTS_BALANCES.name, output.customer_key.encode(), orjson.dumps(output.data))
    if isinstance(output, Forward):
        return TopicRecord(topics.EVENTS.name, output.key.encode(), orjson.dumps(output.record))
    if isinstance(output, DeadLetter):
        return TopicRecord(topics.DEAD_LETTERS.name, output.record.key, output.record.value, dead_letter_headers(output))
    return None


def dead_letter_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    record = letter.record
    return [
        ("crm.dlq.reason", letter.reason.encode()),
        ("crm.dlq.detail", letter.detail.encode()[:4000]),
        ("crm.dlq.source.topic", record.topic.encode()),
        ("crm.dlq.source.partition", str(record.partition).encode()),
        ("crm.dlq.source.offset", str(record.offset).encode()),
        ("crm.dlq.source.timestamp", str(record.timestamp_ms).encode()),
    ]


def accepted_value(output: Accepted) -> bytes:
    """The accepted event plus what the events table needs and should not re-derive."""
    event = output.event
    amount, currency = money_amount(getattr(event, "payload", None)) or (0, "")
    return orjson.dumps({
        "event": to_json_dict(event),
        "customer_key": event.customer_key,
        "attributed_from": output.attributed_from,
        "amount": str(amount),
        "currency": currency,
        "partition": output.record.partition,
        "offset": output.record.offset,
    })
