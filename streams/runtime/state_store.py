"""The worker's state for the partitions it owns, on disk and in Kafka.

Each events partition has its state (streams/state.py) in a RocksDB database of its own
(`$CRM_STATE_DIR/worker/state/<partition>`) and in the same partition of one compacted changelog
topic. Faust's tables write a changelog record per table write, that is per event, and cannot be
written once per batch from a batch agent (they take the partition of each write from the event
being processed), so the worker owns this small store instead (docs/architecture.md).

A batch ends with `flush`: every key the batch changed goes to the changelog once, beside the
batch's outputs; once Kafka has acknowledged them all, the same changes and the changelog offset they
reach are written to RocksDB in one atomic write. Only then are the batch's source records
acknowledged. So RocksDB never holds what the changelog lacks, and a crash at any moment leaves
state that at worst lags the committed source offsets' successors: records that are then folded
again, which the fold's guards make harmless (streams/pipeline.py).

On assignment a partition's database is brought up to date from the changelog, from the offset it
reaches (the whole changelog when the database is missing, or when it claims more than the
changelog holds: a recreated topic). A partition that moves to another worker and back is restored
the same way, so its writes meanwhile are not lost."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.records import TopicRecord
from streams.state import PartitionState
from streams.state_rocksdb import RocksDBBackend

log = logging.getLogger("crm.worker.state")
# Sends one record and returns what resolves to its metadata (an aiokafka future) once Kafka has it.
Send = Callable[[TopicRecord, int | None], Awaitable[Awaitable[Any]]]


class StateStore:
    def __init__(self, directory: Path, changelog_topic: str, bootstrap: str, cache_limit: int):
        self.directory = directory
        self.changelog_topic = changelog_topic
        self.bootstrap = bootstrap
        self.cache_limit = cache_limit
        self.partitions: dict[int, PartitionState] = {}
        self._backends: dict[int, RocksDBBackend] = {}
        # Held while a batch is folded and flushed, and while partitions open or close.
        self.lock = asyncio.Lock()

    def state_of(self, partition: int) -> PartitionState:
        return self.partitions[partition]

    # --- ownership --------------------------------------------------------------------------------

    async def open(self, partitions: Iterable[int]) -> None:
        """Open and restore the partitions not open yet (call with the lock held)."""
        wanted = sorted(set(partitions) - set(self.partitions))
        if not wanted:
            return
        # A short fetch wait: an empty changelog partition must not hold the others up for the
        # default half second.
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                    client_id="crm-worker-restore", fetch_max_wait_ms=20,
                                    fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
        await consumer.start()
        try:
            backends = await self._restore(consumer, wanted)
        finally:
            await consumer.stop()
        for partition, backend in backends.items():
            self._backends[partition] = backend
            self.partitions[partition] = PartitionState(partition, backend, self.cache_limit)

    def close(self, partitions: Iterable[int]) -> None:
        """Forget partitions this worker no longer owns (call with the lock held, after a flush)."""
        for partition in partitions:
            state = self.partitions.pop(partition, None)
            if state is not None and state.changes():
                log.warning("partition %d closed with %d unflushed changes (they will be folded again)",
                            partition, len(state.changes()))
            backend = self._backends.pop(partition, None)
            if backend is not None:
                backend.close()

    def close_all(self) -> None:
        self.close(list(self.partitions))

    async def _restore(self, consumer: AIOKafkaConsumer, partitions: list[int]) -> dict[int, RocksDBBackend]:
        """Each partition's database brought up to the changelog's end, all partitions at once."""
        tps = {partition: TopicPartition(self.changelog_topic, partition) for partition in partitions}
        begins = await consumer.beginning_offsets(list(tps.values()))
        ends = await consumer.end_offsets(list(tps.values()))
        backends: dict[int, RocksDBBackend] = {}
        starts: dict[TopicPartition, int] = {}
        for partition, tp in tps.items():
            backends[partition], start = self._local(partition, begins[tp], ends[tp])
            if start < ends[tp]:
                starts[tp] = start
        restored = dict.fromkeys(partitions, 0)
        if starts:
            consumer.assign(list(starts))
            for tp, start in starts.items():
                consumer.seek(tp, start)
            pending = set(starts)
            while pending:
                fetched = await consumer.getmany(*pending, timeout_ms=1000, max_records=20_000)
                for tp, records in fetched.items():
                    backends[tp.partition].write({record.key: record.value for record in records}, records[-1].offset)
                    restored[tp.partition] += len(records)
                pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        for partition, tp in tps.items():
            log.info("partition %d: state restored from the changelog up to offset %d (%d records)",
                     partition, ends[tp], restored[partition])
        return backends

    def _local(self, partition: int, begin: int, end: int) -> tuple[RocksDBBackend, int]:
        """The partition's database, and the changelog offset to restore it from: after the offset
        its last write reached, or the changelog's beginning when it has none or claims more than
        the changelog holds (a recreated topic)."""
        path = self.directory / str(partition)
        backend = RocksDBBackend(path)
        checkpoint = backend.checkpoint
        if checkpoint is None:
            return backend, begin
        if begin - 1 <= checkpoint < end:
            return backend, checkpoint + 1
        log.warning("state of partition %d reaches changelog offset %d, outside [%d, %d): restoring it whole",
                    partition, checkpoint, begin, end)
        backend.destroy()
        shutil.rmtree(path, ignore_errors=True)
        return RocksDBBackend(path), begin

    # --- the end of a batch -----------------------------------------------------------------------

    def changelog_records(self) -> dict[int, list[TopicRecord]]:
        """Per partition, a changelog record for every key its batch changed (None value: deleted)."""
        return {partition: [TopicRecord(self.changelog_topic, key, value) for key, value in state.changes().items()]  # type: ignore[arg-type]
                for partition, state in self.partitions.items() if state.changes()}

    def flushed(self, changelog_offsets: dict[int, int]) -> int:
        """Kafka has the changelog records up to these offsets: write the same changes to RocksDB."""
        written = 0
        for partition, offset in changelog_offsets.items():
            written += self.partitions[partition].flush(offset)
        return written
