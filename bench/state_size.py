"""Benchmark: the worker's resident memory and the size of its state, at a small number of customers
and at a large one, in one run with one worker process. Worker state lives in RocksDB-backed Faust
tables on disk (restored from compacted changelog topics), so its memory should not grow with the
number of customers the way an in-process dict would; this measures whether it does.

    .venv/bin/python -m bench.state_size --customers 1000000 [--baseline 10000] [--events-per-customer 2]

One run: a local broker on free ports in a fresh state directory under /tmp, the platform's topics
(deploy/topics.py), then two phases against the same real worker (`crm worker`, RocksDB store; the
projection writer is not started: only the worker is measured):
  1. `--baseline` customers' events are produced, the worker is started and folds them;
  2. the rest of `--customers` (new, distinct customers) is produced to the running worker.
At the end of each phase (the worker's consumer group has caught up with the events topic) it records
the worker's RSS (VmRSS, and the kernel's peak VmHWM; sampled every second as well), the RocksDB table
directory (du; its WAL, i.e. what is still only in the memtables, separately), the live data (newest
value per key, through a read-only RocksDB handle) and the state tables' changelog partitions in the
broker's log directory.

Each customer sends `--events-per-customer` catalog events: customer_registered (with 2) and a
purchase_completed, keyed by the customer key as the simulator does. Everything it started is
stopped at the end, also on failure; the big directories (Kafka data, worker tables) are removed
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

from bench.pipeline_throughput import PROJECT_ROOT, free_port, machine

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
    """The worker's state directory, and per table its RocksDB partition directories (<table>-<p>.db)
    wherever Faust put them (datadir/<app>-data/<version>/tables by default)."""
    tables: dict[str, dict[str, int]] = {}
    table_dirs = sorted({db.parent for db in worker_dir.rglob("*.db") if db.is_dir()})
    for db in sorted(p for d in table_dirs for p in d.glob("*.db")):
        table = db.name[:-3].rsplit("-", 1)[0]
        entry = tables.setdefault(table, {"du_bytes": 0, "apparent_bytes": 0, "partitions": 0, "sst_files": 0})
        entry["du_bytes"] += du_bytes(db)
        entry["apparent_bytes"] += du_bytes(db, apparent=True)
        entry["partitions"] += 1
        entry["sst_files"] += len(list(db.glob("*.sst")))
        # RocksDB's write-ahead log holds what is still only in the memtables (in the worker's RAM).
        entry["wal_bytes"] = entry.get("wal_bytes", 0) + sum(f.stat().st_size for f in db.glob("*.log"))
        entry["sst_bytes"] = entry.get("sst_bytes", 0) + sum(f.stat().st_size for f in db.glob("*.sst"))
    return {"worker_dir": str(worker_dir), "table_dirs": [str(d) for d in table_dirs],
            "worker_dir_du_bytes": du_bytes(worker_dir), "tables": tables}


def rocksdb_live(table_dirs: list[str]) -> dict[str, Any]:
    """The live data in the tables: keys and bytes of the newest value of each key, read through a
    read-only RocksDB handle (what the changelogs compact down to; the directories hold more until
    RocksDB compacts overwritten values away). customer_state keys by kind: c| customers,
    t| timers, s| the segment directory (streams/timers.py, streams/segments/population.py)."""
    from rocksdict import AccessType, Options, Rdict

    tables: dict[str, dict[str, Any]] = {}
    for db in sorted(p for d in table_dirs for p in Path(d).glob("*.db")):
        table = db.name[:-3].rsplit("-", 1)[0]
        entry = tables.setdefault(table, {"keys": 0, "key_bytes": 0, "value_bytes": 0, "by_kind": {}})
        handle = Rdict(str(db), options=Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            for key, value in handle.items():
                kind = key.split(b"|", 1)[0].decode(errors="replace") if table == "customer_state" else "event"
                counts = entry["by_kind"].setdefault(kind, {"keys": 0, "bytes": 0})
                counts["keys"] += 1
                counts["bytes"] += len(key) + len(value)
                entry["keys"] += 1
                entry["key_bytes"] += len(key)
                entry["value_bytes"] += len(value)
        finally:
            handle.close()
    return tables


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


def wait_caught_up(probe: Any, pid: int, sampler: Sampler, produced_total: int, stall_seconds: float,
                   label: str) -> float:
    """Block until the worker's group has committed the end of every events partition; return when."""
    from deploy.process import process_alive

    last_lag, last_change, last_print = None, time.monotonic(), 0.0
    while True:
        if not process_alive(pid):
            raise RuntimeError("the worker exited; see its log")
        lag = probe.lag().worker
        now = time.monotonic()
        if lag == 0:
            return time.perf_counter()
        if lag != last_lag:
            last_lag, last_change = lag, now
        elif now - last_change > stall_seconds:
            raise RuntimeError(f"no progress for {stall_seconds:.0f}s (worker lag {lag})")
        if now - last_print >= 30:
            rss = proc_status(pid)["VmRSS"]
            print(f"  [{label}] worker lag {lag if lag is not None else '?'} of {produced_total} records, "
                  f"RSS {rss / MiB:.0f} MiB, load {os.getloadavg()[0]:.1f}", flush=True)
            last_print = now
        time.sleep(1.0)


