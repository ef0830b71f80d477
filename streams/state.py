"""The worker's state for one partition of the events topic, as the fold sees it: a mapping of
keys to values, with every change held back in memory until the batch that made it is flushed.

- Reads come from the changes of the current batch, then from a bounded cache of what the backend
  holds (least recently used first out), then from the backend itself (RocksDB in the worker and the
  rebuild, a dict in tests).
- Writes only mark a key changed. `flush` hands every changed key to the backend once, however often
  the batch wrote it: one backend write and one changelog record per key per batch, not per event.
- `discard` forgets the changes since the last flush: a record whose fold raised is taken out of
  its batch, and the batch folded again from the state as it was (streams/batch.py).

Values are kept as the bytes the backend stores (orjson), never as live objects: each read decodes
a fresh value, so the fold cannot change state except by writing it, and a value read from the cache
is the same as one read back from disk or from the changelog after a restart."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, Protocol, TypeVar

import orjson

from streams.pipeline import SeenEvent

T = TypeVar("T")
# Key prefixes in the backend: the fold's own keys (customers, timers, segments), and event ids.
FOLD_PREFIX, SEEN_PREFIX = b"f|", b"e|"


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
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._changes: dict[bytes, bytes | None] = {}
        self.store: MutableMapping[str, Any] = StateView(self, FOLD_PREFIX)
        self.seen: MutableMapping[str, SeenEvent] = StateView(self, SEEN_PREFIX, SeenEvent.from_list, SeenEvent.to_list)

    # --- bytes ------------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        if key in self._changes:
            return self._changes[key]
        value = self._cache.get(key)
        if value is not None:
            self._cache.move_to_end(key)
            return value
        value = self.backend.get(key)
        if value is not None:
            self._cache[key] = value
        return value

    def put(self, key: bytes, value: bytes | None) -> None:
        self._changes[key] = value

    def keys(self, prefix: bytes) -> Iterator[bytes]:
        stored = [key for key in self.backend.keys(prefix) if key not in self._changes]
        changed = [key for key, value in self._changes.items() if value is not None and key.startswith(prefix)]
        return iter(stored + changed)

    # --- the batch --------------------------------------------------------------------------------

    def changes(self) -> dict[bytes, bytes | None]:
        """Every key written since the last flush, with its last value (None: deleted)."""
        return dict(self._changes)

    def discard(self) -> None:
        self._changes.clear()

    def flush(self, checkpoint: int | None = None) -> int:
        """Write the changes to the backend (with the changelog offset they reach), move them into
        the cache, and trim the cache to its limit. Returns how many keys were written."""
        changes = self._changes
        if not changes:
            return 0
        self.backend.write(changes, checkpoint)
        for key, value in changes.items():
            if value is None:
                self._cache.pop(key, None)
            else:
                self._cache[key] = value
                self._cache.move_to_end(key)
        while len(self._cache) > self.cache_limit:
            self._cache.popitem(last=False)
        self._changes = {}
        return len(changes)


class StateView(MutableMapping[str, T], Generic[T]):
    """The part of a partition's state under one prefix, as str keys and decoded values."""

    def __init__(self, state: PartitionState, prefix: bytes, decode: Callable[[Any], T] = lambda data: data,
                 encode: Callable[[T], Any] = lambda value: value):
        self._state, self._prefix, self._decode, self._encode = state, prefix, decode, encode

    def __getitem__(self, key: str) -> T:
        raw = self._state.get(self._prefix + key.encode())
        if raw is None:
            raise KeyError(key)
        return self._decode(orjson.loads(raw))

    def get(self, key: str, default: Any = None) -> Any:
        raw = self._state.get(self._prefix + key.encode())
        return default if raw is None else self._decode(orjson.loads(raw))

    def __setitem__(self, key: str, value: T) -> None:
        self._state.put(self._prefix + key.encode(), orjson.dumps(self._encode(value)))

    def __delitem__(self, key: str) -> None:
        raw_key = self._prefix + key.encode()
        if self._state.get(raw_key) is None:
            raise KeyError(key)
        self._state.put(raw_key, None)

    def __iter__(self) -> Iterator[str]:
        skip = len(self._prefix)
        return (key[skip:].decode() for key in self._state.keys(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)
