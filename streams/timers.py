"""Which customers of a partition the passing of time will change, and when.

Kept in the worker's state table beside the customers, under `t|` keys, so that it is written to
the same changelog partition in the same order as the customer states it points at:
- `t|<partition>`: the partition's meta: the event time of the last tick applied, the hour buckets
  that have entries (with their chunk counts), and which customers recent ticks changed (so a
  redelivered tick can re-send their outputs).
- `t|<partition>|<hour>|<chunk>`: customer keys due within the hour that ends at `<hour>` (hours since
  the epoch), in chunks of at most CHUNK keys, so that adding one key rewrites a small value (each write also
  goes to the changelog).
  A tick wakes the customers of every hour that has ended by its time: what is due is applied at
  its exact event time, and sent at most an hour (plus a tick interval) after it.
Entries are hints: a customer may be listed in several buckets, or in one that no longer applies
(its deadline moved). Waking a customer with nothing due changes nothing."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

HOUR_MS = 3_600_000
CHUNK = 100


def bucket_of(millis: int) -> int:
    """The hour boundary at or after `millis`: a bucket is complete once a tick reaches it, so a
    sweep never touches a bucket that the same sweep may still add to."""
    return -(-millis // HOUR_MS)


class PartitionTimers:
    def __init__(self, store: MutableMapping[str, Any], partition: int):
        self.store = store
        self.partition = partition
        self.meta_key = f"t|{partition}"
        meta = store.get(self.meta_key) or {}
        self.clock_ms: int = meta.get("clock_ms", -1)
        self.hours: dict[str, int] = meta.get("hours", {})
        self.sweeps: list[list[Any]] = meta.get("sweeps", [])

    def save(self) -> None:
        self.store[self.meta_key] = {"clock_ms": self.clock_ms, "hours": self.hours, "sweeps": self.sweeps}

    def _chunk_key(self, hour: int | str, chunk: int) -> str:
        return f"t|{self.partition}|{hour}|{chunk}"

    def add(self, customer_key: str, due_ms: int) -> None:
        """List a customer under the hour of `due_ms`. Saves the chunk, and the meta if it changed."""
        hour = str(bucket_of(due_ms))
        chunks = self.hours.get(hour, 0)
        if chunks:
            last = self.store.get(self._chunk_key(hour, chunks - 1)) or []
            if customer_key in last:
                return
            if len(last) < CHUNK:
                self.store[self._chunk_key(hour, chunks - 1)] = [*last, customer_key]
                return
        self.store[self._chunk_key(hour, chunks)] = [customer_key]
        self.hours[hour] = chunks + 1
        self.save()

    def due(self, until_ms: int) -> tuple[list[str], list[str]]:
        """The customers listed in buckets complete by `until_ms` (in a deterministic order), and
        the buckets' chunk keys. Nothing is removed yet: see `forget`."""
        taken: dict[str, None] = {}
        chunk_keys: list[str] = []
        for hour in sorted((h for h in self.hours if int(h) * HOUR_MS <= until_ms), key=int):
            for chunk in range(self.hours[hour]):
                key = self._chunk_key(hour, chunk)
                chunk_keys.append(key)
                taken.update(dict.fromkeys(self.store.get(key) or []))
        return list(taken), chunk_keys

    def forget(self, until_ms: int, chunk_keys: list[str]) -> None:
        """After the woken customers are saved: drop the buckets from the meta, save it, then delete
        the chunks. A crash before the meta write leaves the buckets for the redelivered tick; one
        after it only leaves unreferenced chunks behind."""
        self.hours = {hour: chunks for hour, chunks in self.hours.items() if int(hour) * HOUR_MS > until_ms}
        self.save()
        for key in chunk_keys:
            self.store.pop(key, None)

    def record_sweep(self, offset: int, customer_keys: list[str], committed_offset: int) -> None:
        """Remember whom the tick at `offset` changed, until that offset is committed."""
        self.sweeps = [s for s in self.sweeps if s[0] >= committed_offset and s[0] != offset]
        if customer_keys:
            self.sweeps.append([offset, customer_keys])

    def swept_at(self, offset: int) -> list[str]:
        return next((keys for swept_offset, keys in self.sweeps if swept_offset == offset), [])