def snapshot(config: Any, pid: int, customers: int, events: int) -> dict[str, Any]:
    from streams import topics

    status = proc_status(pid)
    rocks = rocksdb_sizes(config.worker_dir)
    names = [topics.changelog(topics.CUSTOMER_STATE_TABLE).name, topics.changelog(topics.SEEN_EVENTS_TABLE).name]
    changelogs = changelog_sizes(config.kafka_dir / "data", config.kafka_bootstrap, names)
    try:
        live = rocksdb_live(rocks["table_dirs"])
    except Exception as exc:  # a read-only open beside the running worker; report, do not fail the run
        live = {"error": repr(exc)}
    rocks_total = sum(t["du_bytes"] for t in rocks["tables"].values())
    live_total = sum(t["key_bytes"] + t["value_bytes"] for t in live.values() if isinstance(t, dict) and "keys" in t)
    changelog_total = sum(c["log_bytes"] for c in changelogs.values())
    return {
        "customers": customers, "events": events, "rss_bytes": status["VmRSS"], "hwm_bytes": status["VmHWM"],
        "rss_anon_bytes": status.get("RssAnon"), "rss_file_bytes": status.get("RssFile"),
        "rocksdb": rocks, "rocksdb_tables_du_bytes": rocks_total, "changelogs": changelogs,
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
    parser.add_argument("--keep", action="store_true", help="keep the Kafka data and worker tables")
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
    from services.lag import LagProbe
    from streams import topics
    from streams.config import settings

    config = settings()
    broker = LocalBroker(config)
    daemon = processes.worker(config)
    sampler: Sampler | None = None
    probe = None
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
                probe = LagProbe(config)
            caught_up = wait_caught_up(probe, pid, sampler, sent, args.stall_seconds, label)
            time.sleep(2)  # one more sample; the final figures are taken after the catch-up, not during
            phase_peak = sampler.take_phase_peak()
            measured = snapshot(config, pid, end, sum(p["events_sent"] for p in phases) + sent)
            loads = sampler.loads_since(phase_wall)
            phase = {"label": label, "events_sent": sent, "events_by_type": dict(counts),
                     "produce_seconds": round(produce_seconds, 1),
                     "catch_up_seconds": round(caught_up - phase_started, 1),
                     "sampled_peak_rss_bytes": phase_peak,
                     "load_average_1m": {"min": min(loads, default=None), "max": max(loads, default=None),
                                         "mean": sum(loads) / len(loads) if loads else None},
                     **measured}
            phases.append(phase)
            print(f"[{label}] {end:,} customers, {phase['events']:,} events: caught up {phase['catch_up_seconds']:.0f}s "
                  f"after the phase started ({sent / phase['catch_up_seconds']:,.0f} events/s); worker RSS "
                  f"{mib(measured['rss_bytes'])} (peak so far {mib(measured['hwm_bytes'])}); RocksDB tables "
                  f"{mib(measured['rocksdb_tables_du_bytes'])}; changelogs {mib(measured['changelog_log_bytes'])}",
                  flush=True)
            done = end
        result["phases"] = phases
        base, full = phases
        result["ratios"] = {
            "final_rss": full["rss_bytes"] / base["rss_bytes"],
            "peak_rss": full["hwm_bytes"] / base["hwm_bytes"],
            "customers": full["customers"] / base["customers"],
            "rocksdb": full["rocksdb_tables_du_bytes"] / max(base["rocksdb_tables_du_bytes"], 1),
        }
        print_summary(result)
    finally:
        if sampler is not None:
            sampler.stop()
        if probe is not None:
            probe.close()
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


def print_summary(result: dict[str, Any]) -> None:
    base, full = result["phases"]
    print("\nsummary")
    print(f"{'':34}{'baseline':>16}{'full':>16}{'ratio':>9}")

    def row(name: str, a: float, b: float, fmt=mib) -> None:
        print(f"{name:34}{fmt(a):>16}{fmt(b):>16}{b / a if a else float('nan'):>9.2f}")

    count = lambda v: f"{v:,.0f}"  # noqa: E731
    row("customers", base["customers"], full["customers"], count)
    row("events (cumulative)", base["events"], full["events"], count)
    row("worker RSS at catch-up", base["rss_bytes"], full["rss_bytes"])
    row("worker peak RSS (VmHWM)", base["hwm_bytes"], full["hwm_bytes"])
    row("worker sampled peak in phase", base["sampled_peak_rss_bytes"], full["sampled_peak_rss_bytes"])
    row("RocksDB tables (du)", base["rocksdb_tables_du_bytes"], full["rocksdb_tables_du_bytes"])
    for table in full["rocksdb"]["tables"]:
        row(f"  {table}", base["rocksdb"]["tables"].get(table, {}).get("du_bytes", 0),
            full["rocksdb"]["tables"][table]["du_bytes"])
    for table in full["rocksdb"]["tables"]:
        b, f = base["rocksdb"]["tables"].get(table, {}), full["rocksdb"]["tables"][table]
        row(f"  {table} WAL (unflushed memtables)", b.get("wal_bytes", 0), f["wal_bytes"])
    row("live data (newest value per key)", base["live_bytes"], full["live_bytes"])
    for table, f in full["live"].items():
        b = base["live"].get(table, {})
        if not isinstance(f, dict) or "by_kind" not in f:
            continue
        for kind, counts in f["by_kind"].items():
            bk = b.get("by_kind", {}).get(kind, {"keys": 0, "bytes": 0})
            row(f"  {table} {kind}| keys", bk["keys"], counts["keys"], count)
            row(f"  {table} {kind}| bytes", bk["bytes"], counts["bytes"])
    row("changelogs (.log bytes)", base["changelog_log_bytes"], full["changelog_log_bytes"])
    for name in full["changelogs"]:
        row(f"  {name}", base["changelogs"][name]["log_bytes"], full["changelogs"][name]["log_bytes"])
        row("    records written", base["changelogs"][name]["records"], full["changelogs"][name]["records"], count)
    row("RocksDB bytes per customer", base["rocksdb_bytes_per_customer"], full["rocksdb_bytes_per_customer"], count)
    row("live bytes per customer", base["live_bytes_per_customer"], full["live_bytes_per_customer"], count)
    row("changelog bytes per customer", base["changelog_bytes_per_customer"], full["changelog_bytes_per_customer"], count)
    for phase in (base, full):
        print(f"{phase['label']}: {phase['events_sent']:,} events sent in the phase, produced in "
              f"{phase['produce_seconds']}s, caught up after {phase['catch_up_seconds']}s; load average (1 min) "
              f"{phase['load_average_1m']['min']:.1f} to {phase['load_average_1m']['max']:.1f}")


if __name__ == "__main__":
    sys.exit(main())
