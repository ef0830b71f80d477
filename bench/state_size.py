"""Benchmark: the worker's resident memory, the size of its state and its folding rate, at a small
number of customers and at a large one, in one run with one worker process. The worker keeps its
state in its own store (streams/runtime/state_store.py): one RocksDB database per events partition
(`$CRM_STATE_DIR/worker/state/<partition>`) with a bounded in-memory cache of decoded values in front
(CRM_STATE_CACHE_KEYS per partition), restored from one compacted changelog topic
(`streams.topics.STATE_CHANGELOG`). So its memory should not grow with the number of customers the
way an in-process dict would; this measures whether it does, and how fast it folds at that size.

    .venv/bin/python -m bench.state_size --customers 1000000 [--baseline 10000] [--events-per-customer 2]

One run: a local broker on free ports in a fresh state directory under /tmp, the platform's topics
(deploy/topics.py), then two phases against the same real worker (`crm worker`; the projection
writer is not started: only the worker is measured):
  1. `--baseline` customers' events are produced, the worker is started and folds them;
  2. the rest of `--customers` (new, distinct customers) is produced to the running worker.
At the end of each phase (the worker's consumer group has caught up with the events topic) it records
the worker's RSS (VmRSS, and the kernel's peak VmHWM; sampled every second as well), the RocksDB
directories (du; their WAL, i.e. what is still only in the memtables, separately), the live data
(newest value per key, through a read-only RocksDB handle, by key kind: `f|c|` customers and alias
links, `f|t|` timers, `f|s|` the segment directory, `e|` event ids; streams/state.py) and the state
changelog's partitions in the broker's log directory.

The folding rate of each phase, in records of `crm.events` the worker's group committed per second:
from the first look after the phase's events were all produced (phase 1: from the worker's first
commit, so its start-up is left out) until the catch-up. The records include what the worker
appends to `crm.events` itself (an alias link per new loyalty card, folded after the phase's events),
so two more figures count only up to the end of the phase's events (the topic's end when they were
all produced): over that whole part, and over its last tenth, which at the end of phase 2 is the rate
at the full customer count. The worker commits every 2.8 s (Faust's commit interval) and progress is
looked at every second, so a short phase's rates are coarse.

Each customer sends `--events-per-customer` catalog events: customer_registered (with 2) and a
purchase_completed, keyed by the customer key as the simulator does. Everything it started is
stopped at the end, also on failure; the big directories (Kafka data, worker state) are removed
unless --keep, the worker log and result.json stay in the state directory."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from bench.pipeline_throughput import PROJECT_ROOT, cpu_seconds, free_port, machine

MiB = 1024 * 1024


# --- the workload ---------------------------------------------------------------------------------

class Events:
    """Valid catalog events for customers n = first .. end-1, as (key, value) pairs, built lazily.
    Event time: customer n registers at `base + n * step`, buys ten minutes later; every event lies
    in the two days before the run, so the worker's wall-clock ticks find nothing overdue."""

    def __init__(self, total_customers: int, per_customer: int, base: datetime, seed: int = 11):
        from services.simulator import CATEGORIES, STORES

        self.per_customer = per_customer
        self.base = base
        self.step = timedelta(days=1) / max(total_customers, 1)
        self.rng = random.Random(seed)
        self.stores, self.categories = STORES, list(CATEGORIES.items())

    def _id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def customer(self, n: int) -> Iterator[tuple[bytes, dict[str, Any]]]:
        rng = self.rng
        customer_id = f"bench-{n:07d}"
        store, zone = self.stores[n % len(self.stores)]
        joined = self.base + self.step * n
        source = {"channel": "pos", "store_id": store, "terminal_id": f"{store}-t{n % 3 + 1}", "timezone": zone}

        def envelope(type_: str, at: datetime, payload: dict[str, Any]) -> dict[str, Any]:
            return {"event_id": self._id(), "type": type_, "schema_version": 1, "customer_id": customer_id,
                    "identifiers": {"loyalty_card": f"LC{10_000_000 + n}"}, "occurred_at": at.isoformat(),
                    "source": source, "payload": payload}

        key = customer_id.encode()
        if self.per_customer >= 2:
            yield key, envelope("customer_registered", joined, {
                "name": f"Customer {n}", "email": f"{customer_id}@example.com", "preferred_store_id": store,
                "birthday": f"{rng.randint(1950, 2006)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            })
        lines = []
        for _ in range(rng.randint(1, 4)):
            category, (low, high) = rng.choice(self.categories)
            lines.append({"sku": f"{category[:3]}-{rng.randint(1, 400):04d}", "category": category,
                          "quantity": rng.choice((1, 1, 2)), "unit_price": str(Decimal(str(round(rng.uniform(low, high), 2))))})
        yield key, envelope("purchase_completed", joined + timedelta(minutes=10), {
            "order_id": f"ord-{self._id()[:13]}", "currency": "EUR", "lines": lines, "store_id": store,
        })

    def records(self, first: int, end: int) -> Iterator[tuple[bytes, bytes, str]]:
        for n in range(first, end):
            for key, event in self.customer(n):
                yield key, orjson.dumps(event), event["type"]


def check_events_valid(events: Events) -> None:
    """The events must pass the catalog's validation, or the worker would only dead-letter them."""
    from schemas.codec import DecodeError, decode_event

    probe = Events(10, events.per_customer, events.base, seed=1)
    for _key, value, type_ in probe.records(0, 10):
        decoded = decode_event(value)
        if isinstance(decoded, DecodeError):
            raise SystemExit(f"bench event {type_} does not validate: {decoded.reason}: {decoded.detail}")


def produce(bootstrap: str, topic: str, records: Iterator[tuple[bytes, bytes, str]]) -> tuple[Counter[str], float]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=50,
                             batch_size=1024 * 1024, max_request_size=4 * MiB)
    counts: Counter[str] = Counter()
    started = time.perf_counter()
    try:
        for key, value, type_ in records:
            producer.send(topic, key=key, value=value)
            counts[type_] += 1
        producer.flush()
    finally:
        producer.close()
    return counts, time.perf_counter() - started


# --- what is measured -----------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon, RssFile of a process, in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[name] = int(rest.split()[0]) * 1024
    return values


class Sampler(threading.Thread):
    """The worker's RSS and the load average, every `interval` seconds, until stopped."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, float]] = []  # (unix time, VmRSS bytes, 1-min load average)
        self.phase_peak = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                rss = proc_status(self.pid)["VmRSS"]
            except (OSError, KeyError):
                rss = 0
            load = os.getloadavg()[0]
            with self._lock:
                self.samples.append((time.time(), rss, load))
                self.phase_peak = max(self.phase_peak, rss)
            self._halt.wait(self.interval)

    def take_phase_peak(self) -> int:
        with self._lock:
            peak, self.phase_peak = self.phase_peak, 0
        return peak

    def loads_since(self, since: float) -> list[float]:
        with self._lock:
            return [load for at, _rss, load in self.samples if at >= since]

    def stop(self) -> None:
        self._halt.set()


def du_bytes(path: Path, apparent: bool = False) -> int:
    if not path.exists():
        return 0
    flag = "-sb" if apparent else "-sk"
    out = subprocess.run(["du", flag, str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) * (1 if apparent else 1024)


def rocksdb_sizes(worker_dir: Path) -> dict[str, Any]:
    """The worker's directory, and its state databases: one RocksDB directory per events partition,
    `<worker_dir>/state/<partition>` (streams/runtime/state_store.py)."""
    state_dir = worker_dir / "state"
    dbs = sorted((d for d in state_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)) \
        if state_dir.is_dir() else []
    total = {"du_bytes": 0, "apparent_bytes": 0, "partitions": 0, "sst_files": 0, "sst_bytes": 0, "wal_bytes": 0}
    for db in dbs:
        total["du_bytes"] += du_bytes(db)
        total["apparent_bytes"] += du_bytes(db, apparent=True)
        total["partitions"] += 1
        total["sst_files"] += len(list(db.glob("*.sst")))
        total["sst_bytes"] += sum(f.stat().st_size for f in db.glob("*.sst"))
        # RocksDB's write-ahead log holds what is still only in the memtables (in the worker's RAM).
        total["wal_bytes"] += sum(f.stat().st_size for f in db.glob("*.log"))
    return {"worker_dir": str(worker_dir), "db_dirs": [str(d) for d in dbs],
            "worker_dir_du_bytes": du_bytes(worker_dir), "state": total}


def key_kind(key: bytes) -> str:
    """f|c customers (and alias links), f|t timers, f|s segment directory, e event ids (streams/state.py)."""
    if key.startswith(b"f|"):
        return "f|" + key[2:].split(b"|", 1)[0].decode(errors="replace") + "|"
    if key.startswith(b"e|"):
        return "e|"
    return "checkpoint"  # the changelog offset the database reaches


def rocksdb_live(db_dirs: list[str]) -> dict[str, Any]:
    """The live data in the state databases: keys and bytes of the newest value of each key, read
    through a read-only RocksDB handle (what the changelog compacts down to; the directories hold
    more until RocksDB compacts overwritten values away), by key kind."""
    from rocksdict import AccessType, Options, Rdict

    live: dict[str, Any] = {"keys": 0, "key_bytes": 0, "value_bytes": 0, "by_kind": {}}
    for db in db_dirs:
        handle = Rdict(db, options=Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            for key, value in handle.items():
                counts = live["by_kind"].setdefault(key_kind(key), {"keys": 0, "bytes": 0})
                counts["keys"] += 1
                counts["bytes"] += len(key) + len(value)
                live["keys"] += 1
                live["key_bytes"] += len(key)
                live["value_bytes"] += len(value)
        finally:
            handle.close()
    return live


def changelog_sizes(kafka_data: Path, bootstrap: str, names: list[str]) -> dict[str, dict[str, int]]:
    """Per changelog topic: bytes of its .log segments (the records), du of its partition directories,
    segment count, and the number of records written (end offsets; compaction does not lower them)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="crm-bench-state-size")
    try:
        result = {}
        for name in names:
            dirs = [d for d in kafka_data.glob(f"{name}-*") if d.name[len(name) + 1:].isdigit()]
            logs = [f for d in dirs for f in d.glob("*.log")]
            partitions = [TopicPartition(name, int(d.name[len(name) + 1:])) for d in dirs]
            ends = consumer.end_offsets(partitions) if partitions else {}
            result[name] = {
                "log_bytes": sum(f.stat().st_size for f in logs),
                "du_bytes": sum(du_bytes(d) for d in dirs),
                "segments": len(logs),
                "records": sum(ends.values()),
                "partitions": len(dirs),
            }
        return result
    finally:
        consumer.close()


