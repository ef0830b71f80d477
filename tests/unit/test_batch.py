"""`batch.fold_batch` is what the worker and the rebuild run: the same pure `process` per record,
against per-partition state whose changes are flushed once per batch. These tests hold it to the
per-record fold, to its poison-pill rule and to its coalescing of snapshots."""

import zlib

import pytest

from services.simulator import Simulator, Workload, offline_sealer
from streams import batch as batch_module
from streams.batch import fold_batch
from streams.config import settings as crm_settings
from streams.outputs import OUTBOX, Accepted, BalanceChanged, DeadLetter, ProfileChanged
from streams.pipeline import load_customer, process
from streams.records import SourceRecord
from streams.rulebooks import load_rulebooks
from streams.state import MemoryBackend, PartitionState
from tests.factories import encoded, event

RULES = load_rulebooks(crm_settings())


def simulated_log(customers=80, days=40, seed=5):
    offsets = [0] * 6
    records = []
    for message in Simulator(Workload(customers=customers, days=days, seed=seed), offline_sealer()).messages(6):
        partition = message.partition if message.partition is not None else zlib.crc32(message.key) % 6
        records.append(SourceRecord(message.key, message.value, partition, offsets[partition], 1780000000000))
        offsets[partition] += 1
    return records


LOG = simulated_log()


class Partitions:
    """Per-partition state as the worker keeps it, over in-memory backends."""

    def __init__(self, cache_limit=20_000):
        self.backends = {p: MemoryBackend() for p in range(6)}
        self.states = {p: PartitionState(p, backend, cache_limit) for p, backend in self.backends.items()}

    def fold(self, records, committed=None):
        outputs = fold_batch(records, self.states.__getitem__, RULES, committed)
        for state in self.states.values():
            state.flush()
        return outputs

    def stored(self):
        return {p: dict(backend.data) for p, backend in self.backends.items()}


def per_record(records):
    """The reference: `process` record by record, every output kept."""
    reference = Partitions()
    outputs = []
    for record in records:
        state = reference.states[record.partition]
        outputs += process(record, state.store, state.seen, RULES, record.offset)
        state.flush()
    return reference, outputs


def facts(outputs):
    """Every fact, in order per topic and key (partitions are folded apart, so across keys the
    order may differ; within a key it is the log's)."""
    by_key = {}
    for o in outputs:
        if not o.SNAPSHOT:
            record = o.to_record()
            key = record.key if record is not None else o.record.key
            by_key.setdefault((type(o).__name__, key), []).append(repr(record or o))
    return by_key


def last_snapshots(outputs):
    last = {}
    for o in outputs:
        if o.SNAPSHOT:
            last[(type(o).__name__, o.to_record().key)] = o.to_record().value
    return last


REFERENCE, REFERENCE_OUTPUTS = per_record(LOG)


def batches(records, sizes):
    start, index = 0, 0
    while start < len(records):
        size = sizes[index % len(sizes)]
        yield records[start:start + size]
        start, index = start + size, index + 1


@pytest.mark.parametrize("sizes, cache_limit", [([1], 1), ([7], 3), ([100], 20_000), ([50, 3, 400], 10),
                                                ([5000], 50)])
def test_any_split_into_batches_gives_the_state_facts_and_last_snapshots_of_the_per_record_fold(sizes, cache_limit):
    partitions = Partitions(cache_limit)
    outputs = []
    for part in batches(LOG, sizes):
        outputs += partitions.fold(part)
    assert partitions.stored() == REFERENCE.stored()
    assert facts(outputs) == facts(REFERENCE_OUTPUTS)
    assert last_snapshots(outputs) == last_snapshots(REFERENCE_OUTPUTS)


def test_a_batch_sends_each_snapshot_once_per_customer_and_every_fact():
    customer = "c-batch"
    records = [SourceRecord(customer.encode(), encoded(event(kind, customer_id=customer)), 0, offset, 1772359200000)
               for offset, kind in enumerate(["customer_registered", "purchase_completed", "daily_sign_in",
                                              "purchase_completed"])]
    outputs = Partitions().fold(records)
    assert [o.profile.version for o in outputs if isinstance(o, ProfileChanged)] == [4]
    assert len([o for o in outputs if isinstance(o, BalanceChanged)]) == 1
    assert len([o for o in outputs if isinstance(o, Accepted)]) == 4
    # The snapshot comes after every fact of the batch that it includes.
    assert isinstance(outputs[-1], (ProfileChanged, BalanceChanged)) or isinstance(outputs[-1], OUTBOX)


def test_a_record_whose_fold_raises_is_dead_lettered_and_changes_nothing(monkeypatch):
    poison_id = None
    customer = "c-poison"
    bodies = [event("customer_registered", customer_id=customer), event(customer_id=customer),
              event("daily_sign_in", customer_id=customer), event(customer_id="c-other")]
    poison_id = bodies[1]["event_id"]
    records = [SourceRecord(b["customer_id"].encode(), encoded(b), 0, offset, 1772359200000)
               for offset, b in enumerate(bodies)]

    real_process = batch_module.process

    def process_with_a_bug(record, store, seen, rules, committed):
        if poison_id.encode() in record.value:
            store["c|" + customer] = {"corrupted": True}  # a write the failure must not leave behind
            raise ZeroDivisionError("a bug in a fold")
        return real_process(record, store, seen, rules, committed)

    monkeypatch.setattr(batch_module, "process", process_with_a_bug)
    partitions = Partitions()
    outputs = partitions.fold(records)

    letters = [o for o in outputs if isinstance(o, DeadLetter)]
    assert len(letters) == 1
    letter = letters[0]
    assert letter.reason == "processing_error"
    assert letter.record.value == records[1].value and letter.record.offset == 1
    assert letter.detail.startswith("ZeroDivisionError: a bug in a fold at ")
    assert "test_batch.py" in letter.detail
    # The customer's state is that of the other records alone, as if the poison were not in the log.
    monkeypatch.setattr(batch_module, "process", real_process)
    without = Partitions()
    without.fold([records[0], records[2], records[3]])
    assert load_customer(partitions.states[0].store, customer).profile.to_dict() == \
        load_customer(without.states[0].store, customer).profile.to_dict()
    assert load_customer(partitions.states[0].store, customer).profile.version == 2
    assert load_customer(partitions.states[0].store, "c-other") is not None
    # The worker went on: every other record was accepted.
    assert len([o for o in outputs if isinstance(o, Accepted)]) == 3


def test_a_poison_record_leaves_other_partitions_alone(monkeypatch):
    bodies = [event(customer_id="c-p0"), event(customer_id="c-p1")]
    records = [SourceRecord(b"c-p0", encoded(bodies[0]), 0, 0, 1772359200000),
               SourceRecord(b"c-p1", encoded(bodies[1]), 1, 0, 1772359200000)]
    calls = []
    real_process = batch_module.process

    def counting(record, *args):
        calls.append(record.partition)
        if record.partition == 0:
            raise ValueError("bad")
        return real_process(record, *args)

    monkeypatch.setattr(batch_module, "process", counting)
    outputs = Partitions().fold(records)
    assert calls == [0, 1]  # nothing folded twice: the failing partition had nothing before it
    assert [type(o).__name__ for o in outputs][0] == "DeadLetter"
