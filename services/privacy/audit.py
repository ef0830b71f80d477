"""The audit of personal-data access: one AuditRecord (schemas/privacy.py) per support read, export,
erasure request and master key rotation, allowed or refused, on topic crm.audit (kept forever; the
projection writer copies it into the `audit_log` table, which analysts can read but not change).

The same records from the API (aiokafka, `await send_and_wait`) and the command line (kafka-python):
`build` makes one, `encode` gives its Kafka key and value. A request is answered only after its
record is acknowledged, so no personal data leaves without its audit."""

from __future__ import annotations

import getpass
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.privacy import AuditRecord
from streams import topics

TOPIC = topics.AUDIT.name
NO_REASON = "(no reason given)"


def build(actor: str, role: str, action: str, outcome: str, customer_key: str = "", reason: str | None = None,
          detail: str = "", at: datetime | None = None) -> AuditRecord:
    return AuditRecord(audit_id=uuid.uuid4(), at=at or datetime.now(UTC), actor=actor or "unknown", role=role or "none",
                       action=action, customer_key=customer_key, reason=(reason or "").strip()[:200] or NO_REASON,
                       outcome=outcome, detail=detail[:2000])


def encode(record: AuditRecord) -> tuple[bytes, bytes]:
    """Kafka key (the customer, or the actor for actions on no one customer) and JSON value."""
    key = record.customer_key or record.actor
    return key.encode(), orjson.dumps(record.model_dump(mode="json"))


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(__import__("os").getuid())
    return f"cli:{user}"


class AuditWriter:
    """A synchronous writer for the command line: `write` returns once Kafka acknowledged."""

    def __init__(self, bootstrap: str):
        from kafka import KafkaProducer

        self._producer: Any = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)

    def write(self, record: AuditRecord, timeout: float = 30.0) -> None:
        key, value = encode(record)
        self._producer.send(TOPIC, key=key, value=value).get(timeout=timeout)

    def close(self) -> None:
        self._producer.close(timeout=10)


def decode(value: bytes) -> AuditRecord:
    return AuditRecord.model_validate(orjson.loads(value))