class WorkerProgress:
    """Records of the events topic: written (end offsets) and committed by the worker's group."""

    def __init__(self, bootstrap: str):
        from kafka import KafkaAdminClient

        from streams import topics

        self.group = topics.WORKER_APP_ID
        self.partitions = [TopicPartition(topics.EVENTS.name, p) for p in range(topics.EVENTS.partitions)]
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="crm-bench-state-size")
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="crm-bench-state-size")

    def read(self) -> tuple[int, int | None]:
        """(records written, records committed), committed None while the coordinator cannot say."""
        from kafka.errors import KafkaError

        ends = self.consumer.end_offsets(self.partitions)
        try:
            offsets = self.admin.list_group_offsets({self.group: self.partitions}).get(self.group, {})
        except KafkaError as exc:
            if not exc.retriable:
                raise
            return sum(ends.values()), None
        committed = sum(max(meta.offset, 0) if meta is not None else 0 for meta in (offsets.get(tp) for tp in self.partitions))
        return sum(ends.values()), committed

    def close(self) -> None:
        self.consumer.close()
        self.admin.close()


def wait_caught_up(progress: WorkerProgress, pid: int, stall_seconds: float, label: str,
                   worker_started: float | None = None) -> dict[str, Any]:
    """Block until the worker's group has committed the end of every events partition. Returns when,
    and the folding rates in records of crm.events per second (module docstring)."""
    from deploy.process import process_alive

    track: list[tuple[float, int]] = []  # (perf_counter, records committed) at the first look and whenever it moved
    produced_end: int | None = None  # the events topic's end at the first look: the phase's events
    last_change, last_print = time.monotonic(), 0.0
    while True:
        if not process_alive(pid):
            raise RuntimeError("the worker exited; see its log")
        written, committed = progress.read()
        now = time.monotonic()
        if produced_end is None:
            produced_end = written
        if committed is not None:
            if not track or committed != track[-1][1]:
                track.append((time.perf_counter(), committed))
                last_change = now
            if committed >= written:
                break
        if now - last_change > stall_seconds:
            raise RuntimeError(f"no progress for {stall_seconds:.0f}s (worker committed {committed} of {written})")
        if now - last_print >= 30:
            rss = proc_status(pid)["VmRSS"]
            print(f"  [{label}] worker committed {committed if committed is not None else '?'} of {written} records, "
                  f"RSS {rss / MiB:.0f} MiB, load {os.getloadavg()[0]:.1f}", flush=True)
            last_print = now
        time.sleep(1.0)
    caught_up = time.perf_counter()
    end_records = track[-1][1]
    # Nothing committed at the first look: the worker is starting; count from its first commit.
    start = track[1] if track[0][1] == 0 and len(track) > 1 else track[0]
    # The phase's events end at `produced_end`; after them come the worker's own records (alias links).
    crossed = next((point for point in track if point[1] >= produced_end), track[-1])
    tenth_mark = produced_end - (produced_end - start[1]) // 10
    before = [point for point in track if start[0] <= point[0] and point[1] < tenth_mark]
    tail_start = before[-1] if before else start

    def rate(since: tuple[float, int], until: tuple[float, int]) -> float | None:
        elapsed = until[0] - since[0]
        return (until[1] - since[1]) / elapsed if elapsed > 0 and until[1] > since[1] else None

    return {"caught_up": caught_up, "records_end": end_records, "produced_end": produced_end,
            "rate_from_records": start[1], "rate_seconds": round(caught_up - start[0], 1),
            "fold_rate": rate(start, (caught_up, end_records)),
            "events_part_seconds": round(crossed[0] - start[0], 1), "events_part_rate": rate(start, crossed),
            "tail_from_records": tail_start[1], "tail_to_records": crossed[1],
            "tail_seconds": round(crossed[0] - tail_start[0], 1), "tail_fold_rate": rate(tail_start, crossed),
            "commits_seen": len(track),
            # Phase 1 also from the worker's start: all there is when it folded everything before its first commit.
            "rate_with_startup": (rate((worker_started, 0), (caught_up, end_records))
                                  if worker_started is not None and track[0][1] == 0 else None)}


