"""The customers' data keys, wrapped by the master key, in the compacted topic `crm.customer-keys`
(one record per data key, keyed by its id; value: the customer key it belongs to and the wrapped key).
Erasure writes a tombstone per key (the worker's fold emits them, streams/outputs.py); compaction then
removes the wrapped key from the broker's files (the bound: docs/privacy.md).

Every process that seals or opens personal values holds the whole topic in memory and follows it, so
a tombstone reaches it within a poll: after that it neither opens old tokens nor seals new ones under
the erased key. A plain data key never reaches a file: only wrapped ones are written."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from privacy.seal import KeyMaker, SealError, unwrap, wrap
from privacy.secrets import MasterKeyring
from streams import topics

log = logging.getLogger(__name__)
# Kafka closes (rolls) a segment only when a record arrives after segment.ms, and compacts only closed
# segments: on a quiet topic an erased key's wrapped record could wait for the next key ever made. So
# every process that follows the topic appends, this often, a tombstone of a fixed key to each partition
# that changed since: it closes the segment once segment.ms has passed, and compaction keeps one of them.
ROLL_NUDGE_SECONDS = 600.0
ROLL_NUDGE_KEY = b"~segment-roll"


@dataclass(frozen=True)
class WrappedKey:
    key_id: str
    customer_key: str
    master_key_id: str
    wrapped: str
    created_at: float

    def to_value(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def from_value(cls, value: bytes) -> WrappedKey:
        return cls(**orjson.loads(value))


class KeyStore:
    """Open with `open()`; close with `close()`. Thread-safe."""

    def __init__(self, bootstrap: str, keyring: MasterKeyring, topic: str = topics.CUSTOMER_KEYS.name):
        self._bootstrap = bootstrap
        self._keyring = keyring
        self._topic = topic
        self._lock = threading.RLock()
        self._records: dict[str, WrappedKey] = {}
        self._current: dict[str, str] = {}  # customer key -> id of its newest live data key
        self._by_customer: dict[str, set[str]] = {}  # customer key -> ids of its live data keys
        self._plain: dict[str, bytes] = {}  # unwrapped keys, in memory only
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._follower: threading.Thread | None = None
        self._stopping = threading.Event()
        self._nudged_at = time.monotonic()
        self._ends_seen: dict[int, int] = {}

    # --- life cycle ---

    def open(self, follow: bool = True, producer: Any = None) -> KeyStore:
        """`producer`: one that writes the key records instead of a kafka-python producer of its own,
        with kafka-python's `send`, `flush` and `close` (a bulk edge's faster one); closed with the store."""
        self._consumer = KafkaConsumer(bootstrap_servers=self._bootstrap, enable_auto_commit=False,
                                       group_id=None, auto_offset_reset="earliest", consumer_timeout_ms=0)
        partitions = [TopicPartition(self._topic, p) for p in range(topics.CUSTOMER_KEYS.partitions)]
        self._consumer.assign(partitions)
        self._consumer.seek_to_beginning(*partitions)
        self._producer = producer or KafkaProducer(bootstrap_servers=self._bootstrap, acks="all", linger_ms=5,
                                                   compression_type="zstd")
        self.catch_up()
        if follow:
            self._follower = threading.Thread(target=self._follow, name="keystore-follower", daemon=True)
            self._follower.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._follower is not None:
            self._follower.join(timeout=5)
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=10)
            if self._consumer is not None:
                self._consumer.close()
            self._plain.clear()

    def __enter__(self) -> KeyStore:
        return self.open(follow=False) if self._consumer is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def catch_up(self, timeout: float = 30.0) -> None:
        """Apply every record the topic holds now (tombstones of erasures included)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            consumer = self._consumer
            assert consumer is not None, "open() first"
            ends = consumer.end_offsets(list(consumer.assignment()))
            while any(consumer.position(tp) < end for tp, end in ends.items()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the key store did not reach the end of {self._topic} in {timeout} s")
                self._apply(consumer.poll(timeout_ms=200, max_records=10_000))

    # --- reading ---

    def data_key(self, key_id: str) -> bytes | None:
        """The plain data key, or None when it was erased or never existed."""
        with self._lock:
            if key_id in self._plain:
                return self._plain[key_id]
            record = self._records.get(key_id)
            if record is None:
                return None
            master = self._keyring.get(record.master_key_id)
            if master is None:
                raise SealError(f"data key {key_id} is wrapped by master key {record.master_key_id!r}, which is not "
                                f"configured (CRM_MASTER_KEYS)")
            key = unwrap(master, record.wrapped, _wrap_context(record.key_id, record.customer_key))
            self._plain[key_id] = key
            return key

    def key_ids_of(self, customer_key: str) -> list[str]:
        with self._lock:
            return sorted(self._by_customer.get(customer_key, ()))

    def records(self) -> list[WrappedKey]:
        with self._lock:
            return list(self._records.values())

    # --- writing ---

    def keys_for(self, customer_keys: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        """Each customer's current data key (id, key), making one for those who have none: all new ones
        are written and acknowledged before this returns, so no token exists under a key that a crash
        could lose."""
        found: dict[str, tuple[str, bytes]] = {}
        with self._lock:
            missing = []
            for customer_key in set(customer_keys):
                key_id = self._current.get(customer_key)
                if key_id is None:
                    missing.append(customer_key)
                else:
                    found[customer_key] = (key_id, self.data_key(key_id))  # type: ignore[assignment]
            if not missing:
                return found
            master_id, master = self._keyring.current
            maker = KeyMaker(master)
            for customer_key, (key_id, key, nonce) in zip(missing, maker.new_keys(len(missing))):
                record = WrappedKey(key_id, customer_key, master_id,
                                    maker.wrap(key, _wrap_context(key_id, customer_key), nonce), time.time())
                self._producer.send(self._topic, key=key_id.encode(), value=record.to_value())  # type: ignore[union-attr]
                self._remember(record)
                self._plain[key_id] = key
                found[customer_key] = (key_id, key)
            self._producer.flush()  # type: ignore[union-attr]
        return found

    def shred(self, key_ids: Iterable[str]) -> None:
        """Tombstones for data keys (what an erasure does, also from the worker's fold)."""
        with self._lock:
            for key_id in key_ids:
                self._producer.send(self._topic, key=key_id.encode(), value=None)  # type: ignore[union-attr]
                self._forget(key_id)
            self._producer.flush()  # type: ignore[union-attr]

    def rewrap(self) -> int:
        """Wrap every live data key again under the current master key (rotation, docs/privacy.md);
        the number rewrapped. Compaction then drops the old wrappings."""
        master_id, master = self._keyring.current
        count = 0
        with self._lock:
            for record in list(self._records.values()):
                if record.master_key_id == master_id:
                    continue
                key = self.data_key(record.key_id)
                fresh = WrappedKey(record.key_id, record.customer_key, master_id,
                                   wrap(master, key, _wrap_context(record.key_id, record.customer_key)),  # type: ignore[arg-type]
                                   record.created_at)
                self._producer.send(self._topic, key=record.key_id.encode(), value=fresh.to_value())  # type: ignore[union-attr]
                self._records[record.key_id] = fresh
                count += 1
            self._producer.flush()  # type: ignore[union-attr]
        return count

    # --- following the topic ---

    def _follow(self) -> None:
        while not self._stopping.is_set():
            try:
                with self._lock:
                    batch = self._consumer.poll(timeout_ms=0, max_records=10_000)  # type: ignore[union-attr]
                    self._apply(batch)
                    if time.monotonic() - self._nudged_at >= ROLL_NUDGE_SECONDS:
                        self._nudge_segment_rolls()
            except Exception:  # noqa: BLE001 - the follower keeps going; the next poll retries
                log.exception("key store: reading %s failed; retrying", self._topic)
            self._stopping.wait(0.2)

    def _nudge_segment_rolls(self) -> None:
        self._nudged_at = time.monotonic()
        ends = self._consumer.end_offsets(list(self._consumer.assignment()))  # type: ignore[union-attr]
        changed = [tp.partition for tp, end in ends.items() if end > self._ends_seen.get(tp.partition, 0)]
        for partition in changed:
            self._producer.send(self._topic, key=ROLL_NUDGE_KEY, value=None, partition=partition)  # type: ignore[union-attr]
        if changed:
            self._producer.flush()  # type: ignore[union-attr]
        self._ends_seen = {tp.partition: end + (tp.partition in changed) for tp, end in ends.items()}

    def _apply(self, batch: dict) -> None:
        for records in batch.values():
            for record in records:
                key_id = record.key.decode() if record.key else ""
                if record.value is None:
                    self._forget(key_id)
                    continue
                try:
                    self._remember(WrappedKey.from_value(record.value))
                except (TypeError, ValueError, orjson.JSONDecodeError):
                    log.error("key store: record at %s/%s offset %s is not a wrapped key; skipped",
                              record.topic, record.partition, record.offset)

    def _remember(self, record: WrappedKey) -> None:
        self._records[record.key_id] = record
        self._current[record.customer_key] = record.key_id
        self._by_customer.setdefault(record.customer_key, set()).add(record.key_id)

    def _forget(self, key_id: str) -> None:
        record = self._records.pop(key_id, None)
        self._plain.pop(key_id, None)
        if record is None:
            return
        others = self._by_customer.get(record.customer_key, set())
        others.discard(key_id)
        if not others:
            self._by_customer.pop(record.customer_key, None)
            self._current.pop(record.customer_key, None)
        elif self._current.get(record.customer_key) == key_id:
            self._current[record.customer_key] = max(others, key=lambda k: self._records[k].created_at)


def _wrap_context(key_id: str, customer_key: str) -> str:
    return f"{key_id}|{customer_key}"
