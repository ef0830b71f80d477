"""Benchmark: how fast the pipeline turns the events topic into committed projections, against how
fast a plain aiokafka consumer can merely read and decode the same topic. Both are measured in one
run on one machine, so the ratio means something even where absolute numbers do not.

    ./crm bench [--customers 1500] [--days 120] [--workers 1 | --workers 2 | --workers 1,2] [--probes 20]

Each run starts its own broker on free ports in a temporary state directory and removes it
afterwards. A run:

1. sends the simulated workload to `crm.events` (kafka-python, uncompressed, as a POS or app would);
2. (a) reads it with a plain aiokafka consumer: read, decode, validate;
3. (b) starts the projection writer and `--workers` worker processes (one consumer group; every
   worker after the first gets its own CRM_STATE_DIR, `<state>/worker-<i>`, because the worker keeps
   its RocksDB state under `$CRM_STATE_DIR/worker/state/<partition>`) and measures the rate from the
   worker group's first committed progress until the writer has committed every output. The worker
   commits its offsets only every 2.8 s (Faust's commit interval), so the end is taken as the start
   of the writer's final caught-up stretch, once the worker's commits confirm it has folded
   everything (polled every 0.1 s);
4. the Kafka bytes: after the catch-up, the `.log` segment bytes of every topic in the broker's data
   directory (`<kafka_dir>/data/<topic>-<partition>/*.log`; 1 GiB segments, so nothing has been
   compacted or deleted yet: what is there is what was written), per topic, against `crm.events`:
   "bytes written to Kafka per accepted event, all topics and changelogs, against the event";
5. the event-to-ClickHouse latency on the idle pipeline: `--probes` single events (a copy of a
   simulated event with a new event id, for a known customer). Before each it notes the end offsets of
   `crm.events.accepted`; it then waits until those have grown (the worker has written the probe's
   accepted record: the "worker" part) and until the writer group's committed offsets on
   `crm.events.accepted` reach the new end offsets (the writer commits only after inserting into
   ClickHouse: the rest). Polled every 10 ms; probes are 0 to 0.5 s apart at random, so that they do
   not fall into step with the writer's 500 ms fetch wait;
6. CPU seconds of each process (worker(s), writer, broker) during (b), from /proc, and the peak
   RSS (VmHWM) of each.

`--workers 1,2` does a whole run (own broker, same workload) per count, one after the other, and
ends with the scaling factor: the pipeline rate of each count against the first count's."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15 of stat)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = -(-len(ordered) * q // 100)  # ceil(n * q / 100)
    return ordered[max(0, min(len(ordered) - 1, int(rank) - 1))]


async def plain_consumer_rate(bootstrap: str, topic: str, total: int) -> tuple[float, int]:
    from aiokafka import AIOKafkaConsumer

    from schemas.codec import DecodeError, decode_event

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, max_partition_fetch_bytes=16 * 1024 * 1024)
    await consumer.start()
    seen = valid = 0
    started = time.perf_counter()
    try:
        while seen < total:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batches.values():
                for record in records:
                    seen += 1
                    if not isinstance(decode_event(record.value), DecodeError):
                        valid += 1
    finally:
        elapsed = time.perf_counter() - started
        await consumer.stop()
    return seen / elapsed, valid


# --- Kafka bytes ----------------------------------------------------------------------------------

def kafka_topic_bytes(data_dir: Path) -> dict[str, dict[str, int]]:
    """Per topic: bytes of its .log segment files (the record batches as the broker stores them),
    its partition directories and segment count. The broker lays a partition out as
    `<data_dir>/<topic>-<n>/<base offset>.log` (plus indexes, not counted)."""
    topics: dict[str, dict[str, int]] = {}
    for directory in data_dir.iterdir():
        name, _, partition = directory.name.rpartition("-")
        if not directory.is_dir() or not name or not partition.isdigit():
            continue  # meta.properties, checkpoints, `-delete` directories
        logs = list(directory.glob("*.log"))
        entry = topics.setdefault(name, {"bytes": 0, "partitions": 0, "segments": 0})
        entry["bytes"] += sum(f.stat().st_size for f in logs)
        entry["partitions"] += 1
        entry["segments"] += len(logs)
    return topics


def topic_records(bootstrap: str, names: list[str]) -> dict[str, int]:
    """Records written per topic: the sum of its end offsets (compaction does not lower them)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="crm-bench-bytes")
    try:
        result = {}
        for name in names:
            partitions = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
            result[name] = sum(consumer.end_offsets(partitions).values()) if partitions else 0
        return result
    finally:
        consumer.close()


