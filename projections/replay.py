"""Rebuild every projection from the beginning of the log, beside the live tables, then swap.

The projections are a function of two logs kept forever: `crm.events` (folded again here with
the same batch fold the worker runs, `streams.batch.fold_batch`, state in a scratch RocksDB) and
`crm.events.deadletter` (the `dead_letters` table is its projection, and the ingestion API's dead
letters are only there). `erasures` is among them: the fold writes its customer_erased records again
alike. `audit_log` is not: crm.audit is written by the processes that served the requests, not
derived from these logs, so a rebuild leaves that table as it is. The rows go through the projection writer's own row makers into
`<table>__rebuild` tables created like the live ones, while the live tables keep serving:

1. build: read both logs from offset 0 to the end offsets taken at the start;
2. swap: `EXCHANGE TABLES t AND t__rebuild` for every table (each exchange is atomic), so the
   rebuilt tables are live and the old ones are kept as `t__replaced` until the next rebuild;
3. catch up: read on to the end offsets taken after the swap, into the (new) live tables. Whatever
   the live writer wrote into the old tables before the swap came from records before those offsets,
   so nothing is missing; rows it writes later are replaced by or replace identical rebuilt ones.

`verify` compares two sets of tables (row counts and checksums over FINAL rows): after a rebuild of
a log that did not move meanwhile, live and replaced must be identical."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from projections.clickhouse import INSERT_SETTINGS
from projections.writer import COLUMNS, NOT_FROM_THE_LOG, SINKS
from streams import topics
from streams.batch import fold_batch
from streams.config import Settings, settings
from streams.records import SourceRecord, TopicRecord
from streams.rulebooks import Rulebooks, load_rulebooks
from streams.state import PartitionState
from streams.state_rocksdb import RocksDBBackend

REBUILD, REPLACED = "__rebuild", "__replaced"
# Every table the writer fills from the worker's outputs and the dead letters. `audit_log` is not among
# them: crm.audit is no projection of the events log, so a rebuild leaves the table as it is.
TABLES = [table for table in COLUMNS if table not in NOT_FROM_THE_LOG]
INSERT_EVERY = 50_000  # rows per table before an insert


@dataclass(frozen=True)
class Record:
    """What the writer's row makers read of a Kafka record."""
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


