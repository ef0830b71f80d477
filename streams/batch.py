"""A batch of records of the events topic, folded as the worker and the rebuild both do it: each
record through the pure `pipeline.process`, against its partition's state (streams/state.py), whose
changes the caller then flushes once per batch.

A record whose fold raises (a bug, or input the catalog let through that a fold cannot take)
becomes a `processing_error` dead letter and changes nothing: its partition's changes of this batch
are discarded and the partition's other records of the batch are folded again from the state as it
was, which gives the same result as before (the fold is deterministic). Partitions never share
state, so the others are not touched. Snapshot outputs (profiles, balances) are then coalesced to the
last per customer; every fact goes out, in order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, Protocol

from streams.outputs import DeadLetter, Output, coalesce, processing_error
from streams.pipeline import SeenEvent, process
from streams.records import SourceRecord
from streams.rulebooks import Rulebooks


class FoldState(Protocol):
    """One partition's state as a batch fold needs it (streams.state.PartitionState)."""
    store: MutableMapping[str, Any]
    seen: MutableMapping[str, SeenEvent]

    def discard(self) -> None: ...


def fold_batch(records: Iterable[SourceRecord], state_of: Callable[[int], FoldState], rules: Rulebooks,
               committed: Mapping[int, int] | None = None) -> list[Output]:
    """The outputs of a batch. `committed` is each partition's committed offset (outputs of records
    before it were delivered; see streams/customer.py's outbox); None when every output goes
    straight to its destination, as in the rebuild: then each record's predecessors count as delivered."""
    by_partition: dict[int, list[SourceRecord]] = {}
    for record in records:
        by_partition.setdefault(record.partition, []).append(record)
    outputs: list[Output] = []
    for partition, group in by_partition.items():
        committed_offset = None if committed is None else committed.get(partition, -1)
        outputs += fold_partition(group, state_of(partition), rules, committed_offset)
    return coalesce(outputs)


def fold_partition(records: list[SourceRecord], state: FoldState, rules: Rulebooks,
                   committed_offset: int | None) -> list[Output]:
    """One partition's records of a batch, in order, each failing record dead-lettered and left out."""
    failed: dict[int, DeadLetter] = {}
    while True:
        outputs: list[Output] = []
        for record in records:
            letter = failed.get(record.offset)
            if letter is not None:
                outputs.append(letter)
                continue
            try:
                outputs += process(record, state.store, state.seen, rules,
                                   record.offset if committed_offset is None else committed_offset)
            except Exception as exc:  # any bug in a fold is this record's dead letter, not the worker's end
                failed[record.offset] = processing_error(record, exc)
                state.discard()
                break
        else:
            return outputs
