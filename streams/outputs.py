"""What the fold emits. Each output knows the record it is sent as (`to_record`): its topic, key
and value, so adding an output kind touches this file and the fold that makes it. The Faust worker
sends these records; the rebuild (projections/replay.py) feeds them to the projection writer's row
makers without Kafka in between.

An erasure (streams/erasure.py) emits a tombstone per data key of the customer for the keys topic
(`KeyShredded`) and what it did for the erasures topic (`Erased`).

Snapshots (`SNAPSHOT = True`: a profile, a points balance) carry a customer's whole current value
under a version; only the last one of a batch per key needs sending (`coalesce`). Everything else is
a fact (an accepted event, a ledger movement, a segment or alert change, a dead letter) and is sent,
every one, in order."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import orjson

from privacy.fields import redact
from schemas.codec import to_json_dict
from schemas.envelope import Envelope
from schemas.events import money_amount
from streams import topics
from streams.profile import CustomerProfile
from streams.records import SourceRecord, TopicRecord


@dataclass(frozen=True, slots=True)
class Accepted:
    event: Envelope
    record: SourceRecord
    attributed_from: str = ""  # the alias key, for an event that came with only an alias
    SNAPSHOT: ClassVar[bool] = False

    def to_record(self) -> TopicRecord:
        """The accepted event plus what the events table needs and should not re-derive."""
        event = self.event
        amount, currency = money_amount(getattr(event, "payload", None)) or (0, "")
        value = orjson.dumps({
            "event": to_json_dict(event),
            "customer_key": event.customer_key,
            "attributed_from": self.attributed_from,
            "amount": str(amount),
            "currency": currency,
            "partition": self.record.partition,
            "offset": self.record.offset,
        })
        return TopicRecord(topics.ACCEPTED.name, self.record.key, value)


@dataclass(frozen=True, slots=True)
class ProfileChanged:
    profile: CustomerProfile
    SNAPSHOT: ClassVar[bool] = True

    def to_record(self) -> TopicRecord:
        profile = self.profile
        return TopicRecord(topics.PROFILES.name, profile.customer_key.encode(), orjson.dumps(profile.to_record()))


@dataclass(frozen=True, slots=True)
class BalanceChanged:
    customer_key: str
    data: dict[str, Any]
    SNAPSHOT: ClassVar[bool] = True

    def to_record(self) -> TopicRecord:
        return TopicRecord(topics.POINTS_BALANCES.name, self.customer_key.encode(), orjson.dumps(self.data))


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A points movement or a tier change (`data["entry"]` says which), for the ledger topic."""
    customer_key: str
    data: dict[str, Any]
    SNAPSHOT: ClassVar[bool] = False

    def to_record(self) -> TopicRecord:
        return TopicRecord(topics.POINTS_LEDGER.name, self.customer_key.encode(), orjson.dumps(self.data))


@dataclass(frozen=True, slots=True)
class SegmentChanged:
    """A customer entered a segment (and left the previous one), for the segment-changes topic."""
    customer_key: str
    data: dict[str, Any]
    SNAPSHOT: ClassVar[bool] = False

    def to_record(self) -> TopicRecord:
        return TopicRecord(topics.SEGMENT_CHANGES.name, self.customer_key.encode(), orjson.dumps(self.data))


@dataclass(frozen=True, slots=True)
class BoundariesApplied:
    """Segment boundaries now in force in a partition, for the segment-changes topic (keyed by the
    boundaries id: every partition sends the same row)."""
    boundaries_id: str
    data: dict[str, Any]
    SNAPSHOT: ClassVar[bool] = False

    def to_record(self) -> TopicRecord:
        return TopicRecord(topics.SEGMENT_CHANGES.name, self.boundaries_id.encode(), orjson.dumps(self.data))


@dataclass(frozen=True, slots=True)
class AlertChanged:
    """A churn alert opened, updated, resolved or expired (schemas/alerts.py AlertChange), for the
    alerts topic."""
    customer_key: str
    data: dict[str, Any]
    SNAPSHOT: ClassVar[bool] = False

    def to_record(self) -> TopicRecord:
        return TopicRecord(topics.ALERTS.name, self.customer_key.encode(), orjson.dumps(self.data))


@dataclass(frozen=True, slots=True)
class ChurnModelApplied:
    """A churn model now in force in a partition, for the churn-models topic (keyed by model id)."""
    model_id: str
    data: dict[str, Any]
    SNAPSHOT: ClassVar[bool] = False

    def to_record(self) -> TopicRecord:
        return TopicRecord(topics.CHURN_MODELS.name, self.model_id.encode(), orjson.dumps(self.data))


@dataclass(frozen=True, slots=True)
class Forward:
    """A record the worker appends to the events topic itself (schemas/identity.py)."""
    key: str
    record: dict[str, Any]
    SNAPSHOT: ClassVar[bool] = False

    @property
    def data(self) -> dict[str, Any]:
        return {"entry": "forward", "key": self.key, "record": self.record}

    def to_record(self) -> TopicRecord:
        return TopicRecord(topics.EVENTS.name, self.key.encode(), orjson.dumps(self.record))


