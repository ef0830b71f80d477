"""A partition's state (streams/state.py) holds a batch's writes in memory and hands each changed
key to its backend once per flush; RocksDB (streams/state_rocksdb.py) stores them with the changelog
offset they reach."""

from streams.pipeline import SeenEvent
from streams.state import MemoryBackend, PartitionState
from streams.state_rocksdb import RocksDBBackend


def test_reads_see_the_batch_writes_before_any_flush():
    state = PartitionState(0, MemoryBackend())
    state.store["t|a"] = {"n": 1}
    assert state.store["t|a"] == {"n": 1}
    assert state.backend.data == {}


def test_a_key_written_many_times_in_a_batch_is_written_once_at_the_flush():
    backend = MemoryBackend()
    state = PartitionState(0, backend)
    for n in range(50):
        state.store["t|a"] = {"n": n}
    state.seen["event-1"] = SeenEvent("fp", 0, 7)
    assert state.flush(checkpoint=12) == 2
    assert backend.writes == 1 and backend.checkpoint == 12
    assert state.store["t|a"] == {"n": 49}
    assert state.seen["event-1"] == SeenEvent("fp", 0, 7)


def test_discard_forgets_the_writes_since_the_last_flush():
    state = PartitionState(0, MemoryBackend())
    state.store["t|a"] = {"n": 1}
    state.flush()
    state.store["t|a"] = {"n": 2}
    state.store["t|b"] = {"n": 3}
    del state.store["t|a"]
    state.discard()
    assert state.store["t|a"] == {"n": 1}
    assert "t|b" not in state.store
    assert state.flush() == 0


def test_discard_also_forgets_values_a_failed_fold_changed_in_place():
    state = PartitionState(0, MemoryBackend())
    state.store["t|a"] = {"items": [1]}
    state.flush()
    state.store["t|a"]["items"].append(2)  # a fold that raised before writing it back
    state.discard()
    assert state.store["t|a"] == {"items": [1]}


def test_a_customer_state_is_kept_as_an_object_and_stored_as_its_dict():
    from streams.customer import CustomerState

    backend = MemoryBackend()
    state = PartitionState(0, backend)
    customer = CustomerState.new("cust-1")
    state.store["c|cust-1"] = customer
    assert state.store["c|cust-1"] is customer
    state.flush()
    reread = PartitionState(0, backend).store["c|cust-1"]
    assert reread is not customer and reread.to_dict() == customer.to_dict()


def test_the_cache_is_bounded_and_evicted_values_are_read_back_from_the_backend():
    backend = MemoryBackend()
    state = PartitionState(0, backend, cache_limit=3)
    for n in range(10):
        state.store[f"t|{n}"] = n
    state.flush()
    assert len(state._cache) == 3
    assert [state.store[f"t|{n}"] for n in range(10)] == list(range(10))


def test_deletes_reach_the_backend_and_iteration_sees_only_live_keys_of_its_prefix():
    backend = MemoryBackend()
    state = PartitionState(0, backend)
    state.store["t|a"] = 1
    state.store["t|b"] = 2
    state.seen["e"] = SeenEvent("fp", 0, 1)
    state.flush()
    del state.store["t|a"]
    state.store["t|c"] = 3
    assert sorted(state.store) == ["t|b", "t|c"]
    assert list(state.seen) == ["e"]
    state.flush()
    assert sorted(backend.data) == [b"e|e", b"f|t|b", b"f|t|c"]


def test_rocksdb_keeps_the_data_and_its_changelog_offset_across_a_reopen(tmp_path):
    backend = RocksDBBackend(tmp_path / "0")
    state = PartitionState(0, backend)
    state.store["t|a"] = {"n": 1}
    state.store["t|0"] = {"clock_ms": 5}
    state.flush(checkpoint=41)
    del state.store["t|0"]
    state.flush(checkpoint=42)
    backend.close()
    reopened = RocksDBBackend(tmp_path / "0")
    assert reopened.checkpoint == 42
    assert PartitionState(0, reopened).store["t|a"] == {"n": 1}
    assert list(reopened.keys(b"f|")) == [b"f|t|a"]
    reopened.destroy()
    assert not (tmp_path / "0").exists()