class Rebuild:
    def __init__(self, client: Client, settings: Settings, rules: Rulebooks,
                 progress: Callable[[int, int], None] = lambda done, total: None):
        self.client, self.settings, self.rules, self.progress = client, settings, rules, progress
        self.db = settings.clickhouse_database
        self.scratch = settings.state_dir / "replay" / "state"
        self.positions: dict[TopicPartition, int] = {}
        self.records_read = 0

    # --- the three steps --------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """Build, swap, catch up; returns figures for the report (records, seconds, rate)."""
        started = time.monotonic()
        self.prepare()
        consumer = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False,
                                 max_poll_records=5000, fetch_max_bytes=64 * 1024 * 1024)
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        backends: dict[int, RocksDBBackend] = {}
        try:
            self._build(consumer, self._end_offsets(consumer))
            build_seconds = time.monotonic() - started
            self.swap()
            # The folding processes have closed their state; the catch-up folds here, from where they stopped.
            backends = {p: RocksDBBackend(self.scratch / str(p)) for p in range(topics.EVENT_PARTITIONS)}
            states = {p: PartitionState(p, backend, self.settings.state_cache_keys) for p, backend in backends.items()}
            self._read(consumer, self._end_offsets(consumer), states, suffix="")
        finally:
            consumer.close()
            for backend in backends.values():
                backend.destroy()
            shutil.rmtree(self.scratch, ignore_errors=True)
        return {"records": self.records_read, "build_seconds": build_seconds,
                "records_per_second": self.records_read / max(build_seconds, 1e-9)}

    def _build(self, consumer: KafkaConsumer, until: dict[TopicPartition, int]) -> None:
        """The rebuild tables from both logs up to `until`: the dead letters read here, the events
        folded by one process per core (partitions share no state, so they fold apart; the fold is
        the rebuild's cost), whose outputs this process turns into rows and inserts."""
        self._read(consumer, {tp: end for tp, end in until.items() if tp.topic == topics.DEAD_LETTERS.name}, {},
                   suffix=REBUILD)
        events_until = {tp.partition: end for tp, end in until.items() if tp.topic == topics.EVENTS.name}
        processes = max(1, min(os.cpu_count() or 1, topics.EVENT_PARTITIONS))
        groups = [[p for p in range(topics.EVENT_PARTITIONS) if p % processes == n] for n in range(processes)]
        context = multiprocessing.get_context("spawn")  # this process may hold chdb and threads: no fork
        queue = context.Queue(maxsize=16)
        children = [context.Process(target=fold_partitions, name=f"crm-rebuild-fold-{n}", daemon=True,
                                    args=({p: events_until[p] for p in group}, str(self.scratch), queue))
                    for n, group in enumerate(groups)]
        for child in children:
            child.start()
        rows: dict[str, list[list[Any]]] = defaultdict(list)
        total = sum(until.values())
        try:
            finished = 0
            while finished < len(children):
                try:
                    kind, payload = queue.get(timeout=5)
                except Empty:
                    if any(child.exitcode not in (None, 0) for child in children):
                        raise RuntimeError("a folding process of the rebuild died; see the writer's log") from None
                    continue
                if kind == "failed":
                    raise RuntimeError(f"a folding process of the rebuild failed:\n{payload}")
                if kind == "done":
                    for partition, position in payload.items():
                        self.positions[TopicPartition(topics.EVENTS.name, partition)] = position
                    finished += 1
                    continue
                count, records = payload
                self.records_read += count
                self._output_rows([TopicRecord(*record) for record in records], rows)
                self._insert(rows, REBUILD, at_least=INSERT_EVERY)
                self.progress(self.records_read, total)
            self._insert(rows, REBUILD, at_least=1)
        finally:
            for child in children:
                child.join(timeout=30)
                if child.is_alive():
                    child.kill()

    def prepare(self) -> None:
        for table in TABLES:
            self.client.command(f"DROP TABLE IF EXISTS {self.db}.{table}{REBUILD}")
            self.client.command(f"CREATE TABLE {self.db}.{table}{REBUILD} AS {self.db}.{table}")

    def swap(self) -> None:
        for table in TABLES:
            self.client.command(f"EXCHANGE TABLES {self.db}.{table} AND {self.db}.{table}{REBUILD}")
        for table in TABLES:
            self.client.command(f"DROP TABLE IF EXISTS {self.db}.{table}{REPLACED}")
            self.client.command(f"RENAME TABLE {self.db}.{table}{REBUILD} TO {self.db}.{table}{REPLACED}")

    # --- reading the logs -------------------------------------------------------------------------

    def _end_offsets(self, consumer: KafkaConsumer) -> dict[TopicPartition, int]:
        partitions = [TopicPartition(spec.name, p) for spec in (topics.EVENTS, topics.DEAD_LETTERS)
                      for p in range(spec.partitions)]
        return consumer.end_offsets(partitions)

    def _read(self, consumer: KafkaConsumer, until: dict[TopicPartition, int], states: dict[int, PartitionState],
              suffix: str) -> None:
        """Fold the events in the batches the consumer hands over, exactly as the worker does
        (streams/batch.py), and turn their outputs and the dead letters into rows."""
        wanted = [tp for tp, end in until.items() if self.positions.get(tp, 0) < end]
        total = sum(until.values())
        if not wanted:
            return
        consumer.assign(wanted)
        for tp in wanted:
            consumer.seek(tp, self.positions.get(tp, 0))
        rows: dict[str, list[list[Any]]] = defaultdict(list)
        while any(self.positions.get(tp, 0) < until[tp] for tp in wanted):
            events: list[SourceRecord] = []
            for tp, records in consumer.poll(timeout_ms=1000).items():
                for record in records:
                    if record.offset >= until[tp]:
                        consumer.pause(tp)
                        break
                    if record.topic == topics.DEAD_LETTERS.name:
                        self._rows(Record(record.topic, record.partition, record.offset, record.key,
                                          record.value or b"", list(record.headers or [])), rows)
                    else:
                        events.append(_source(record))
                    self.positions[tp] = record.offset + 1
                    self.records_read += 1
            self._output_rows(_fold(events, states, self.rules), rows)
            self._insert(rows, suffix, at_least=INSERT_EVERY)
            self.progress(sum(self.positions.values()), total)
        self._insert(rows, suffix, at_least=1)

    def _output_rows(self, sent_records: list[TopicRecord | None], rows: dict[str, list[list[Any]]]) -> None:
        for sent in sent_records:
            if sent is None or sent.topic not in SINKS or sent.topic == topics.DEAD_LETTERS.name:
                # Dead letters come from their own log; forwards are in crm.events already; data key
                # tombstones are for the key store, which a rebuild leaves alone.
                continue
            partition = (murmur2(sent.key) & 0x7FFFFFFF) % topics.EVENT_PARTITIONS if sent.key else 0
            self._rows(Record(sent.topic, partition, -1, sent.key, sent.value, sent.headers), rows)

    def _rows(self, record: Record, rows: dict[str, list[list[Any]]]) -> None:
        for table, made in SINKS[record.topic]([record]).items():
            rows[table].extend(made)

    def _insert(self, rows: dict[str, list[list[Any]]], suffix: str, at_least: int) -> None:
        for table, pending in rows.items():
            if len(pending) >= at_least:
                self.client.insert(f"{self.db}.{table}{suffix}", pending, column_names=COLUMNS[table],
                                   settings=INSERT_SETTINGS)
                pending.clear()