@dataclass(frozen=True, slots=True)
class KeyShredded:
    """A data key erased: a tombstone for it in crm.customer-keys (key: the key id, no value), which
    every key store applies within a poll and compaction then removes (privacy/keystore.py)."""
    customer_key: str
    key_id: str
    SNAPSHOT: ClassVar[bool] = False

    @property
    def data(self) -> dict[str, Any]:
        return {"entry": "key_shredded", "key_id": self.key_id}

    def to_record(self) -> TopicRecord:
        return TopicRecord(topics.CUSTOMER_KEYS.name, self.key_id.encode(), None)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Erased:
    """What an erasure did (schemas/privacy.py CustomerErased, as JSON), for crm.erasures keyed by customer."""
    customer_key: str
    data: dict[str, Any]
    SNAPSHOT: ClassVar[bool] = False

    def to_record(self) -> TopicRecord:
        return TopicRecord(topics.ERASURES.name, self.customer_key.encode(), orjson.dumps(self.data))


# Kafka refuses a record of more than about a megabyte (the broker's message.max.bytes), and the
# events topic takes records up to that size: a dead letter carries the head of a larger original,
# with the original's size in the header crm.dlq.truncated_from (as the ingestion API's do).
MAX_DEAD_LETTER_BYTES = 900 * 1024


REDACTED_HEADER = "crm.dlq.redacted"


def redacted_value(value: bytes | None) -> bytes | None:
    """The bytes a dead letter may keep of a refused record: when they are a JSON object that holds
    plain personal values (a payload's personal fields, plain e-mail or phone identifiers, also inside
    an attributed record's `event`), the object with each such value replaced by `[redacted]`
    (privacy/fields.py redact); otherwise None (keep the original). The original stays in crm.events
    at the source position the headers name, under the retention of that log."""
    if not value or value.lstrip()[:1] != b"{":
        return None
    try:
        item = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(item, dict):
        return None
    cleaned = redact(item)
    inner = cleaned.get("event")
    if isinstance(inner, dict):
        cleaned["event"] = redact(inner)
    return None if cleaned == item else orjson.dumps(cleaned)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record the worker could not accept: the original bytes (at most MAX_DEAD_LETTER_BYTES of
    them) with any plain personal value redacted (header crm.dlq.redacted), the reason and the position."""
    reason: str
    detail: str
    record: SourceRecord
    SNAPSHOT: ClassVar[bool] = False

    def to_record(self) -> TopicRecord:
        value = self.record.value
        headers = self.headers()
        redacted = redacted_value(value)
        if redacted is not None:
            value = redacted
            headers.append((REDACTED_HEADER, b"plain personal values replaced by [redacted]; the original is at "
                                             b"the source position"))
        if value is not None and len(value) > MAX_DEAD_LETTER_BYTES:
            headers.append(("crm.dlq.truncated_from", str(len(value)).encode()))
            value = value[:MAX_DEAD_LETTER_BYTES]
        return TopicRecord(topics.DEAD_LETTERS.name, self.record.key, value, headers)

    def headers(self) -> list[tuple[str, bytes]]:
        record = self.record
        return [
            ("crm.dlq.reason", self.reason.encode()),
            ("crm.dlq.detail", self.detail.encode()[:4000]),
            ("crm.dlq.source.topic", record.topic.encode()),
            ("crm.dlq.source.partition", str(record.partition).encode()),
            ("crm.dlq.source.offset", str(record.offset).encode()),
            ("crm.dlq.source.timestamp", str(record.timestamp_ms).encode()),
        ]


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Not sent anywhere; reported so that the worker can count what it ignored."""
    event_id: str
    record: SourceRecord
    SNAPSHOT: ClassVar[bool] = False

    def to_record(self) -> None:
        return None


Output = Union[Accepted, ProfileChanged, LedgerEntry, SegmentChanged, BoundariesApplied, AlertChanged,
               ChurnModelApplied, Forward, BalanceChanged, KeyShredded, Erased, DeadLetter, Duplicate]
# Outputs that are not snapshots: kept in the customer's outbox until their record is committed.
OUTBOX = (LedgerEntry, SegmentChanged, AlertChanged, Forward, KeyShredded, Erased)


def processing_error(record: SourceRecord, exc: BaseException) -> DeadLetter:
    """The dead letter for a record whose fold raised: the exception and where it came from, in
    short (the last frames), so that an operator can find the bug without the worker's log."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}" for frame in reversed(frames))
    return DeadLetter("processing_error", f"{type(exc).__name__}: {exc}"[:1000] + f" at {where}", record)


def coalesce(outputs: list[Output]) -> list[Output]:
    """The outputs of a batch with each snapshot kept only at its last occurrence per (kind, key):
    a later snapshot supersedes every earlier one, and its position among the facts is the latest."""
    last: dict[tuple[type, str], int] = {}
    for index, output in enumerate(outputs):
        if output.SNAPSHOT:
            last[(type(output), _snapshot_key(output))] = index
    if len(last) == sum(1 for output in outputs if output.SNAPSHOT):
        return outputs
    keep = set(last.values())
    return [output for index, output in enumerate(outputs) if not output.SNAPSHOT or index in keep]


def _snapshot_key(output: Output) -> str:
    return output.profile.customer_key if isinstance(output, ProfileChanged) else output.customer_key  # type: ignore[union-attr]