def snapshot(config: Any, pid: int, customers: int, events: int) -> dict[str, Any]:
    from streams import topics

    status = proc_status(pid)
    rocks = rocksdb_sizes(config.worker_dir)
    changelogs = changelog_sizes(config.kafka_dir / "data", config.kafka_bootstrap, [topics.STATE_CHANGELOG.name])
    try:
        live = rocksdb_live(rocks["db_dirs"])
    except Exception as exc:  # a read-only open beside the running worker; report, do not fail the run
        live = {"error": repr(exc)}
    rocks_total = rocks["state"]["du_bytes"]
    live_total = live.get("key_bytes", 0) + live.get("value_bytes", 0)
    changelog_total = sum(c["log_bytes"] for c in changelogs.values())
    return {
        "customers": customers, "events": events, "rss_bytes": status["VmRSS"], "hwm_bytes": status["VmHWM"],
        "rss_anon_bytes": status.get("RssAnon"), "rss_file_bytes": status.get("RssFile"),
        "rocksdb": rocks, "rocksdb_du_bytes": rocks_total, "changelogs": changelogs,
        "changelog_log_bytes": changelog_total, "live": live, "live_bytes": live_total,
        "live_bytes_per_customer": live_total / customers,
        "rocksdb_bytes_per_customer": rocks_total / customers, "changelog_bytes_per_customer": changelog_total / customers,
    }


