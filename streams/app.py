"""The Faust worker: a thin adapter that feeds records of the events topic to `pipeline.process`
and sends what comes out. All decisions live in pipeline.py; state lives in RocksDB-backed tables
(on disk, restored from compacted changelog topics), never in process memory.

Run with `crm worker` (or `faust -A streams.app worker`). The worker never opens ClickHouse: the
projection writer (projections/writer.py) is the one process that does."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from datetime import UTC, datetime

import faust

from schemas.clock import clock_tick
from streams import kafka_fixes, topics
from streams.config import settings
from streams.rulebooks import load_rulebooks
from streams.codec_table import CodecTable
from streams.pipeline import AlertChanged, DeadLetter, LedgerEntry, Output, SeenEvent, SegmentChanged, SourceRecord, process
from streams.records import topic_record

log = logging.getLogger("crm.worker")


def _count_name(output: Output) -> str:
    """What the worker's periodic log line counts an output as."""
    if isinstance(output, LedgerEntry):
        return f"ledger.{output.data.get('kind', output.data['entry'])}"
    if isinstance(output, SegmentChanged):
        return f"segment.{output.data['dimension']}"
    if isinstance(output, DeadLetter):
        return f"dead_letter.{output.reason}"
    if isinstance(output, AlertChanged):
        return f"alert.{output.data['status']}"
    return type(output).__name__.lower()


def committed_offset(app: faust.App, topic: str, partition: int) -> int:
    """The consumer's last committed offset for a source partition, or -1 when unknown. Faust
    flushes the producer before it commits, so every output of an earlier record was delivered.
    (Faust keeps this in a private mapping; -1 only makes the outbox keep more than it must.)"""
    committed = getattr(app.consumer, "_committed_offset", {})
    for tp, offset in committed.items():
        if tp.topic == topic and tp.partition == partition and offset is not None:
            return offset
    return -1


class Continuity:
    """Makes sure the agent sees every record of each events partition, in order, even when the
    consumer skips some. faust-streaming 0.15.3 can pass over records around a restart's rebalance
    (it throws away what it fetched while restoring tables, and its read offsets can then run ahead
    of the re-read; see streams/kafka_fixes.py): the crash test lost records that way. The pipeline
    must not see a later record first (its per-customer offset guard would then take the skipped one
    for a redelivery), so a record after a gap is set aside and the partition sought back to the
    first missing offset, as often as stale records keep arriving. The events topic is never
    compacted nor written with transactions, so it has no gaps of its own."""

    def __init__(self, app: faust.App):
        self.app = app
        self.expected: dict[Any, int] = {}

    def forget(self, partitions: set[Any]) -> None:
        for tp in partitions:
            self.expected.pop(tp, None)

    async def in_order(self, message: Any) -> bool:
        tp = message.tp
        expected = self.expected.get(tp)
        if expected is None:
            committed = committed_offset(self.app, tp.topic, tp.partition)
            expected = committed if committed >= 0 else message.offset
        if message.offset > expected:
            if self.expected.get(tp) != expected:
                log.warning("records from %d of %s[%d] were skipped by the consumer; reading them again",
                            expected, tp.topic, tp.partition)
            self.expected[tp] = expected
            consumer = self.app.consumer
            consumer._sought[tp] = expected  # see streams/kafka_fixes.py
            await consumer.seek_wait({tp: expected})
            consumer._read_offset[tp] = expected
            return False
        # An older record (after a seek) is a redelivery to the pipeline; it never moves us back.
        self.expected[tp] = max(expected, message.offset + 1)
        return True


