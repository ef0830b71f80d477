"""`crm dlq`: the dead-letter topic for operators. Every record the platform refused is there (from
the worker: the original record value; from the ingestion API: the refused event as sent), with
the reason, detail and source in its headers. List them, look at one, and once the cause is fixed
(or the event corrected by hand) send it again: it is checked like any event before it goes back to
`crm.events`, keyed by its customer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pydantic import ValidationError

from privacy.fields import REDACTED
from schemas.codec import DecodeError, decode_event
from schemas.envelope import Envelope
from schemas.events import submitted_model
from streams import topics
from streams.config import Settings


@dataclass(frozen=True)
class Letter:
    offset: int
    timestamp_ms: int
    headers: dict[str, str]
    key: bytes | None
    value: bytes

    @property
    def reason(self) -> str:
        return self.headers.get("crm.dlq.reason", "unknown")

    @property
    def source(self) -> str:
        if self.headers.get("crm.dlq.source.topic") == "api":
            return f"api key {self.headers.get('crm.dlq.api.key_id', '?')} ({self.headers.get('crm.dlq.api.source', '')})"
        return (f"{self.headers.get('crm.dlq.source.topic', '?')}[{self.headers.get('crm.dlq.source.partition', '?')}]"
                f"@{self.headers.get('crm.dlq.source.offset', '?')}")


def read(settings: Settings, reason: str | None = None, limit: int | None = None, offset: int | None = None) -> list[Letter]:
    """Dead letters from the start of the topic (the one at `offset` only, when given)."""
    partition = TopicPartition(topics.DEAD_LETTERS.name, 0)
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=3000)
    try:
        consumer.assign([partition])
        end = consumer.end_offsets([partition])[partition]
        consumer.seek(partition, offset if offset is not None else 0)
        letters: list[Letter] = []
        while consumer.position(partition) < end:
            for record in consumer.poll(timeout_ms=2000).get(partition, []):
                letter = Letter(record.offset, record.timestamp,
                                {name: value.decode(errors="replace") for name, value in record.headers or []},
                                record.key, record.value or b"")
                if offset is not None:
                    return [letter] if letter.offset == offset else []
                if reason is None or letter.reason == reason:
                    letters.append(letter)
                if limit is not None and len(letters) >= limit:
                    return letters
        return letters
    finally:
        consumer.close()


@dataclass(frozen=True)
class Resubmitted:
    topic: str
    customer_key: str
    event_id: str
    type: str


def resubmit(settings: Settings, letter: Letter, corrected: Path | None = None) -> Resubmitted | DecodeError:
    """Send the letter's event (or the corrected one in `corrected`) again, if it now passes the event
    catalog; returns where it went, or why it still does not pass. An event with plain personal values
    (a corrected file; dead letters keep them only redacted) goes to crm.intake, whose agent checks
    and seals it (docs/intake.md); any other to crm.events."""
    raw = corrected.read_bytes() if corrected else letter.value
    decoded = decode_event(raw)
    topic = topics.EVENTS.name
    if isinstance(decoded, DecodeError) and decoded.reason == "personal_data_in_clear":
        if REDACTED.encode() in raw:
            return DecodeError("redacted", "the dead letter keeps personal values only as [redacted]: give the "
                                           "corrected event with --file")
        submitted = _submitted(raw)
        if isinstance(submitted, DecodeError):
            return submitted
        decoded, topic = submitted, topics.INTAKE.name
    if isinstance(decoded, DecodeError):
        return decoded
    if not isinstance(decoded, Envelope):
        return DecodeError("not_an_event", "only customer events can be sent again")
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    try:
        producer.send(topic, key=decoded.customer_key.encode(), value=raw).get(timeout=30)
    finally:
        producer.close()
    return Resubmitted(topic, decoded.customer_key, str(decoded.event_id), decoded.type)


def _submitted(raw: bytes) -> Envelope | DecodeError:
    """The event in its submitted form (plain personal values), as the intake will check it."""
    data = orjson.loads(raw)
    model = submitted_model(data.get("type"), data.get("schema_version", 1))
    try:
        return model.model_validate(data)  # type: ignore[union-attr]
    except (ValidationError, AttributeError) as exc:
        return DecodeError("schema_invalid", str(exc)[:500])


def describe(letter: Letter) -> dict[str, Any]:
    try:
        body: Any = orjson.loads(letter.value)
    except orjson.JSONDecodeError:
        body = letter.value.decode(errors="replace")
    return {"offset": letter.offset, "reason": letter.reason, "detail": letter.headers.get("crm.dlq.detail", ""),
            "source": letter.source, "key": (letter.key or b"").decode(errors="replace"), "headers": letter.headers,
            "original": body}
