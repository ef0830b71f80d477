"""`pipeline.process` decides everything about a record; these tests drive it with plain dicts as the
worker's tables, including the partial-write states a crash can leave behind."""

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from services.simulator import Simulator, Workload, offline_sealer

from streams.config import settings as crm_settings
from streams.rulebooks import load_rulebooks
from streams.pipeline import Accepted, DeadLetter, ProfileChanged, SourceRecord, load_customer, process
from streams.state import MemoryBackend, PartitionState
from tests.factories import encoded, event

RULES = load_rulebooks(crm_settings())


class Profiles:
    """The profiles inside a worker store, by customer key."""

    def __init__(self, store):
        self.store = store

    def __getitem__(self, customer_key):
        return load_customer(self.store, customer_key).profile


def record(body, offset, partition=0, key=None, timestamp_ms=1772359200000):
    value = encoded(body) if isinstance(body, dict) else body
    if key is None and isinstance(body, dict):
        key = (body.get("customer_id") or "").encode()
    return SourceRecord(key=key, value=value, partition=partition, offset=offset, timestamp_ms=timestamp_ms)


def run(records, store=None, seen=None):
    store = {} if store is None else store
    seen = {} if seen is None else seen
    outputs = [output for r in records for output in process(r, store, seen, RULES)]
    return store, seen, outputs


def kinds(outputs):
    return [type(o).__name__ for o in outputs]


def test_valid_event_is_accepted_and_folded():
    store, seen, outputs = run([record(event(), 0)])
    assert kinds(outputs) == ["Accepted", "ProfileChanged", "SegmentChanged", "LedgerEntry", "BalanceChanged"]
    assert Profiles(store)["cust-1"].purchase_count == 1
    assert len(seen) == 1


def test_received_at_is_taken_from_the_record_timestamp_when_missing():
    _, _, outputs = run([record(event(), 0, timestamp_ms=1772359205000)])
    assert outputs[0].event.received_at.isoformat() == "2026-03-01T10:00:05+00:00"


def test_duplicate_event_id_changes_nothing():
    body = event()
    profiles, seen, _ = run([record(body, 0)])
    before = (dict(profiles), dict(seen))
    _, _, outputs = run([record({**body, "received_at": "2026-03-05T00:00:00+00:00"}, 1)], profiles, seen)
    assert kinds(outputs) == ["Duplicate"]
    assert (profiles, seen) == before


def test_same_event_id_with_other_content_is_dead_lettered():
    body = event()
    profiles, seen, _ = run([record(body, 0)])
    conflicting = {**body, "occurred_at": "2026-03-02T10:00:00+00:00"}
    _, _, outputs = run([record(conflicting, 1)], profiles, seen)
    assert kinds(outputs) == ["DeadLetter"]
    assert outputs[0].reason == "conflicting_duplicate"
    assert Profiles(profiles)["cust-1"].purchase_count == 1


def test_redelivered_record_is_not_applied_again_but_its_outputs_are_resent():
    first = record(event(), 0)
    profiles, seen, _ = run([first])
    _, _, outputs = run([first], profiles, seen)
    assert kinds(outputs) == ["Accepted", "ProfileChanged", "SegmentChanged", "LedgerEntry", "BalanceChanged"]
    assert Profiles(profiles)["cust-1"].version == 1


def test_crash_that_kept_the_profile_but_lost_the_seen_marker():
    first = record(event(), 0)
    profiles, seen, _ = run([first])
    seen.clear()
    run([first], profiles, seen)
    assert Profiles(profiles)["cust-1"].version == 1
    assert seen  # the marker is written again


def test_crash_that_kept_the_seen_marker_but_lost_the_profile():
    first = record(event(), 0)
    profiles, seen, _ = run([first])
    profiles.clear()
    run([first], profiles, seen)
    assert Profiles(profiles)["cust-1"].version == 1


def test_bad_records_become_dead_letters_with_their_bytes_and_position():
    _, _, outputs = run([record(b"\x00\xffgarbage", 7, partition=3, key=b"cust-1")])
    [letter] = outputs
    assert isinstance(letter, DeadLetter)
    assert (letter.reason, letter.record.value, letter.record.partition, letter.record.offset) == (
        "malformed_json", b"\x00\xffgarbage", 3, 7)


def test_record_keyed_by_something_else_than_the_customer_is_dead_lettered():
    _, _, outputs = run([record(event(), 0, key=b"store-1")])
    assert [o.reason for o in outputs] == ["wrong_key"]
    _, _, outputs = run([SourceRecord(None, encoded(event()), 0, 0, 0)])
    assert [o.reason for o in outputs] == ["wrong_key"]


