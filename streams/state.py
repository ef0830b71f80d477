"""The worker's state for one partition of the events topic, as the fold sees it: a mapping of
keys to values, with every change held back in memory until the batch that made it is flushed.

- Reads come from the changes of the current batch, then from a bounded cache of what the backend
  holds (least recently used first out), then from the backend itself (RocksDB in the worker and the
  rebuild, a dict in tests), decoded once and kept decoded.
- Writes only mark a key changed. `flush` encodes each changed key once and hands it to the backend
  once, however often the batch wrote it: one backend write and one changelog record per key per
  batch, not per event.
- `discard` forgets the changes since the last flush, and the cache with them: a record whose fold
  raised is taken out of its batch, and the batch folded again from the state as it was
  (streams/batch.py).

Values are live objects (a customer's state is a `CustomerState`), so the fold reads and writes
them without decoding and encoding at every event. The contract that keeps that exact: a value the
fold read is its working copy, and whatever it changes in it, it writes back within the same record
(streams/pipeline.py does), unless the record fails, which `discard` covers. A value decoded from
the backend folds exactly like the live object it was encoded from (tests/unit/test_batch.py folds
with a cache of one value to prove it)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import Any, Protocol

import orjson

from streams.customer import CustomerState
from streams.pipeline import SeenEvent, customer_store_key

# Key prefixes in the backend: the fold's own keys (customers, timers, segments), and event ids.
FOLD_PREFIX, SEEN_PREFIX = b"f|", b"e|"
_CUSTOMER_PREFIX = FOLD_PREFIX + customer_store_key("").encode()
_DELETED = object()


def encode(key: bytes, value: Any) -> bytes:
    """A value as the backend and the changelog store it (orjson; domain objects as their dicts)."""
    if key.startswith(_CUSTOMER_PREFIX):
        return orjson.dumps(value.to_dict())
    if key.startswith(SEEN_PREFIX):
        return orjson.dumps(value.to_list())
    return orjson.dumps(value)


def decode(key: bytes, raw: bytes) -> Any:
    data = orjson.loads(raw)
    if key.startswith(_CUSTOMER_PREFIX):
        return CustomerState.from_dict(data)
    if key.startswith(SEEN_PREFIX):
        return SeenEvent.from_list(data)
    return data


class Backend(Protocol):
    """Durable storage of one partition's state: bytes to bytes, written in batches."""

    def get(self, key: bytes) -> bytes | None: ...

    def keys(self, prefix: bytes) -> Iterator[bytes]: ...

    def write(self, changes: dict[bytes, bytes | None], checkpoint: int | None) -> None:
        """Put (or, for None, delete) every key of `changes` atomically, with the changelog
        offset they reach (None where there is no changelog)."""


class MemoryBackend:
    """A backend in a dict: for tests and for folds that need no durability."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.checkpoint: int | None = None
        self.writes = 0

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def keys(self, prefix: bytes) -> Iterator[bytes]:
        return iter([key for key in self.data if key.startswith(prefix)])

    def write(self, changes: dict[bytes, bytes | None], checkpoint: int | None) -> None:
        for key, value in changes.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value
        self.checkpoint = checkpoint
        self.writes += 1


class PartitionState:
    def __init__(self, partition: int, backend: Backend, cache_limit: int = 20_000):
        self.partition = partition
        self.backend = backend
        self.cache_limit = cache_limit
        self._cache: OrderedDict[bytes, Any] = OrderedDict()
        self._changes: dict[bytes, Any] = {}
        self._encoded: dict[bytes, bytes | None] | None = None
        self.store: MutableMapping[str, Any] = StateView(self, FOLD_PREFIX)
        self.seen: MutableMapping[str, SeenEvent] = StateView(self, SEEN_PREFIX)

    # --- values -----------------------------------------------------------------------------------

    def get(self, key: bytes) -> Any:
        """The value of `key`, or None."""
        if key in self._changes:
            value = self._changes[key]
            return None if value is _DELETED else value
        value = self._cache.get(key)
        if value is not None:
            self._cache.move_to_end(key)
            return value
        raw = self.backend.get(key)
        if raw is None:
            return None
        value = self._cache[key] = decode(key, raw)
        return value

    def put(self, key: bytes, value: Any) -> None:
        self._changes[key] = value
        self._encoded = None

    def delete(self, key: bytes) -> None:
        self.put(key, _DELETED)

    def keys(self, prefix: bytes) -> Iterator[bytes]:
        stored = [key for key in self.backend.keys(prefix) if key not in self._changes]
        changed = [key for key, value in self._changes.items() if value is not _DELETED and key.startswith(prefix)]
        return iter(stored + changed)

    # --- the batch --------------------------------------------------------------------------------

    def changes(self) -> dict[bytes, bytes | None]:
        """Every key written since the last flush, encoded once, with its last value (None: deleted)."""
        if self._encoded is None:
            self._encoded = {key: None if value is _DELETED else encode(key, value)
                             for key, value in self._changes.items()}
        return self._encoded

    def discard(self) -> None:
        """Forget the changes since the last flush; and the cache, whose values a failed fold may
        have changed in place."""
        self._changes.clear()
        self._encoded = None
        self._cache.clear()

    def flush(self, checkpoint: int | None = None) -> int:
        """Write the changes to the backend (with the changelog offset they reach), keep them in
        the cache, and trim the cache to its limit. Returns how many keys were written."""
        if not self._changes:
            return 0
        self.backend.write(self.changes(), checkpoint)
        for key, value in self._changes.items():
            if value is _DELETED:
                self._cache.pop(key, None)
            else:
                self._cache[key] = value
                self._cache.move_to_end(key)
        while len(self._cache) > self.cache_limit:
            self._cache.popitem(last=False)
        written = len(self._changes)
        self._changes, self._encoded = {}, None
        return written


class StateView(MutableMapping[str, Any]):
    """The part of a partition's state under one prefix, with str keys."""

    def __init__(self, state: PartitionState, prefix: bytes):
        self._state, self._prefix = state, prefix

    def __getitem__(self, key: str) -> Any:
        value = self._state.get(self._prefix + key.encode())
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self._state.get(self._prefix + key.encode())
        return default if value is None else value

    def __setitem__(self, key: str, value: Any) -> None:
        self._state.put(self._prefix + key.encode(), value)

    def __delitem__(self, key: str) -> None:
        raw_key = self._prefix + key.encode()
        if self._state.get(raw_key) is None:
            raise KeyError(key)
        self._state.delete(raw_key)

    def __iter__(self) -> Iterator[str]:
        skip = len(self._prefix)
        return (key[skip:].decode() for key in self._state.keys(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)
