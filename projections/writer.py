"""The projection writer: the one process that owns ClickHouse (required by embedded chdb, and
cheap with a server). It reads the worker's output topics in batches, inserts each batch per table,
then commits the Kafka offsets. A crash between insert and commit re-inserts the batch, which the
tables absorb: every row is keyed (events, dead_letters) or versioned (customer_profiles)."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from clickhouse_connect.driver.client import Client
from kafka import KafkaConsumer, KafkaProducer

from projections import boundaries, dead_letters_table, events_table, points_table, profiles_table, segments_table
from projections.clickhouse import connect
from projections.migrations import migrate
from streams import topics
from streams.config import Settings
from streams.segments.rules import load_segment_rules

log = logging.getLogger("crm.writer")
WRITER_GROUP = "crm-projections"


# Each topic's records become rows of one or more tables: topic -> records -> {table: rows}.
RowMaker = Callable[[Iterable[Any]], dict[str, list[list[Any]]]]


def one_table(table: str, rows: Callable[[Iterable[Any]], list[list[Any]]]) -> RowMaker:
    return lambda records: {table: rows(records)}


SINKS: dict[str, RowMaker] = {
    topics.ACCEPTED.name: one_table("events", events_table.rows),
    topics.PROFILES.name: one_table("customer_profiles", profiles_table.rows),
    topics.DEAD_LETTERS.name: one_table("dead_letters", dead_letters_table.rows),
    topics.POINTS_LEDGER.name: points_table.ledger_rows,
    topics.POINTS_BALANCES.name: points_table.balance_rows,
    topics.SEGMENT_CHANGES.name: segments_table.rows,
}
COLUMNS: dict[str, list[str]] = {
    "events": events_table.COLUMNS,
    "customer_profiles": profiles_table.COLUMNS,
    "dead_letters": dead_letters_table.COLUMNS,
    "points_ledger": points_table.LEDGER_COLUMNS,
    "tier_changes": points_table.TIER_COLUMNS,
    "points_balances": points_table.BALANCE_COLUMNS,
    "segment_changes": segments_table.COLUMNS,
    "segment_boundaries": segments_table.BOUNDARIES_COLUMNS,
}


class ProjectionWriter:
    def __init__(self, settings: Settings, client: Client | None = None, max_batch: int = 50_000,
                 max_wait_ms: int = 500):
        self.settings = settings
        self.database = settings.clickhouse_database
        self.client = client or connect(settings)
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.rows_written: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        migrate(self.client, self.database)
        self.segment_rules = load_segment_rules(settings.segment_rules)
        self.boundaries_id: str | None = None
        self._boundaries_due = time.monotonic() + settings.boundaries_seconds
        self._boundaries_wanted = threading.Event()
        self._rebuild: threading.Thread | None = None
        self._boundaries_done = threading.Event()

    def _consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            *SINKS,
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=WRITER_GROUP,
            client_id="crm-projection-writer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_batch,
            fetch_min_bytes=1024 * 1024,
            fetch_max_wait_ms=self.max_wait_ms,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            # On a busy two-core machine the heartbeat thread can be starved for many seconds (a
            # long ClickHouse insert holds the interpreter); a short session turns that into an
            # endless rebalance. A crashed writer's partitions wait this long for a new owner.
            session_timeout_ms=45_000,
            heartbeat_interval_ms=5_000,
            max_poll_interval_ms=600_000,
        )

    def run(self) -> None:
        """Consume until `stop()` is called. The broker gathers each fetch for up to `max_wait_ms`
        (or until a megabyte is there), so that ClickHouse gets few large inserts while a row is
        still visible within about a second of the worker's output."""
        consumer = self._consumer()
        producer: KafkaProducer | None = None
        try:
            while not self._stop.is_set():
                batch = consumer.poll(timeout_ms=2 * self.max_wait_ms, max_records=self.max_batch)
                if batch:
                    self.write(batch)
                    consumer.commit()
                self._start_requested_rebuild()
                interval = self.settings.boundaries_seconds
                if self._boundaries_wanted.is_set() or (interval > 0 and time.monotonic() >= self._boundaries_due):
                    producer = producer or KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                                         enable_idempotence=True)
                    self.publish_boundaries(producer)
        finally:
            consumer.close(autocommit=False)
            if producer is not None:
                producer.close()

    def _start_requested_rebuild(self) -> None:
        """`crm replay` asked for a rebuild (projections/replay.py): run it beside the writer, in
        this process, which is the one that may open the embedded database."""
        from projections import replay
        from streams.rulebooks import load_rulebooks

        if not replay.request_path(self.settings).exists():
            return
        if self._rebuild is not None and self._rebuild.is_alive():
            return
        self._rebuild = threading.Thread(
            target=replay.run_requested, name="projection-rebuild",
            args=(connect(self.settings), self.settings, load_rulebooks(self.settings)), daemon=True)
        self._rebuild.start()

    def publish_boundaries(self, producer: KafkaProducer) -> None:
        """Value tiers and RFM scores compare each customer with the population, which only this
        process sees whole: recompute the boundaries and append them to the events log."""
        self._boundaries_due = time.monotonic() + self.settings.boundaries_seconds
        try:
            published = boundaries.publish(self.client, self.database, self.segment_rules, producer, self.boundaries_id)
            self.boundaries_id = published or self.boundaries_id
        except Exception:
            # The projections matter more than fresh boundaries: try again at the next interval.
            log.exception("could not publish segment boundaries")
        finally:
            self._boundaries_wanted.clear()
            self._boundaries_done.set()

    def request_boundaries(self, timeout: float = 120.0) -> str | None:
        """Ask the running writer to publish boundaries now (from another thread: the writer's thread
        owns the ClickHouse client); returns the id in force afterwards."""
        self._boundaries_done.clear()
        self._boundaries_wanted.set()
        if not self._boundaries_done.wait(timeout):
            raise TimeoutError("the projection writer did not publish boundaries in time")
        return self.boundaries_id

    def write(self, batch: dict[Any, list[Any]]) -> None:
        by_topic: dict[str, list[Any]] = defaultdict(list)
        for partition, records in batch.items():
            by_topic[partition.topic].extend(records)
        for topic, records in by_topic.items():
            for table, rows in SINKS[topic](records).items():
                if rows:
                    self.client.insert(f"{self.database}.{table}", rows, column_names=COLUMNS[table])
                    self.rows_written[table] += len(rows)

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._run_logged, name="projection-writer", daemon=True)
        thread.start()
        return thread

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("projection writer stopped")
            raise

    def stop(self) -> None:
        self._stop.set()
