"""The projection writer: the one process that owns ClickHouse (required by embedded chdb, and
cheap with a server). It reads the worker's output topics in batches, inserts each batch per table,
then commits the Kafka offsets. A crash between insert and commit re-inserts the batch, which the
tables absorb: every row is keyed (events, dead_letters) or versioned (customer_profiles). An insert
ClickHouse refuses is tried again until it is stored: the writer waits, it neither skips nor stops."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from deploy.failpoints import Failpoints

from projections import (
    alerts_table,
    audit_table,
    boundaries,
    churn_model,
    dead_letters_table,
    erasures_table,
    events_table,
    points_table,
    profiles_table,
    segments_table,
)
from projections import metrics
from projections.clickhouse import INSERT_SETTINGS, connect
from projections.migrations import migrate
from streams import topics
from streams.config import Settings
from streams.segments.rules import load_segment_rules

log = logging.getLogger("crm.writer")
WRITER_GROUP = "crm-projections"
INSERT_RETRY_FIRST_SECONDS = 1.0
INSERT_RETRY_MAX_SECONDS = 30.0
# An insert setting that no disk meets: how the fault tests make the engine refuse as on a full disk.
REFUSING_SETTINGS = {"min_free_disk_bytes_to_perform_insert": 2**62}


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
    topics.ALERTS.name: alerts_table.rows,
    topics.CHURN_MODELS.name: alerts_table.model_rows,
    topics.ERASURES.name: one_table("erasures", erasures_table.rows),
    topics.AUDIT.name: one_table("audit_log", audit_table.rows),
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
    "churn_alerts": alerts_table.COLUMNS,
    "churn_models": alerts_table.MODEL_COLUMNS,
    "erasures": erasures_table.COLUMNS,
    "audit_log": audit_table.COLUMNS,
}
# Tables that are not projections of crm.events and crm.events.deadletter: a rebuild leaves them as
# they are (projections/replay.py). crm.audit is written by the processes that served the requests.
NOT_FROM_THE_LOG = frozenset({"audit_log"})


class Publication:
    """Figures over the whole population that only this process sees whole, appended to the events
    log every `interval` seconds (0: only when asked) so that the worker folds them like any record:
    segment boundaries (projections/boundaries.py), the churn model (projections/churn_model.py).
    `publish(producer, last_id)` returns the new id, or None when nothing new was published."""

    def __init__(self, name: str, interval: float, publish: Callable[[KafkaProducer, str | None], str | None]):
        self.name, self.interval, self._publish = name, interval, publish
        self.last_id: str | None = None
        self._due = time.monotonic() + interval
        self._wanted = threading.Event()
        self._done = threading.Event()

    def due(self) -> bool:
        return self._wanted.is_set() or (self.interval > 0 and time.monotonic() >= self._due)

    def run(self, producer: KafkaProducer) -> None:
        self._due = time.monotonic() + self.interval
        try:
            self.last_id = self._publish(producer, self.last_id) or self.last_id
        except Exception:
            # The projections matter more than fresh figures: try again at the next interval.
            log.exception("could not publish %s", self.name)
        finally:
            self._wanted.clear()
            self._done.set()

    def request(self, timeout: float = 120.0) -> str | None:
        """Ask the running writer to publish now (from another thread: the writer's thread owns the
        ClickHouse client); returns the id in force afterwards."""
        self._done.clear()
        self._wanted.set()
        if not self._done.wait(timeout):
            raise TimeoutError(f"the projection writer did not publish {self.name} in time")
        return self.last_id


def _rows_by_table(batch: dict[Any, list[Any]]) -> dict[str, list[list[Any]]]:
    """A batch of records of the output topics as rows per table, empty tables left out."""
    by_topic: dict[str, list[Any]] = defaultdict(list)
    for partition, records in batch.items():
        by_topic[partition.topic].extend(records)
    tables: dict[str, list[list[Any]]] = defaultdict(list)
    for topic, records in by_topic.items():
        for table, rows in SINKS[topic](records).items():
            tables[table].extend(rows)
    return {table: rows for table, rows in tables.items() if rows}


def _commit(consumer: KafkaConsumer) -> None:
    """Commit the positions reached. A commit that fails (the broker away, or the group rebalanced
    while ClickHouse refused for longer than the poll interval) loses nothing: the next commit covers
    these records too, and if none comes before a crash they are read and inserted again."""
    try:
        consumer.commit()
    except KafkaError as exc:
        log.warning("committing the written offsets failed (%s); the next commit covers them", _first_line(exc))


def _instance_id(settings: Settings) -> str:
    """The same for every start of the writer of one state directory on one host, and different for
    writers of different ones (several writers share a ClickHouse server)."""
    owner = f"{socket.gethostname()}:{settings.state_dir.resolve()}"
    return f"crm-writer-{hashlib.blake2b(owner.encode(), digest_size=8).hexdigest()}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class ProjectionWriter:
    def __init__(self, settings: Settings, client: Client | None = None, max_batch: int = 50_000,
                 max_wait_ms: int = 500):
        self.settings = settings
        self.database = settings.clickhouse_database
        self.client = client or connect(settings)
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self._stop = threading.Event()
        self.failpoints = Failpoints()
        refuse = os.environ.get("CRM_FAULT_REFUSE_INSERTS")
        self._refuse_inserts_file = Path(refuse) if refuse else None
        migrate(self.client, self.database)
        segment_rules = load_segment_rules(settings.segment_rules)
        self.boundaries = Publication(
            "segment boundaries", settings.boundaries_seconds,
            lambda producer, last: boundaries.publish(self.client, self.database, segment_rules, producer, last))
        self.churn_model = Publication(
            "the churn model", settings.churn_model_seconds,
            lambda producer, last: churn_model.publish(self.client, self.database, producer, last))
        self._rebuild: threading.Thread | None = None

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
            # endless rebalance. A crashed writer's partitions wait this long for a new owner ...
            session_timeout_ms=45_000,
            # ... unless it is the writer itself, restarted: a static member (KIP-345) named after the
            # host and the data it owns takes its partitions back at once, without a rebalance.
            group_instance_id=_instance_id(self.settings),
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
                metrics.polled(consumer, batch)
                if batch:
                    if not self.write_until_stored(batch):
                        break  # stopped while ClickHouse refused: the batch stays uncommitted
                    _commit(consumer)
                self._start_requested_rebuild()
                for publication in (self.boundaries, self.churn_model):
                    if publication.due():
                        producer = producer or KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap,
                                                             acks="all", enable_idempotence=True)
                        publication.run(producer)
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

    def write_until_stored(self, batch: dict[Any, list[Any]]) -> bool:
        """Insert every table's rows of the batch, waiting out a ClickHouse that refuses (a full
        disk, a restarting server, a lost connection): a refused insert is tried again, with a
        growing pause, until it is stored or the writer is stopped (False). A table is inserted
        once it is accepted; a retry starts at the table that failed, and an insert ClickHouse did
        store although it answered with an error is collapsed by the table's engine."""
        pending = list(_rows_by_table(batch).items())
        failures = 0
        while pending:
            table, rows = pending[0]
            try:
                self._insert(table, rows)
            except Exception as exc:  # whatever the engine or the connection raised: wait, try again
                failures += 1
                pause = min(INSERT_RETRY_MAX_SECONDS, INSERT_RETRY_FIRST_SECONDS * 2 ** (failures - 1))
                log.warning("inserting %d rows into %s failed (%s); trying again in %.0f s",
                            len(rows), table, _first_line(exc), pause)
                if self._stop.wait(pause):
                    return False
                continue
            if failures:
                log.info("inserted %d rows into %s after %d failed attempts", len(rows), table, failures)
                failures = 0
            pending.pop(0)
            self.failpoints.reach("writer.table_inserted")
        return True

    def _insert(self, table: str, rows: list[list[Any]]) -> None:
        settings = {**INSERT_SETTINGS, **(REFUSING_SETTINGS if self.refusing() else {})}
        with metrics.insert(table, len(rows)):
            self.client.insert(f"{self.database}.{table}", rows, column_names=COLUMNS[table], settings=settings)

    def refusing(self) -> bool:
        """Only for the fault tests: while the file named by CRM_FAULT_REFUSE_INSERTS exists, every
        insert asks for more free disk than any disk has, so that the engine itself refuses it as it
        refuses on a full disk (NOT_ENOUGH_SPACE)."""
        return self._refuse_inserts_file is not None and self._refuse_inserts_file.exists()

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