def kafka_bytes_report(data_dir: Path, bootstrap: str, events_topic: str, accepted_topic: str) -> dict[str, Any]:
    sizes = kafka_topic_bytes(data_dir)
    platform_topics = sorted(name for name in sizes if not name.startswith("__"))
    records = topic_records(bootstrap, platform_topics)
    total = sum(sizes[name]["bytes"] for name in platform_topics)
    events = sizes.get(events_topic, {"bytes": 0})["bytes"]
    return {"sizes": sizes, "records": records, "platform_topics": platform_topics, "total": total,
            "events_bytes": events, "derived": total - events, "accepted": records.get(accepted_topic, 0),
            "events_records": records.get(events_topic, 0)}


def print_kafka_bytes(report: dict[str, Any]) -> None:
    sizes, records = report["sizes"], report["records"]
    print("Kafka bytes after the catch-up (.log segment files per topic):")
    print(f"  {'topic':42}{'partitions':>11}{'records':>10}{'bytes':>14}{'bytes/record':>14}")
    for name in sorted(sizes, key=lambda n: (n.startswith("__"), -sizes[n]["bytes"])):
        entry = sizes[name]
        count = records.get(name)
        per = f"{entry['bytes'] / count:,.0f}" if count else "-"
        note = "  (broker-internal, not counted)" if name.startswith("__") else ""
        print(f"  {name:42}{entry['partitions']:>11}{count if count is not None else '-':>10}"
              f"{entry['bytes']:>14,}{per:>14}{note}")
    events, total, accepted = report["events_bytes"], report["total"], report["accepted"]
    print(f"  all platform topics: {total:,} bytes = {total / events:.2f} x crm.events ({events:,} bytes; "
          f"target <= 4x); everything but crm.events: {report['derived']:,} bytes = {report['derived'] / events:.2f} x")
    if accepted:
        print(f"  per accepted event ({accepted:,} accepted of {report['events_records']:,} records in crm.events): "
              f"{total / accepted:,.0f} bytes in all topics, of which crm.events {events / accepted:,.0f} and "
              f"everything else {report['derived'] / accepted:,.0f}")


# --- latency --------------------------------------------------------------------------------------

@dataclass
class Probe:
    worker: float  # seconds from the send until the probe's accepted record is in crm.events.accepted
    total: float   # ... until the writer has committed past it (its rows are in ClickHouse)


def visibility_latencies(bootstrap: str, messages: list[Any], samples: int, timeout: float = 60.0) -> tuple[list[Probe], int]:
    """Seconds from sending one event until the projection writer has committed past its accepted
    record; returns the probes and how many timed out."""
    from projections.writer import WRITER_GROUP
    from streams import topics

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="crm-bench-latency")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="crm-bench-latency")
    accepted = [TopicPartition(topics.ACCEPTED.name, p) for p in range(topics.ACCEPTED.partitions)]

    def committed() -> dict[TopicPartition, int]:
        offsets = admin.list_group_offsets({WRITER_GROUP: accepted}).get(WRITER_GROUP, {})
        return {tp: (meta.offset if meta is not None else -1) for tp, meta in offsets.items()}

    rng = random.Random(5)
    candidates = [m for m in messages if m.kind == "valid" and orjson.loads(m.value).get("customer_id")]
    probes: list[Probe] = []
    timeouts = 0
    try:
        for n in range(samples):
            time.sleep(rng.uniform(0.0, 0.5))
            message = candidates[(n * 7919) % len(candidates)]
            body = orjson.loads(message.value)
            body["event_id"] = str(uuid.uuid4())  # a new event, not a duplicate
            before = consumer.end_offsets(accepted)
            started = time.perf_counter()
            producer.send(topics.EVENTS.name, key=message.key, value=orjson.dumps(body))
            producer.flush()
            deadline = started + timeout
            while True:
                ends = consumer.end_offsets(accepted)
                if sum(ends.values()) > sum(before.values()) or time.perf_counter() > deadline:
                    break
                time.sleep(0.01)
            worker_done = time.perf_counter()
            while time.perf_counter() <= deadline:
                done = committed()
                if all(done.get(tp, -1) >= ends[tp] for tp in accepted):
                    break
                time.sleep(0.01)
            finished = time.perf_counter()
            if finished > deadline:
                timeouts += 1
                continue
            probes.append(Probe(worker_done - started, finished - started))
    finally:
        producer.close()
        consumer.close()
        admin.close()
    return probes, timeouts


