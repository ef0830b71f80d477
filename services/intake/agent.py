"""The intake process: `crm.intake` -> checks and sealing -> `crm.events`.

In batches (kafka-python, consumer group `crm-intake`, offsets committed by hand):

1. poll up to BATCH_RECORDS records;
2. check each with the ingestion API's rules (services/ingest/hygiene.py) in the intake's scope: any
   type of the catalog, any store, and the clock rules of a producer that may send history: nothing
   is too old, nothing is marked late, but an `occurred_at` more than FUTURE_TOLERANCE after the
   record's Kafka timestamp is refused; a missing `received_at` becomes that timestamp (the moment
   the platform received the record, a value taken from the log, so a second pass gives the same);
3. seal the personal fields of the accepted ones (one key store call for the batch) and write them to
   `crm.events` keyed by their customer key; write the refused ones, as they came, to
   `crm.intake.deadletter` with the worker's dead-letter headers (docs/architecture.md);
4. flush; once Kafka acknowledged every record of the batch, commit the batch's offsets.

At least once: a crash between 3 and 4 writes the batch again on restart. That changes nothing
downstream: sealing is deterministic, so the same intake record gives the same bytes, and the worker
ignores an event id it has with the same content. A record is never dropped and never stops the
process: what cannot be read or checked is dead-lettered with the reason; while Kafka does not
acknowledge, the batch is retried (and not committed)."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import CommitFailedError, KafkaError

from schemas.codec import MAX_EVENT_BYTES, to_json_dict
from schemas.events import EVENT_TYPES
from services.ingest.hygiene import FieldError, Refused, check
from services.ingest.keys import ApiKey, SourceKind
from services.ingest.sealing import Sealer, customer_key
from services.intake import metrics
from streams import topics
from streams.config import Settings

log = logging.getLogger("crm.intake")

GROUP_ID = "crm-intake"
BATCH_RECORDS = 1000
POLL_MS = 500
ACK_TIMEOUT_SECONDS = 60
RETRY_SECONDS = (0.5, 1, 2, 5, 10)
MAX_DEAD_LETTER_BYTES = 900 * 1024  # under Kafka's default 1 MiB record limit, with room for headers

# The intake's scope, as a key of the ingestion API would say it: every store, no rate, every type but
# the erasure request, which goes through the privacy endpoint or `crm privacy erase`, where a role
# is checked and the request audited (docs/privacy.md); here it is refused as type_not_allowed.
INTAKE_SCOPE = ApiKey(key_id="intake", source=SourceKind.BACKOFFICE, name=topics.INTAKE.name, store_id=None,
                      event_types=frozenset(EVENT_TYPES) - {"customer_erasure_requested"},
                      rate_per_second=float("inf"), burst=0, created_at=0.0,
                      revoked_at=None)


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class Triage:
    """What one batch of intake records becomes: events for crm.events, dead letters, by reason."""
    events: list[Outgoing] = field(default_factory=list)
    dead_letters: list[Outgoing] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def records(self) -> list[Outgoing]:
        return self.events + self.dead_letters


def triage(records: list[Any], sealer: Sealer, phone_region: str) -> Triage:
    """Check, seal and address a batch of intake records (kafka-python ConsumerRecords, or anything
    with topic, partition, offset, timestamp, key, value). The only I/O is the sealer's one key store
    call."""
    result = Triage()
    accepted: list[tuple[Any, dict[str, Any]]] = []
    for record in records:
        try:
            refusal, event = _check(record, phone_region, sealer.identity_secret)
        except Exception as exc:  # noqa: BLE001 - a record that breaks a rule's code is refused, not fatal
            detail = f"{type(exc).__name__}: {exc}; " + " | ".join(traceback.format_exc(limit=3).splitlines()[-4:])
            result.dead_letters.append(_dead_letter(record, "processing_error", detail))
            result.refused["processing_error"] = result.refused.get("processing_error", 0) + 1
            continue
        if isinstance(refusal, Refused):
            result.dead_letters.append(_dead_letter(record, refusal.reason, refusal.detail))
            result.refused[refusal.reason] = result.refused.get(refusal.reason, 0) + 1
        else:
            accepted.append((record, event))
    sealed = sealer.seal([event for _, event in accepted])
    for event in sealed:
        result.events.append(Outgoing(topics.EVENTS.name, str(customer_key(event)).encode(), orjson.dumps(event)))
    return result


def _check(record: Any, phone_region: str, identity_secret: bytes) -> tuple[Refused | None, dict[str, Any]]:
    raw = record.value
    if raw is None:
        return _refused("malformed_json", "(event)", "the record has no value (a tombstone)"), {}
    if len(raw) > MAX_EVENT_BYTES:
        return _refused("too_large", "(event)", f"{len(raw)} bytes, the limit is {MAX_EVENT_BYTES}"), {}
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _refused("malformed_json", "(event)", str(exc)), {}
    outcome = check(item, INTAKE_SCOPE, received_at(record), phone_region, identity_secret, history=True)
    if isinstance(outcome, Refused):
        return outcome, {}
    return None, to_json_dict(outcome.event)


def _refused(reason: str, name: str, message: str) -> Refused:
    return Refused(reason, [FieldError(name, message)])


def received_at(record: Any) -> datetime:
    """When the platform received the record: its Kafka timestamp (the broker's or the producer's
    clock, as the topic keeps it)."""
    stamp = getattr(record, "timestamp", None)
    if not isinstance(stamp, int) or stamp < 0:
        return datetime.now(UTC)
    return datetime.fromtimestamp(stamp / 1000, UTC)


def _dead_letter(record: Any, reason: str, detail: str) -> Outgoing:
    """The record as it came (crm.intake.deadletter is kept a day, like the intake topic: it may hold
    plain personal data), with the worker's dead-letter headers."""
    value = record.value or b""
    headers = [
        ("crm.dlq.reason", reason.encode()),
        ("crm.dlq.detail", detail.encode()[:4000]),
        ("crm.dlq.source.topic", str(record.topic).encode()),
        ("crm.dlq.source.partition", str(record.partition).encode()),
        ("crm.dlq.source.offset", str(record.offset).encode()),
        ("crm.dlq.source.timestamp", str(record.timestamp).encode()),
    ]
    if len(value) > MAX_DEAD_LETTER_BYTES:
        headers.append(("crm.dlq.truncated_from", str(len(value)).encode()))
        value = value[:MAX_DEAD_LETTER_BYTES]
    return Outgoing(topics.INTAKE_DEAD_LETTERS.name, record.key, value, headers)