# --- properties ------------------------------------------------------------------------------------

EVENT_TYPES = ("purchase_completed", "purchase_refunded", "product_viewed", "daily_sign_in")
customers = st.sampled_from(["c-a", "c-b", "c-c"])
bodies = st.builds(
    lambda type_, customer, day, hour: event(type_, customer_id=customer,
                                             occurred_at=f"2026-03-{day:02d}T{hour:02d}:00:00+00:00"),
    st.sampled_from(EVENT_TYPES), customers, st.integers(1, 28), st.integers(0, 23),
)


def partition_of(customer_id):
    return sum(customer_id.encode()) % 2


def to_log(bodies_in_order):
    """Records as the broker would store them: per-partition offsets, customers keyed to a partition."""
    next_offset = {0: 0, 1: 0}
    log = []
    for body in bodies_in_order:
        partition = partition_of(body["customer_id"])
        log.append(record(body, next_offset[partition], partition=partition))
        next_offset[partition] += 1
    return log


def state_after(records):
    store, _, outputs = run(records)
    return store


@settings(max_examples=60, deadline=None)
@given(st.lists(bodies, min_size=1, max_size=25), st.data())
def test_duplicates_and_redelivered_suffixes_give_identical_state(unique, data):
    clean_log = to_log(unique)
    expected = state_after(clean_log)

    # Producer resends: the same events appear again later in the log, at new offsets.
    resent = data.draw(st.lists(st.sampled_from(unique), max_size=10))
    with_duplicates = to_log(unique + resent)
    assert state_after(with_duplicates) == expected

    # A crash: the worker restarts from an earlier committed offset and sees a suffix again.
    cut = data.draw(st.integers(0, len(clean_log)))
    replayed = clean_log + clean_log[cut:]
    assert state_after(replayed) == expected


@settings(max_examples=40, deadline=None)
@given(st.lists(bodies, min_size=1, max_size=25))
def test_profile_figures_equal_direct_sums_over_the_events(unique):
    store = state_after(to_log(unique))
    for customer in {b["customer_id"] for b in unique}:
        profile = Profiles(store)[customer]
        mine = [b for b in unique if b["customer_id"] == customer]
        purchases = [b for b in mine if b["type"] == "purchase_completed"]
        refunds = [b for b in mine if b["type"] == "purchase_refunded"]
        assert profile.purchase_count == len(purchases)
        assert profile.refund_count == len(refunds)
        assert profile.spend_minor.get("EUR", 0) == 700 * len(purchases) - 200 * len(refunds)
        assert profile.version == len(mine)
        occurred = sorted(b["occurred_at"] for b in mine)
        assert profile.first_seen_ms < profile.last_seen_ms or occurred[0] == occurred[-1]


def test_outputs_of_a_replay_are_idempotent_for_versioned_rows():
    log = to_log([event(customer_id="c-a"), event("daily_sign_in", customer_id="c-a")])
    _, _, first = run(log)
    profiles, seen, _ = run(log)
    _, _, again = run(log, profiles, seen)
    newest = lambda outs: max(o.profile.version for o in outs if isinstance(o, ProfileChanged))
    assert newest(first) == newest(again) == 2
    assert {str(o.event.event_id) for o in first if isinstance(o, Accepted)} == {
        str(o.event.event_id) for o in again if isinstance(o, Accepted)}


def test_state_written_as_bytes_and_read_back_folds_exactly_like_state_in_memory():
    """Compact serialisation (defaults left out) loses nothing: a simulated month through a store of
    bytes gives the same outputs as through plain objects."""
    messages = list(Simulator(Workload(customers=120, days=40, seed=5), offline_sealer()).messages(6))
    offsets = [0] * 6
    records = []
    for message in messages:
        partition = message.partition if message.partition is not None else zlib.crc32(message.key) % 6
        records.append(SourceRecord(message.key, message.value, partition, offsets[partition], 1780000000000))
        offsets[partition] += 1

    def outputs(cache_limit):
        # A cache of nothing: every value is read back from its bytes at every record.
        state = PartitionState(0, MemoryBackend(), cache_limit)
        made = []
        for r in records:
            made += [repr(o.profile.to_record()) if isinstance(o, ProfileChanged) else repr(getattr(o, "data", o))
                     for o in process(r, state.store, state.seen, RULES)]
            state.flush()
        return made

    assert outputs(0) == outputs(1_000_000)