class Worker(faust.Worker):
    """Faust's worker without its terminal spinner. To spin on every log record, the spinner sets the
    root logger to DEBUG, so every library call of `log.debug` built a record, whatever --loglevel
    said: about 8% of the worker's CPU in a profile."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None
        super().on_setup_root_logger(logger, level)


def create_app() -> faust.App:
    kafka_fixes.apply()
    config = settings()
    rules = load_rulebooks(config)
    app = faust.App(
        topics.WORKER_APP_ID,
        broker=f"kafka://{config.kafka_bootstrap}",
        store="rocksdb://",
        datadir=str(config.worker_dir),
        web_enabled=False,
        Worker=Worker,
        web_host="127.0.0.1",
        topic_partitions=topics.EVENT_PARTITIONS,
        topic_replication_factor=config.kafka_replication,
        # deploy/topics.py creates every topic, the changelogs and the assignor topic included.
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Batch at the edge: let outputs and changelog writes gather for a moment per request,
        # instead of one produce request (and its syscalls) per record.
        producer_linger=0.1,
        producer_max_batch_size=512 * 1024,
        producer_max_request_size=4 * 1024 * 1024,
        # Faust's default commit interval (2.8s). Shorter ones stall processing on every commit,
        # which flushes the producer; redelivery after a crash is harmless (see pipeline.py).
        # A killed worker's partitions move to a new one after this long, not faust's default
        # minute; long enough that a starved heartbeat on a busy machine does not cause a rebalance.
        broker_session_timeout=30.0,
        broker_heartbeat_interval=3.0,
        # Tables hold only what the folds need, as bytes; see CodecTable.
        key_serializer="raw",
        value_serializer="raw",
    )
    events = app.topic(topics.EVENTS.name, key_type=bytes, value_type=bytes, partitions=topics.EVENT_PARTITIONS)
    outputs = {topics.EVENTS.name: events, **{
        spec.name: app.topic(spec.name, key_type=bytes, value_type=bytes)
        for spec in (topics.ACCEPTED, topics.PROFILES, topics.DEAD_LETTERS, topics.POINTS_LEDGER,
                     topics.POINTS_BALANCES, topics.SEGMENT_CHANGES, topics.ALERTS, topics.CHURN_MODELS)}}

    customer_state = app.Table(topics.CUSTOMER_STATE_TABLE, partitions=topics.EVENT_PARTITIONS,
                               key_type=bytes, value_type=bytes)
    seen_state = app.Table(topics.SEEN_EVENTS_TABLE, partitions=topics.EVENT_PARTITIONS,
                           key_type=bytes, value_type=bytes)
    store: CodecTable[Any] = CodecTable(customer_state)
    seen_events = CodecTable(seen_state, SeenEvent.from_list, SeenEvent.to_list)
    counts: Counter[str] = Counter()
    continuity = Continuity(app)

    @app.on_partitions_revoked.connect
    async def forget_revoked(app: faust.App, revoked: set[Any], **kwargs: Any) -> None:
        continuity.forget(revoked)

    @app.agent(events)
    async def fold_events(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            if not await continuity.in_order(message):
                continue
            record = SourceRecord(
                key=message.key, value=message.value, partition=message.partition,
                offset=message.offset, timestamp_ms=round(message.timestamp * 1000), topic=message.topic,
            )
            committed = committed_offset(app, message.topic, message.partition)
            for output in process(record, store, seen_events, rules, committed):
                counts[_count_name(output)] += 1
                if isinstance(output, DeadLetter):
                    log.warning("dead-lettered %s[%d]@%d: %s: %s", record.topic, record.partition, record.offset,
                                output.reason, output.detail)
                sent = topic_record(output)
                if sent is not None:
                    await outputs[sent.topic].send(key=sent.key, value=sent.value, headers=sent.headers or None)

    if config.tick_seconds > 0:
        @app.timer(interval=config.tick_seconds, on_leader=True)
        async def tick_every_partition() -> None:
            # The one place the wall clock is read: written into the log, it becomes event time.
            now = datetime.now(UTC)
            for partition in range(topics.EVENT_PARTITIONS):
                await events.send(key=b"clock", value=clock_tick(partition, now), partition=partition)

    @app.timer(interval=10.0)
    async def report_counts() -> None:
        if counts:
            log.info("processed so far: %s", ", ".join(f"{name}={n}" for name, n in sorted(counts.items())))

    return app


app = create_app()