# --- one run --------------------------------------------------------------------------------------

@dataclass
class Result:
    workers: int
    total: int = 0
    rate_plain: float = 0.0
    rate_steady: float = 0.0
    rate_total: float = 0.0
    startup: float = 0.0
    kafka: dict[str, Any] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)


def run(args: argparse.Namespace, workers: int) -> Result:
    state_dir = Path(tempfile.mkdtemp(prefix="crm-bench-"))
    os.environ.update({
        "CRM_STATE_DIR": str(state_dir), "CRM_KAFKA_PORT": str(free_port()),
        "CRM_KAFKA_CONTROLLER_PORT": str(free_port()),
    })
    os.environ.pop("CRM_KAFKA_BOOTSTRAP", None)
    os.environ.pop("CRM_CLICKHOUSE_DSN", None)

    from deploy.kafka.broker import LocalBroker
    from deploy.topics import ensure_topics
    from services.lag import LagProbe
    from services.simulator import Simulator, Workload
    from streams import topics
    from streams.config import settings

    config = settings()
    broker = LocalBroker(config)
    processes: list[tuple[str, subprocess.Popen]] = []
    result = Result(workers)
    try:
        broker_pid = broker.start().pid
        ensure_topics(config)
        print(f"--- {workers} worker{'s' if workers > 1 else ''} ---")
        print(f"machine: {machine()}; load average {load()}")
        workload = Workload(customers=args.customers, days=args.days, seed=11)
        messages = list(Simulator(workload).messages(topics.EVENT_PARTITIONS))
        producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all", linger_ms=20,
                                 batch_size=1024 * 1024, enable_idempotence=True)
        started = time.perf_counter()
        for message in messages:
            producer.send(topics.EVENTS.name, key=message.key, value=message.value, partition=message.partition)
        producer.flush()
        producer.close()
        total = result.total = len(messages)
        print(f"produced {total} records in {time.perf_counter() - started:.1f}s (kafka-python producer)")

        rate_plain, valid = asyncio.run(plain_consumer_rate(config.kafka_bootstrap, topics.EVENTS.name, total))
        result.rate_plain = rate_plain
        print(f"(a) plain aiokafka consumer, read + decode + validate: {rate_plain:,.0f} events/s "
              f"({valid} valid)")

        logs = state_dir / "logs"
        logs.mkdir()
        started = time.perf_counter()
        commands = [("writer", ["writer"], state_dir)]
        for i in range(workers):
            # The worker keeps its RocksDB state under $CRM_STATE_DIR/worker: one directory each.
            commands.append((f"worker-{i + 1}", ["worker", "--loglevel", "warn"],
                             state_dir if i == 0 else state_dir / f"worker-{i + 1}"))
        for name, argv, own_state in commands:
            env = {**os.environ, "CRM_STATE_DIR": str(own_state)}
            processes.append((name, subprocess.Popen(
                [sys.executable, "-m", "services.cli", *argv], cwd=PROJECT_ROOT, env=env,
                stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT)))
        pids = {name: process.pid for name, process in processes}
        if broker_pid:
            pids["broker"] = broker_pid
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        cpu_at_first = cpu_before
        probe = LagProbe(config)
        first_progress = None
        folded_at_first = 0
        writer_zero_since: float | None = None
        while True:
            lag = probe.lag()
            now = time.perf_counter()
            writer_zero_since = (writer_zero_since or now) if lag.writer == 0 else None
            if lag.worker is not None:
                folded = total - lag.worker
                if first_progress is None and folded > 0:
                    first_progress, folded_at_first = now, folded
                    cpu_at_first = {name: cpu_seconds(pid) for name, pid in pids.items()}
                if lag.caught_up and folded == total:
                    break
            for name, process in processes:
                if process.poll() is not None:
                    tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the {name} exited with code {process.returncode}:\n{tail}")
            time.sleep(0.1)
        confirmed = time.perf_counter()
        finished = writer_zero_since or confirmed
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        probe.close()
        assert first_progress is not None
        result.rate_total = total / (finished - started)
        # The rate once running counts the records folded after the worker group's first commit. A
        # workload small enough to be folded before that commit has no such rate.
        running = finished - first_progress
        result.rate_steady = (total - folded_at_first) / running if folded_at_first < total and running > 0 else float("nan")
        result.startup = first_progress - started
        result.cpu = {name: cpu_after[name] - cpu_before[name] for name in pids}
        running_cpu = {name: cpu_after[name] - cpu_at_first[name] for name in pids}
        drain = confirmed - started
        since_first = confirmed - first_progress
        print(f"(b) pipeline to committed ClickHouse projections, {workers} worker{'s' if workers > 1 else ''}: "
              f"{result.rate_steady:,.0f} events/s once running ({result.rate_total:,.0f} events/s including "
              f"{result.startup:.0f}s until the worker group's first commit; writer caught up "
              f"{confirmed - finished:.1f}s before the worker's commits confirmed it)")
        print(f"ratio (b)/(a): {result.rate_steady / rate_plain:.3f}")
        print(f"CPU seconds during (b) ({drain:.0f}s wall, start-up included): "
              + ", ".join(f"{name} {seconds:.1f}" for name, seconds in result.cpu.items())
              + f"; from the first commit on ({since_first:.0f}s): "
              + ", ".join(f"{name} {seconds:.1f} ({seconds / since_first:.0%} of a core)"
                          for name, seconds in running_cpu.items()))

        result.kafka = kafka_bytes_report(config.kafka_dir / "data", config.kafka_bootstrap, topics.EVENTS.name,
                                          topics.ACCEPTED.name)
        print_kafka_bytes(result.kafka)

        probes, timeouts = visibility_latencies(config.kafka_bootstrap, messages, args.probes)
        result.probes = probes
        totals = [p.total * 1000 for p in probes]
        worker_parts = [p.worker * 1000 for p in probes]
        if probes:
            print(f"event-to-ClickHouse latency on an idle pipeline ({len(probes)} single events"
                  f"{f', {timeouts} timed out' if timeouts else ''}; until the writer committed past the "
                  f"probe's accepted record): p50 {percentile(totals, 50):.0f} ms, p90 {percentile(totals, 90):.0f} ms, "
                  f"max {max(totals):.0f} ms; of which until the worker's accepted record was in Kafka: "
                  f"p50 {percentile(worker_parts, 50):.0f} ms, p90 {percentile(worker_parts, 90):.0f} ms, "
                  f"max {max(worker_parts):.0f} ms")
        else:
            print(f"event-to-ClickHouse latency: every one of {timeouts} probes timed out")
        result.rss = {name: peak_rss_mib(process.pid) for name, process in processes}
        print("peak memory: " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in result.rss.items())
              + f", benchmark process (plain consumer) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        print(f"load average at the end: {load()}")
    finally:
        for _name, process in processes:
            process.terminate()
        for _name, process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        broker.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1500)
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--workers", default="1",
                        help="worker processes in the group; a comma-separated list (1,2) runs once per count")
    parser.add_argument("--probes", type=int, default=20, help="single events for the latency (default 20)")
    args = parser.parse_args()
    try:
        counts = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error("--workers: a number or a comma-separated list of numbers")
    if not counts or min(counts) < 1:
        parser.error("--workers: at least 1")

    results = [run(args, n) for n in counts]
    if len(results) > 1:
        base = results[0]
        print("--- scaling ---")
        for r in results:
            print(f"{r.workers} worker{'s' if r.workers > 1 else ''}: pipeline {r.rate_steady:,.0f} events/s "
                  f"(ratio to the plain consumer {r.rate_steady / r.rate_plain:.3f}), "
                  f"{r.rate_steady / base.rate_steady:.2f} x the rate with {base.workers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