def worker_log_summary(log_file: Path) -> dict[str, Any]:
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return {"warnings": 0, "errors": 0, "distinct": [], "last_counts": None}
    flagged = [line for line in lines if "WARNING" in line or "ERROR" in line or "Traceback" in line]
    distinct: dict[str, int] = {}
    for line in flagged:
        text = line.split("]", 1)[-1].strip()[:160]  # drop the timestamp, keep the message
        distinct[text] = distinct.get(text, 0) + 1
    counts = [line for line in lines if "processed so far" in line]
    return {"warnings": sum("WARNING" in line for line in flagged), "errors": sum("ERROR" in line for line in flagged),
            "distinct": sorted(distinct.items(), key=lambda item: -item[1])[:15],
            "last_counts": counts[-1].split("processed so far:", 1)[-1].strip() if counts else None}


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=PROJECT_ROOT, capture_output=True,
                              text=True).stdout
    if not (PROJECT_ROOT / ".git").exists() and (PROJECT_ROOT / ".git-commit").exists():
        # A clean export (`git archive HEAD | tar -x`) with the commit written beside it: the code
        # measured is exactly that commit, whatever is being edited in the checkout meanwhile.
        return {"commit": (PROJECT_ROOT / ".git-commit").read_text().strip()[:7], "source": f"export at {PROJECT_ROOT}",
                "uncommitted_files": 0, "diff_sha256": None}
    diff = git("diff", "HEAD")
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted_files": len([line for line in git("status", "--porcelain").splitlines() if line.strip()]),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else None}


