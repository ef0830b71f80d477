"""The Faust worker: a thin runtime around the pure batch fold (streams/batch.py). Faust provides
the consumer group, the rebalancing and the timers; the agent takes the events topic in batches and,
for each batch:

1. folds every record, in order, against its partition's state in memory (streams/state.py);
2. sends each changed state key once to the changelog and every output once (profile and balance
   snapshots coalesced to the last per customer), and waits until Kafka has them all;
3. writes the changed keys to RocksDB with the changelog offset they reach;
4. returns, and only then does `take_events` acknowledge the batch's records, whose offsets Faust
   commits at its next commit.

A crash at any point leaves the records after the committed offset to be folded again; the fold's
guards make that harmless (docs/architecture.md, "Exactness").

Run with `crm worker` (or `faust -A streams.runtime.app worker`). The worker never opens ClickHouse:
the projection writer (projections/writer.py) is the one process that does. It serves Prometheus
metrics (streams/runtime/metrics.py) on CRM_WORKER_METRICS_PORT (docs/operations.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.types import TP

from schemas.clock import clock_tick
from streams import topics
from streams.batch import fold_batch
from streams.config import Settings, settings
from streams.outputs import AlertChanged, DeadLetter, Duplicate, LedgerEntry, Output, SegmentChanged
from streams.records import SourceRecord, TopicRecord
from streams.rulebooks import Rulebooks, load_rulebooks
from streams.runtime import faust_adapter, metrics
from streams.runtime.faust_adapter import Continuity, committed_offset
from deploy.failpoints import Failpoints
from deploy.metrics_endpoint import serve
from streams.runtime.state_store import StateStore

log = logging.getLogger("crm.worker")
SEND_RETRY_SECONDS = 5.0
LAG_SECONDS = 5.0  # how often the worker measures its consumer lag for /metrics


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


class Worker(faust.Worker):
    """Faust's worker without its terminal spinner. To spin on every log record, the spinner sets the
    root logger to DEBUG, so every library call of `log.debug` built a record, whatever --loglevel
    said: about 8% of the worker's CPU in a profile."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None
        super().on_setup_root_logger(logger, level)


class BatchRunner:
    """Everything one batch needs, in one place: the app (its producer and consumer), the state
    store, the rules, and what the worker counts."""

    def __init__(self, app: faust.App, state: StateStore, rules: Rulebooks):
        self.app, self.state, self.rules = app, state, rules
        self.continuity = Continuity(app)
        self.failpoints = Failpoints()
        self.assigned: set[int] = set()
        self.counts: Counter[str] = Counter()

    async def run(self, events: list[Any]) -> None:
        records = [record for record in [await self._record(event.message) for event in events] if record]
        if not records:
            return
        async with self.state.lock:
            partitions = {record.partition for record in records}
            await self.state.open(partitions)
            committed = {p: committed_offset(self.app, topics.EVENTS.name, p) for p in partitions}
            started = time.perf_counter()
            outputs = fold_batch(records, self.state.state_of, self.rules, committed)
            folded = time.perf_counter()
            self.failpoints.reach("batch.folded")
            await self._flush(outputs)
            self.failpoints.reach("flush.state_written")
            metrics.batch_done(records, folded - started, time.perf_counter() - folded)
        self._count(outputs)

    async def _record(self, message: Any) -> SourceRecord | None:
        # A record of a partition revoked since it was fetched belongs to its new owner now.
        if message.partition not in self.assigned or not await self.continuity.in_order(message):
            return None
        return SourceRecord(key=message.key, value=message.value, partition=message.partition,
                            offset=message.offset, timestamp_ms=round(message.timestamp * 1000), topic=message.topic)

    async def _flush(self, outputs: list[Output]) -> None:
        """Changelog and outputs to Kafka, acknowledged, then the state to RocksDB. While Kafka
        refuses, the whole send is tried again: a record sent twice changes nothing."""
        changelog = self.state.changelog_records()
        sent = [record for record in (output.to_record() for output in outputs) if record is not None]
        while True:
            try:
                offsets = await self._send_all(changelog, sent)
                break
            except (KafkaError, asyncio.TimeoutError) as exc:  # Kafka unreachable or refusing: the batch waits
                log.warning("sending a batch failed (%r); trying again in %.0fs", exc, SEND_RETRY_SECONDS)
                metrics.SEND_RETRIES.inc()
                await asyncio.sleep(SEND_RETRY_SECONDS)
        metrics.outputs_sent(sent)
        self.failpoints.reach("flush.acknowledged")
        self.state.flushed(offsets)

    async def _send_all(self, changelog: dict[int, list[TopicRecord]], outputs: list[TopicRecord]) -> dict[int, int]:
        producer = self.app.producer
        pending: dict[int, list[Any]] = {}
        for partition, records in changelog.items():
            pending[partition] = [await producer.send(r.topic, r.key, r.value, partition, None, None) for r in records]
        if pending and self.failpoints.armed("flush.changelog_sent"):
            # Only for the crash test: make "the changelog in Kafka, the outputs not" a real state.
            await producer.flush()
            self.failpoints.reach("flush.changelog_sent")
        sent = [await producer.send(record.topic, record.key, record.value, None, None, record.headers or None)
                for record in outputs]
        await producer.flush()
        # Every output's acknowledgement, not only the changelog's: an output the broker refused raises
        # here, and the whole batch is sent again, instead of being acknowledged without it.
        for future in sent:
            await future
        offsets: dict[int, int] = {}
        for partition, futures in pending.items():
            offsets[partition] = max([(await future).offset for future in futures])
        return offsets

    def _count(self, outputs: list[Output]) -> None:
        duplicates = 0
        for output in outputs:
            self.counts[_count_name(output)] += 1
            if isinstance(output, DeadLetter):
                record = output.record
                log.warning("dead-lettered %s[%d]@%d: %s: %s", record.topic, record.partition, record.offset,
                            output.reason, output.detail)
                metrics.DEAD_LETTERS.labels(output.reason).inc()
            elif isinstance(output, Duplicate):
                duplicates += 1
        metrics.DUPLICATES.inc(duplicates)

    async def measure_lag(self) -> None:
        """Per assigned events partition, the records not yet taken: the log's end, asked of the
        broker (the fetcher's own highwater stands still while Faust pauses fetching under a
        backlog), minus the next offset the agent expects, or the committed one before its first
        record. A broker that does not answer leaves the last figures; the next measurement tries again."""
        partitions = [TP(topics.EVENTS.name, p) for p in sorted(self.assigned)]
        if not partitions:
            return
        try:
            ends = await self.app.consumer.highwaters(*partitions)
        except Exception as exc:  # noqa: BLE001 - a metric must never stop the worker
            log.info("could not measure the consumer lag: %r", exc)
            return
        lag = {}
        for tp in (tp for tp in partitions if tp.partition in self.assigned):  # none revoked meanwhile
            position = self.continuity.expected.get(tp, committed_offset(self.app, tp.topic, tp.partition))
            if ends.get(tp) is not None and position >= 0:
                lag[tp.partition] = max(0, ends[tp] - position)
        metrics.lag_measured(topics.EVENTS.name, lag)

    # --- rebalancing ------------------------------------------------------------------------------

    async def on_assigned(self, assigned: set[Any]) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == topics.EVENTS.name}
        async with self.state.lock:
            self.state.close(set(self.state.partitions) - mine)
            self.assigned = mine
            await self.state.open(mine)

    async def on_revoked(self, revoked: set[Any]) -> None:
        gone = {tp.partition for tp in revoked if tp.topic == topics.EVENTS.name}
        self.continuity.forget(revoked)
        metrics.partitions_gone(topics.EVENTS.name, gone)
        # Faust waited for the batch in flight to be acknowledged; the lock makes sure of it.
        async with self.state.lock:
            self.assigned -= gone
            self.state.close(gone)