class Intake:
    """The process: `run(stop)` until `stop` is set."""

    def __init__(self, settings: Settings, sealer: Sealer | None = None, batch_records: int = BATCH_RECORDS):
        self.settings = settings
        self.batch_records = batch_records
        self._sealer = sealer
        self._own_sealer = sealer is None

    def run(self, stop: threading.Event) -> None:
        sealer = self._sealer or Sealer.open(self.settings)
        consumer = KafkaConsumer(topics.INTAKE.name, bootstrap_servers=self.settings.kafka_bootstrap, group_id=GROUP_ID,
                                 client_id="crm-intake", enable_auto_commit=False, auto_offset_reset="earliest",
                                 max_poll_records=self.batch_records)
        producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, client_id="crm-intake", acks="all",
                                 enable_idempotence=True, linger_ms=5, compression_type="zstd")
        log.info("intake started: %s -> %s (refused: %s)", topics.INTAKE.name, topics.EVENTS.name,
                 topics.INTAKE_DEAD_LETTERS.name)
        try:
            while not stop.is_set():
                polled = consumer.poll(timeout_ms=POLL_MS, max_records=self.batch_records)
                records = [record for partition in sorted(polled, key=lambda tp: tp.partition)
                           for record in polled[partition]]
                if not records:
                    continue
                if not self._batch(records, sealer, producer, stop):
                    break  # stopping with the batch unwritten: it is read again on the next start
                try:
                    consumer.commit()
                except CommitFailedError:  # a rebalance took the partitions: the next owner writes them again
                    log.warning("intake: commit refused after a rebalance; %d records will be written again",
                                len(records))
        finally:
            producer.close(timeout=10)
            consumer.close()
            if self._own_sealer:
                sealer.close()
            log.info("intake stopped")

    def _batch(self, records: list[Any], sealer: Sealer, producer: KafkaProducer, stop: threading.Event) -> bool:
        """Triage and write one batch until Kafka acknowledged all of it; False when stopped first."""
        started = time.perf_counter()
        attempt = 0
        while not stop.is_set():
            try:
                result = triage(records, sealer, self.settings.phone_region)
                futures = [producer.send(out.topic, key=out.key, value=out.value, headers=out.headers or None)
                           for out in result.records]
                producer.flush(ACK_TIMEOUT_SECONDS)
                for future in futures:
                    future.get(ACK_TIMEOUT_SECONDS)
            except (KafkaError, TimeoutError) as exc:
                metrics.SEND_RETRIES.inc()
                wait = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                attempt += 1
                log.warning("intake: Kafka did not take a batch of %d records (%r); again in %s s",
                            len(records), exc, wait)
                stop.wait(wait)
                continue
            metrics.RECORDS.labels("sealed").inc(len(result.events))
            metrics.RECORDS.labels("refused").inc(len(result.dead_letters))
            for reason, count in result.refused.items():
                metrics.REFUSED.labels(reason).inc(count)
                log.info("intake: %d records refused as %s", count, reason)
            metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
            return True
        return False
