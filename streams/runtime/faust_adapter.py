"""The one place that touches private parts of faust-streaming and aiokafka. Version-pinned:
`apply` refuses other versions, so an upgrade makes someone check whether each piece is still
needed (tests/unit/test_faust_adapter.py checks each against the installed libraries).

1. Fixes to the Kafka clients, applied when the worker's app is created. All close one hole: records
skipped for good after a worker restart. At a rebalance Faust throws away the records it fetched for
the streams while the flow was suspended, then seeks every partition back to its committed offset
to read them again. Two things defeated the second read, and the crash test (SIGKILL mid-stream,
restart, compare) showed the skipped records:

- Faust's fetch loop (`Consumer._drain_messages`) recorded each thrown-away record's offset as read,
  so after the seek the same records counted as already read and were dropped once more: never
  processed and never acknowledged, so the committed offset also stopped moving.
- aiokafka's `seek_to_committed` moves a partition only when its committed offset is above 0, so a
  partition whose committed offset is 0 kept its fetch position past the thrown-away records.

2. What still slips through is caught by `Continuity`: it notices a gap in a partition's records,
records in `Consumer._sought` the offset it seeks back to, and the fetch loop below then drops the
stale records fetched before that seek instead of letting them move the read offset ahead again.

3. `committed_offset`: the consumer's last committed offset of a partition, which Faust keeps in a
private mapping.

Each patched function below is the library's own, with the changes marked: the fixes, and one
speed-up (a fetch's records delivered under one `wait_first`, not one each)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, cast

import aiokafka
import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError
from faust.transport import consumer as faust_consumer
from faust.transport.consumer import CONSUMER_FETCHING
from mode import Service, ServiceT

PATCHED_FOR = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}
aiokafka_log = logging.getLogger("aiokafka.consumer.consumer")
log = logging.getLogger("crm.worker")


async def _deliver(self: Any, ait: AsyncIterator) -> None:
    """The records of one fetch to the streams, in order: the body of the library's per-record
    loop, without its `wait_first` around each callback (see `_drain_messages`)."""
    callback = self.callback
    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    acks_enabled_for = self.app.topics.acks_enabled_for
    num_since_yield = 0
    async for tp, message in ait:
        num_since_yield += 1
        if num_since_yield > 100:
            await asyncio.sleep(0)
            num_since_yield = 0
        offset = message.offset
        # The fix, second part: after a seek, records fetched before it are stale;
        # only the record at the sought offset resumes the partition.
        sought = self._sought.get(tp)
        if sought is not None:
            if offset != sought:
                continue
            del self._sought[tp]
        r_offset = get_read_offset(tp)
        if r_offset is None or offset >= r_offset:
            gap = offset - (r_offset or 0)
            # We have a gap in income messages
            if gap > 1 and r_offset:
                if acks_enabled_for(message.topic):
                    await self._add_gap(tp, r_offset + 1, offset)
            await callback(message)
            # The fix: a record the suspended flow kept from the streams is not read.
            if self.suspend_flow.is_set():
                return
            set_read_offset(tp, offset)
        else:
            self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key, message.value)


async def _drain_messages(self: Any, fetcher: ServiceT) -> None:
    # This is the background thread started by Fetcher, used to
    # constantly read messages using Consumer.getmany.
    # It takes Fetcher as argument, because we must be able to
    # stop it using `await Fetcher.stop()`.
    getmany = self.getmany
    consumer_should_stop = cast(Service, self)._stopped.is_set
    fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
    flag_consumer_fetching = CONSUMER_FETCHING
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(flag_consumer_fetching)
            ait = cast(AsyncIterator, getmany(timeout=1.0))

            # Sleeping because sometimes getmany is called in a loop
            # never releasing to the event loop
            await self.sleep(0)
            if not self.should_stop:
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
                # The speed-up: one `wait_first` per fetch, not per record. It creates four futures
                # and an `asyncio.wait` each time: about 100 us, the largest single cost of the
                # worker outside the fold. A suspended flow still cuts the delivery short at once.
                await self.wait_first(_deliver(self, ait), self.suspend_flow.wait())
                unset_flag(flag_consumer_fetching)

    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(flag_consumer_fetching)


async def seek_to_committed(self: Any, *partitions: TopicPartition) -> dict[TopicPartition, int | None]:
    """aiokafka's own, with `offset is not None and offset >= 0` where it had `offset and offset > 0`."""
    if not all(isinstance(p, TopicPartition) for p in partitions):
        raise TypeError("partitions must be TopicPartition instances")
    if not partitions:
        partitions = self._subscription.assigned_partitions()
        assert partitions, "No partitions are currently assigned"
    else:
        not_assigned = set(partitions) - self._subscription.assigned_partitions()
        if not_assigned:
            raise IllegalStateError(f"Partitions {not_assigned} are not assigned")
    committed_offsets = {}
    for tp in partitions:
        offset = await self.committed(tp)
        committed_offsets[tp] = offset
        aiokafka_log.debug("Seeking to committed of partition %s %s", tp, offset)
        if offset is not None and offset >= 0:
            self._fetcher.seek_to(tp, offset)
    return committed_offsets


def apply() -> None:
    found = {"faust-streaming": faust.__version__, "aiokafka": aiokafka.__version__}
    if found != PATCHED_FOR:
        raise RuntimeError(f"streams/runtime/faust_adapter.py patches {PATCHED_FOR}, found {found}: check whether the "
                           "fixes are still needed, then update or remove them")
    faust_consumer.Consumer._drain_messages = _drain_messages  # type: ignore[method-assign]
    faust_consumer.Consumer._sought = {}  # tp -> offset a seek went back to; see _drain_messages
    AIOKafkaConsumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]


def committed_offset(app: faust.App, topic: str, partition: int) -> int:
    """The consumer's last committed offset for a source partition, or -1 when unknown. Faust
    flushes the producer before it commits, and the agent acknowledges a batch only after flushing
    its outputs, so every output of an earlier record was delivered. (-1 only makes the outbox keep
    more than it must.)"""
    committed = getattr(app.consumer, "_committed_offset", {})
    for tp, offset in committed.items():
        if tp.topic == topic and tp.partition == partition and offset is not None:
            return offset
    return -1


class Continuity:
    """Makes sure the agent sees every record of each events partition, in order, even when the
    consumer skips some. faust-streaming 0.15.3 can pass over records around a restart's rebalance
    (it throws away what it fetched while restoring tables, and its read offsets can then run ahead
    of the re-read; see the fixes above): the crash test lost records that way. The pipeline
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
            consumer._sought[tp] = expected  # see _drain_messages
            await consumer.seek_wait({tp: expected})
            consumer._read_offset[tp] = expected
            return False
        # An older record (after a seek) is a redelivery to the pipeline; it never moves us back.
        self.expected[tp] = max(expected, message.offset + 1)
        return True
