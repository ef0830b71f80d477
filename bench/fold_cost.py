"""Benchmark: what the loyalty ledger costs the worker's fold, without Kafka in the way.

Runs the simulated workload's records (ticks included) through, in one process and one run:
  profile_only  decode + the profile fold alone;
  no_points     `pipeline.process` with the ledger switched off: decode, de-duplication
                (fingerprints), profile, state round-tripped through JSON bytes as the RocksDB
                table does: the worker's work before the points path;
  full          `pipeline.process` record by record, state round-tripped through bytes per record (the
                worker before it folded in batches): plus points ledger, ticks, timers, outbox;
  batched       `batch.fold_batch` as the worker runs it now: batches of --batch records against
                per-partition state cached in memory and flushed once per batch (streams/state.py).
The ratio full / no_points is the points path's effect on the worker's per-record CPU.

    python -m bench.fold_cost [--customers 1000] [--days 45] [--repeat 3] [--batch 2000]"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import zlib
from collections import defaultdict
from typing import Any

from schemas.codec import DecodeError, decode_event
from services.simulator import Simulator, Workload, offline_sealer
from streams import topics
from streams.config import settings
from streams.loyalty import ledger
from streams.rulebooks import load_rulebooks
from streams.batch import fold_batch
from streams.pipeline import process
from streams.records import SourceRecord
from streams.state import MemoryBackend, PartitionState
from streams.profile import fold_profile


def records(customers: int, days: int) -> list[SourceRecord]:
    offsets: dict[int, int] = defaultdict(int)
    out = []
    # Sealed as the edges seal them, with keys made without Kafka: the fold never opens a sealed value.
    simulator = Simulator(Workload(customers=customers, days=days, seed=11), sealer=offline_sealer())
    for message in simulator.messages(topics.EVENT_PARTITIONS):
        partition = message.partition if message.partition is not None else zlib.crc32(message.key) % 6
        out.append(SourceRecord(message.key, message.value, partition, offsets[partition], 1780000000000))
        offsets[partition] += 1
    return out


def profile_only(batch: list[SourceRecord]) -> None:
    profiles: dict[str, Any] = {}
    for record in batch:
        event = decode_event(record.value)
        if isinstance(event, DecodeError) or not hasattr(event, "customer_key"):
            continue
        profiles[event.customer_key] = fold_profile(profiles.get(event.customer_key), event, record.offset)


def no_points(batch: list[SourceRecord]) -> None:
    original = ledger.apply, ledger.next_due_ms
    ledger.apply = lambda account, event, book: (account, [])  # type: ignore[assignment]
    ledger.next_due_ms = lambda account, book: None  # type: ignore[assignment]
    try:
        full(batch)
    finally:
        ledger.apply, ledger.next_due_ms = original


def full(batch: list[SourceRecord]) -> None:
    rules = load_rulebooks(settings())
    # No cache: every state read decodes its bytes, every record writes its changes back.
    states = {p: PartitionState(p, MemoryBackend(), cache_limit=0) for p in range(topics.EVENT_PARTITIONS)}
    for record in batch:
        state = states[record.partition]
        for output in process(record, state.store, state.seen, rules):
            output.to_record()
        state.flush()


def batched(batch: list[SourceRecord], size: int = 2000) -> None:
    rules = load_rulebooks(settings())
    states = {p: PartitionState(p, MemoryBackend()) for p in range(topics.EVENT_PARTITIONS)}
    for start in range(0, len(batch), size):
        for output in fold_batch(batch[start:start + size], states.__getitem__, rules, {}):
            output.to_record()
        for state in states.values():
            state.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--days", type=int, default=45)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    batch = records(args.customers, args.days)
    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.node()}; records: {len(batch)}")
    results: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.repeat):  # interleaved, so that machine noise hits both alike
        runs = (("profile_only", profile_only), ("no_points", no_points), ("full", full),
                ("batched", lambda records: batched(records, args.batch)))
        for name, run in runs:
            started = time.perf_counter()
            run(batch)
            results[name].append(len(batch) / (time.perf_counter() - started))
    for name, rates in results.items():
        print(f"{name:>12}: median {statistics.median(rates):8.0f} records/s  (runs: {', '.join(f'{r:.0f}' for r in rates)})")
    ratio = statistics.median(results["full"]) / statistics.median(results["no_points"])
    print(f"full / no_points throughput: {ratio:.2f}")


if __name__ == "__main__":
    main()