def _source(record: Any) -> SourceRecord:
    """A kafka-python record of crm.events as the fold reads it."""
    return SourceRecord(record.key, record.value or b"", record.partition, record.offset, record.timestamp, record.topic)


def _fold(events: list[SourceRecord], states: dict[int, PartitionState], rules: Rulebooks) -> list[TopicRecord | None]:
    """One batch through the worker's batch fold, its state flushed, its outputs as records. Every
    output goes straight to a table, so everything before a record counts as delivered."""
    sent = [output.to_record() for output in fold_batch(events, states.__getitem__, rules)]
    for state in states.values():
        state.flush()
    return sent


def fold_partitions(until: dict[int, int], scratch: str, out: Any) -> None:
    """A folding process of the rebuild: the events of its partitions from offset 0 up to `until`,
    folded in the consumer's batches exactly as the worker does (streams/batch.py), against state in
    the scratch RocksDB, which it leaves closed for the catch-up. It sends ("records", (count,
    [the outputs' records])) per batch, then ("done", {partition: next offset}), or ("failed", traceback)."""
    consumer = None
    backends: dict[int, RocksDBBackend] = {}
    try:
        config = settings()
        rules = load_rulebooks(config)
        consumer = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap, enable_auto_commit=False,
                                 max_poll_records=5000, fetch_max_bytes=64 * 1024 * 1024)
        backends = {p: RocksDBBackend(Path(scratch) / str(p)) for p in until}
        states = {p: PartitionState(p, backend, config.state_cache_keys) for p, backend in backends.items()}
        positions = dict.fromkeys(until, 0)
        wanted = [TopicPartition(topics.EVENTS.name, p) for p, end in until.items() if end > 0]
        if wanted:
            consumer.assign(wanted)
            for tp in wanted:
                consumer.seek(tp, 0)
        while any(positions[p] < end for p, end in until.items()):
            events: list[SourceRecord] = []
            for tp, records in consumer.poll(timeout_ms=1000).items():
                for record in records:
                    if record.offset >= until[tp.partition]:
                        consumer.pause(tp)
                        break
                    events.append(_source(record))
                    positions[tp.partition] = record.offset + 1
            sent = _fold(events, states, rules)
            out.put(("records", (len(events), [(r.topic, r.key, r.value, r.headers) for r in sent if r is not None])))
        out.put(("done", positions))
    except BaseException:
        out.put(("failed", traceback.format_exc()))
    finally:
        if consumer is not None:
            consumer.close()
        for backend in backends.values():
            backend.close()


@dataclass(frozen=True)
class Comparison:
    table: str
    live_rows: int
    other_rows: int
    live_checksum: int
    other_checksum: int

    @property
    def identical(self) -> bool:
        return (self.live_rows, self.live_checksum) == (self.other_rows, self.other_checksum)


def verify(client: Client, database: str, against: str = REPLACED) -> list[Comparison]:
    """Row counts and checksums (over FINAL rows: the sum of a hash of every row, all columns) of each live table and its
    `against` counterpart (`__replaced` after a swap, `__rebuild` before one)."""
    out = []
    for table in TABLES:
        figures = []
        for name in (table, f"{table}{against}"):
            # A tuple hashes NULLs too (cityHash64 of the columns themselves is NULL when one is).
            count, checksum = client.query(f"SELECT count(), sum(cityHash64(tuple(*))) FROM {database}.{name} FINAL").result_rows[0]
            figures.append((int(count), int(checksum)))
        out.append(Comparison(table, figures[0][0], figures[1][0], figures[0][1], figures[1][1]))
    return out


def scratch_dir(settings: Settings) -> Path:
    return settings.state_dir / "replay"


# --- running a rebuild where the database is -------------------------------------------------------
#
# With the embedded database, only the projection writer's process may open it, and it does while
# the stack runs. `crm replay` then leaves a request file; the writer starts the rebuild in a thread
# of its own process and reports progress in a status file that the command shows.

def request_path(settings: Settings) -> Path:
    return scratch_dir(settings) / "request"


def status_path(settings: Settings) -> Path:
    return scratch_dir(settings) / "status.json"


def write_status(settings: Settings, **status: Any) -> None:
    path = status_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(orjson.dumps({"updated": time.time(), **status}))
    temporary.replace(path)


def read_status(settings: Settings) -> dict[str, Any] | None:
    try:
        return orjson.loads(status_path(settings).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def run_requested(client: Client, settings: Settings, rules: Rulebooks) -> None:
    """The writer's side: run the requested rebuild, reporting progress in the status file."""
    request_path(settings).unlink(missing_ok=True)
    write_status(settings, state="running", done=0, total=0)
    try:
        figures = Rebuild(client, settings, rules,
                          progress=lambda done, total: write_status(settings, state="running", done=done,
                                                                    total=total)).run()
    except Exception as exc:  # reported to the waiting command; the live tables were not touched before the swap
        write_status(settings, state="failed", error=repr(exc))
        raise
    write_status(settings, state="done", **figures)