def create_app(config: Settings | None = None) -> faust.App:
    faust_adapter.apply()
    config = config or settings()
    rules = load_rulebooks(config)
    config.worker_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        topics.WORKER_APP_ID,
        broker=f"kafka://{config.kafka_bootstrap}",
        datadir=str(config.worker_dir / "faust"),
        web_enabled=False,
        Worker=Worker,
        web_host="127.0.0.1",
        topic_partitions=topics.EVENT_PARTITIONS,
        topic_replication_factor=config.kafka_replication,
        # deploy/topics.py creates every topic, the changelog and the assignor topic included.
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Each batch ends with a flush, which sends at once; the linger only gathers the records of a
        # batch too large for one request.
        producer_linger=0.01,
        producer_max_batch_size=512 * 1024,
        producer_max_request_size=4 * 1024 * 1024,
        # JSON compresses several times over: fewer bytes on the wire and on the broker's disk
        # (zstd: about 7x on the state changelog's batches, lz4 4x).
        producer_compression_type="zstd",
        # A killed worker's partitions move to a new one after this long, not faust's default
        # minute; long enough that a starved heartbeat on a busy machine does not cause a rebalance.
        broker_session_timeout=30.0,
        broker_heartbeat_interval=3.0,
        key_serializer="raw",
        value_serializer="raw",
    )
    events = app.topic(topics.EVENTS.name, key_type=bytes, value_type=bytes, partitions=topics.EVENT_PARTITIONS)
    state = StateStore(config.worker_dir / "state", topics.STATE_CHANGELOG.name, config.kafka_bootstrap,
                       config.state_cache_keys)
    runner = BatchRunner(app, state, rules)

    @app.on_partitions_assigned.connect
    async def partitions_assigned(app: faust.App, assigned: set[Any], **kwargs: Any) -> None:
        await runner.on_assigned(assigned)

    @app.on_partitions_revoked.connect
    async def partitions_revoked(app: faust.App, revoked: set[Any], **kwargs: Any) -> None:
        await runner.on_revoked(revoked)

    @app.agent(events)
    async def fold_events(stream: Any) -> None:
        async for batch in stream.take_events(config.worker_batch_size, within=config.worker_batch_seconds):
            await runner.run(batch)

    if config.tick_seconds > 0:
        @app.timer(interval=config.tick_seconds, on_leader=True)
        async def tick_every_partition() -> None:
            # The one place the wall clock is read: written into the log, it becomes event time.
            now = datetime.now(UTC)
            for partition in range(topics.EVENT_PARTITIONS):
                await events.send(key=b"clock", value=clock_tick(partition, now), partition=partition)

    @app.timer(interval=10.0)
    async def report_counts() -> None:
        if runner.counts:
            log.info("processed so far: %s", ", ".join(f"{name}={n}" for name, n in sorted(runner.counts.items())))

    @app.timer(interval=LAG_SECONDS)
    async def measure_lag() -> None:
        await runner.measure_lag()

    @app.task
    async def serve_metrics() -> None:
        # When the worker starts, not when this module is imported; Faust's own web server stays off.
        serve("worker", config.state_dir, config.worker_metrics_port)

    @app.on_before_shutdown.connect
    async def close_state(app: faust.App, **kwargs: Any) -> None:
        async with state.lock:
            state.close_all()

    return app


app = create_app()
