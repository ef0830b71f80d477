"""Reads `crm.alerts` (consumer group `crm-alerts`, from the earliest record) in batches into the
alert log, then commits the batch's offsets: at-least-once, and the log ignores a change_id it
already has, so a batch read again after a crash changes nothing. It reads `crm.erasures` too: a
`customer_erased` record deletes that customer's alerts and deliveries (docs/privacy.md), which
done twice changes nothing either.

A record that is not a valid AlertChange is logged with its position and the reason, kept in the
`invalid_records` table and counted, and skipped: one bad record must not stop every alert behind it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import orjson

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from schemas.alerts import AlertChange
from schemas.privacy import CustomerErased
from services.alerts import metrics
from services.alerts.store import AlertStore, Appended, InvalidRecord
from streams import topics

log = logging.getLogger("crm.alerts.consumer")

GROUP_ID = "crm-alerts"
BATCH_RECORDS = 500
RECONNECT_SECONDS = (1.0, 30.0)  # first and longest wait before trying Kafka again


@dataclass
class ConsumerStats:
    records: int = 0
    alerts: int = 0
    duplicates: int = 0
    invalid: int = 0
    state: str = "starting"  # starting, connecting, running, stopped
    last_error: str | None = None


def parse(record: ConsumerRecord) -> AlertChange | InvalidRecord:
    """The record's AlertChange, or why it is not one."""
    where = (record.topic, record.partition, record.offset)
    if record.value is None:
        return InvalidRecord(*where, "no value (a tombstone): not an alert change", None)
    try:
        return AlertChange.model_validate_json(record.value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(record)'}: {e['msg']}" for e in exc.errors()[:5])
        more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        return InvalidRecord(*where, f"not a valid AlertChange: {problems}{more}", record.value)


def parse_erasure(record: ConsumerRecord) -> CustomerErased | InvalidRecord:
    """The record's CustomerErased (crm.erasures), or why it is not one."""
    where = (record.topic, record.partition, record.offset)
    if record.value is None:
        return InvalidRecord(*where, "no value (a tombstone): not a customer_erased record", None)
    try:
        return CustomerErased.model_validate_json(record.value)
    except ValidationError:
        # The worker writes alias keys longer than the model's customer_key allows (streams/erasure.py):
        # what the store needs is the key and the time.
        try:
            data = orjson.loads(record.value)
            return CustomerErased.model_construct(customer_key=str(data["customer_key"]),
                                                  erased_at=datetime.fromisoformat(data["erased_at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return InvalidRecord(*where, f"not a valid customer_erased record: {exc}", record.value)


def store_batch(store: AlertStore, records: list[ConsumerRecord]) -> Appended:
    valid: list[tuple[AlertChange, bytes]] = []
    invalid: list[InvalidRecord] = []
    erasures: list[CustomerErased] = []
    for record in records:
        if record.topic == topics.ERASURES.name:
            erasure = parse_erasure(record)
            if isinstance(erasure, InvalidRecord):
                log.error("skipped %s[%s]@%s: %s", erasure.topic, erasure.partition, erasure.offset, erasure.error)
                invalid.append(erasure)
            else:
                erasures.append(erasure)
            continue
        parsed = parse(record)
        if isinstance(parsed, InvalidRecord):
            log.error("skipped %s[%s]@%s: %s", parsed.topic, parsed.partition, parsed.offset, parsed.error)
            invalid.append(parsed)
        else:
            valid.append((parsed, record.value))
    return store.append(valid, invalid, erasures=erasures)


class AlertConsumer:
    def __init__(self, store: AlertStore, bootstrap: str, on_appended: Callable[[], None] = lambda: None,
                 group_id: str = GROUP_ID, topic: str = topics.ALERTS.name,
                 erasures_topic: str | None = topics.ERASURES.name):
        self.store, self.bootstrap, self.on_appended = store, bootstrap, on_appended
        self.group_id, self.topic, self.erasures_topic = group_id, topic, erasures_topic
        self.stats = ConsumerStats()

    async def run(self) -> None:
        """Consume until cancelled; when Kafka is unreachable, keep trying (the HTTP API and the
        deliveries of what is already logged go on meanwhile)."""
        wait = RECONNECT_SECONDS[0]
        while True:
            consumer = AIOKafkaConsumer(
                *[self.topic, *([self.erasures_topic] if self.erasures_topic else [])], bootstrap_servers=self.bootstrap, group_id=self.group_id,
                auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=BATCH_RECORDS)
            try:
                self.stats.state = "connecting"
                await consumer.start()
                self.stats.state, self.stats.last_error, wait = "running", None, RECONNECT_SECONDS[0]
                log.info("consuming %s as group %s from %s", self.topic, self.group_id, self.bootstrap)
                await self._consume(consumer)
            except KafkaError as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("Kafka at %s: %s; trying again in %.0f s", self.bootstrap, self.stats.last_error, wait)
            except Exception as exc:
                # Anything else (the SQLite file, say): offsets were not committed, so the batch is read
                # again when consuming resumes. Keep the process, and the deliveries, running.
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("consuming %s failed; starting again in %.0f s", self.topic, wait)
            finally:
                self.stats.state = "stopped"
                await _quietly_stop(consumer)
            await asyncio.sleep(wait)
            wait = min(wait * 2, RECONNECT_SECONDS[1])

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=BATCH_RECORDS)
            records = [record for batch in batches.values() for record in batch]
            if not records:
                continue
            appended = store_batch(self.store, records)
            self.stats.records += len(records)
            self.stats.alerts += appended.alerts
            self.stats.duplicates += appended.duplicates
            self.stats.invalid += appended.invalid
            metrics.consumed(appended)
            if appended.alerts:
                self.on_appended()
            # Only now that SQLite has the batch: a crash before this line re-reads it, and the
            # change_ids make that harmless.
            offsets = {TopicPartition(tp.topic, tp.partition): batch[-1].offset + 1
                       for tp, batch in batches.items() if batch}
            try:
                await consumer.commit(offsets)
            except CommitFailedError as exc:
                # A rebalance took the partitions away; their next owner reads the batch again.
                log.warning("offsets not committed (%s); the batch will be read again and de-duplicated", exc)


async def _quietly_stop(consumer: AIOKafkaConsumer) -> None:
    try:
        await consumer.stop()
    except Exception:  # stopping a consumer that never connected can fail; nothing to clean up then
        log.debug("consumer stop failed", exc_info=True)
