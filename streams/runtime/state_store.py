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
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                    client_id="crm-worker-restore", fetch_max_bytes=64 * 1024 * 1024,
                                    max_partition_fetch_bytes=16 * 1024 * 1024)
        await consumer.start()
        try:
            for partition in wanted:
                backend = await self._restore(consumer, partition)
                self._backends[partition] = backend
                self.partitions[partition] = PartitionState(partition, backend, self.cache_limit)
        finally:
            await consumer.stop()

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

    async def _restore(self, consumer: AIOKafkaConsumer, partition: int) -> RocksDBBackend:
        path = self.directory / str(partition)
        backend = RocksDBBackend(path)
        tp = TopicPartition(self.changelog_topic, partition)
        consumer.assign([tp])
        begin = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        checkpoint = backend.checkpoint
        if checkpoint is not None and not begin - 1 <= checkpoint < end:
            log.warning("state of partition %d reaches changelog offset %d, outside [%d, %d): restoring it whole",
                        partition, checkpoint, begin, end)
            backend.destroy()
            shutil.rmtree(path, ignore_errors=True)
            backend, checkpoint = RocksDBBackend(path), None
        start = begin if checkpoint is None else checkpoint + 1
        restored = 0
        if start < end:
            consumer.seek(tp, start)
            while await consumer.position(tp) < end:
                fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=20_000)
                for records in fetched.values():
                    backend.write({record.key: record.value for record in records}, records[-1].offset)
                    restored += len(records)
        log.info("partition %d: state restored from changelog offsets %d to %d (%d records)",
                 partition, start, end, restored)
        return backend

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