def mib(value: float) -> str:
    return f"{value / MiB:,.1f} MiB"


# --- the run --------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000, help="customers in total at the end")
    parser.add_argument("--baseline", type=int, default=10_000, help="customers of the first (baseline) phase")
    parser.add_argument("--events-per-customer", type=int, choices=(1, 2), default=2,
                        help="2: customer_registered + purchase_completed; 1: purchase_completed only")
    parser.add_argument("--stall-seconds", type=float, default=900, help="give up when the lag stops moving this long")
    parser.add_argument("--keep", action="store_true", help="keep the Kafka data and the worker's state")
    args = parser.parse_args()
    if not 0 < args.baseline < args.customers:
        parser.error("need 0 < --baseline < --customers")

    state_dir = Path(tempfile.mkdtemp(prefix="crm-state-size-"))
    os.environ.update({
        "CRM_STATE_DIR": str(state_dir), "CRM_KAFKA_PORT": str(free_port()),
        "CRM_KAFKA_CONTROLLER_PORT": str(free_port()),
    })
    os.environ.pop("CRM_KAFKA_BOOTSTRAP", None)
    os.environ.pop("CRM_CLICKHOUSE_DSN", None)
    # A SIGTERM to the benchmark still stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from deploy.kafka.broker import LocalBroker
    from deploy.topics import ensure_topics
    from services import processes
    from streams import topics
    from streams.config import settings

    config = settings()
    broker = LocalBroker(config)
    daemon = processes.worker(config)
    sampler: Sampler | None = None
    progress: WorkerProgress | None = None
    run_started = time.time()
    result: dict[str, Any] = {
        "machine": machine(), "nproc": os.cpu_count(), "git": git_info(), "state_dir": str(state_dir),
        "args": vars(args), "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_before": os.getloadavg(),
    }
    print(f"machine: {result['machine']}; load average before: {' '.join(f'{x:.2f}' for x in result['load_before'])}")
    print(f"git: {result['git']}; state dir: {state_dir}; Kafka port {config.kafka_port}", flush=True)
    try:
        broker.start()
        ensure_topics(config)
        events = Events(args.customers, args.events_per_customer,
                        base=datetime.now(UTC).replace(microsecond=0) - timedelta(days=2))
        check_events_valid(events)
        phases = []
        done = 0
        for label, end in (("baseline", args.baseline), ("full", args.customers)):
            phase_started = time.perf_counter()
            phase_wall = time.time()
            counts, produce_seconds = produce(config.kafka_bootstrap, topics.EVENTS.name, events.records(done, end))
            sent = sum(counts.values())
            print(f"[{label}] produced {sent:,} events for customers {done:,}..{end - 1:,} in {produce_seconds:.1f}s "
                  f"({sent / produce_seconds:,.0f}/s): {dict(counts)}", flush=True)
            if sampler is None:
                pid = daemon.start()
                print(f"worker started (pid {pid}), log {daemon.log_file}", flush=True)
                sampler = Sampler(pid)
                sampler.start()
                progress = WorkerProgress(config.kafka_bootstrap)
                cpu_start = cpu_seconds(pid)
                worker_started: float | None = time.perf_counter()
            assert progress is not None
            folding = wait_caught_up(progress, pid, args.stall_seconds, label, worker_started)
            worker_started = None
            caught_up = folding.pop("caught_up")
            cpu_now = cpu_seconds(pid)
            cpu_phase, cpu_start = cpu_now - cpu_start, cpu_now
            time.sleep(2)  # one more sample; the final figures are taken after the catch-up, not during
            phase_peak = sampler.take_phase_peak()
            measured = snapshot(config, pid, end, sum(p["events_sent"] for p in phases) + sent)
            loads = sampler.loads_since(phase_wall)
            phase = {"label": label, "events_sent": sent, "events_by_type": dict(counts),
                     "produce_seconds": round(produce_seconds, 1),
                     "catch_up_seconds": round(caught_up - phase_started, 1),
                     "sampled_peak_rss_bytes": phase_peak, "folding": folding,
                     "worker_cpu_seconds": round(cpu_phase, 1),
                     "records_in_phase": folding["records_end"] - (phases[-1]["folding"]["records_end"] if phases else 0),
                     "load_average_1m": {"min": min(loads, default=None), "max": max(loads, default=None),
                                         "mean": sum(loads) / len(loads) if loads else None},
                     **measured}
            phases.append(phase)
            print(f"[{label}] {end:,} customers, {phase['events']:,} events: caught up {phase['catch_up_seconds']:.0f}s "
                  f"after the phase started ({sent / phase['catch_up_seconds']:,.0f} events/s); worker RSS "
                  f"{mib(measured['rss_bytes'])} (peak so far {mib(measured['hwm_bytes'])}); RocksDB "
                  f"{mib(measured['rocksdb_du_bytes'])}; changelog {mib(measured['changelog_log_bytes'])}",
                  flush=True)
            print(f"[{label}] {fold_rates(phase)}", flush=True)
            done = end
        result["phases"] = phases
        base, full = phases
        result["ratios"] = {
            "final_rss": full["rss_bytes"] / base["rss_bytes"],
            "peak_rss": full["hwm_bytes"] / base["hwm_bytes"],
            "customers": full["customers"] / base["customers"],
            "rocksdb": full["rocksdb_du_bytes"] / max(base["rocksdb_du_bytes"], 1),
        }
        print_summary(result)
    finally:
        if sampler is not None:
            sampler.stop()
        if progress is not None:
            progress.close()
        daemon.stop()
        broker.stop()
        result["load_after"] = os.getloadavg()
        result["elapsed_seconds"] = round(time.time() - run_started, 1)
        result["worker_log"] = worker_log_summary(daemon.log_file)
        log = result["worker_log"]
        print(f"worker log: {log['warnings']} warnings, {log['errors']} errors; last counts: {log['last_counts']}")
        for text, n in log["distinct"]:
            print(f"  {n:>6} x {text}")
        (state_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
        if not args.keep:
            for big in (config.kafka_dir, config.worker_dir):
                shutil.rmtree(big, ignore_errors=True)
        print(f"result and logs in {state_dir} (result.json, logs/worker.log)")
    return 0


def fold_rates(phase: dict[str, Any]) -> str:
    """The phase's folding rates as a sentence."""
    folding = phase["folding"]
    rate = folding["fold_rate"]
    folded = folding["records_end"] - folding["rate_from_records"]
    text = f"worker folding rate: {rate:,.0f} records/s" if rate else "worker folding rate: n/a (too short)"
    text += (f" ({folded:,} records of crm.events in {folding['rate_seconds']}s, counted from "
             f"{'its first commit' if phase['label'] == 'baseline' else 'the end of the produce'}")
    if folding.get("rate_with_startup"):
        text += f"; {folding['rate_with_startup']:,.0f} records/s from the worker's start, start-up included"
    text += ")"
    if folding["events_part_rate"]:
        text += (f"; up to the end of the phase's events (the worker's alias links after them left out): "
                 f"{folding['events_part_rate']:,.0f} records/s in {folding['events_part_seconds']}s")
    if folding["tail_fold_rate"]:
        text += (f"; over the last tenth of them ({folding['tail_to_records'] - folding['tail_from_records']:,} "
                 f"records in {folding['tail_seconds']}s): {folding['tail_fold_rate']:,.0f} records/s")
    text += f"; worker CPU {phase['worker_cpu_seconds']}s in the phase"
    return text


def print_summary(result: dict[str, Any]) -> None:
    base, full = result["phases"]
    print("\nsummary")
    print(f"{'':36}{'baseline':>16}{'full':>16}{'ratio':>9}")

    def row(name: str, a: float | None, b: float | None, fmt=mib) -> None:
        if a is None or b is None:
            print(f"{name:36}{'n/a' if a is None else fmt(a):>16}{'n/a' if b is None else fmt(b):>16}")
            return
        print(f"{name:36}{fmt(a):>16}{fmt(b):>16}{b / a if a else float('nan'):>9.2f}")

    count = lambda v: f"{v:,.0f}"  # noqa: E731
    row("customers", base["customers"], full["customers"], count)
    row("events (cumulative)", base["events"], full["events"], count)
    row("records of crm.events folded", base["folding"]["records_end"], full["folding"]["records_end"], count)
    row("folding rate, records/s", base["folding"]["fold_rate"], full["folding"]["fold_rate"], count)
    row("  up to the end of the events", base["folding"]["events_part_rate"], full["folding"]["events_part_rate"], count)
    row("  over the last tenth of them", base["folding"]["tail_fold_rate"], full["folding"]["tail_fold_rate"], count)
    row("worker CPU seconds in the phase", base["worker_cpu_seconds"], full["worker_cpu_seconds"], count)
    row("worker RSS at catch-up", base["rss_bytes"], full["rss_bytes"])
    row("worker peak RSS (VmHWM)", base["hwm_bytes"], full["hwm_bytes"])
    row("worker sampled peak in phase", base["sampled_peak_rss_bytes"], full["sampled_peak_rss_bytes"])
    row("RocksDB state dirs (du)", base["rocksdb_du_bytes"], full["rocksdb_du_bytes"])
    row("  SST files", base["rocksdb"]["state"]["sst_bytes"], full["rocksdb"]["state"]["sst_bytes"])
    row("  WAL (unflushed memtables)", base["rocksdb"]["state"]["wal_bytes"], full["rocksdb"]["state"]["wal_bytes"])
    row("live data (newest value per key)", base["live_bytes"], full["live_bytes"])
    for kind, counts in full["live"].get("by_kind", {}).items():
        bk = base["live"].get("by_kind", {}).get(kind, {"keys": 0, "bytes": 0})
        row(f"  {kind} keys", bk["keys"], counts["keys"], count)
        row(f"  {kind} bytes", bk["bytes"], counts["bytes"])
    if "error" in full["live"] or "error" in base["live"]:
        print(f"  live data could not be read: {base['live'].get('error')} / {full['live'].get('error')}")
    row("state changelog (.log bytes)", base["changelog_log_bytes"], full["changelog_log_bytes"])
    for name in full["changelogs"]:
        row("  records written", base["changelogs"][name]["records"], full["changelogs"][name]["records"], count)
        row("  segments", base["changelogs"][name]["segments"], full["changelogs"][name]["segments"], count)
    row("RocksDB bytes per customer", base["rocksdb_bytes_per_customer"], full["rocksdb_bytes_per_customer"], count)
    row("live bytes per customer", base["live_bytes_per_customer"], full["live_bytes_per_customer"], count)
    row("changelog bytes per customer", base["changelog_bytes_per_customer"], full["changelog_bytes_per_customer"], count)
    for phase in (base, full):
        print(f"{phase['label']}: {phase['events_sent']:,} events sent in the phase, produced in "
              f"{phase['produce_seconds']}s, caught up after {phase['catch_up_seconds']}s; load average (1 min) "
              f"{phase['load_average_1m']['min']:.1f} to {phase['load_average_1m']['max']:.1f}")
        print(f"  {fold_rates(phase)}")


if __name__ == "__main__":
    sys.exit(main())
