"""Benchmark: how fast the pipeline turns the events topic into committed projections, against how
fast a plain aiokafka consumer can merely read and decode the same topic. Both are measured in one
run on one machine, so the ratio means something even where absolute numbers do not.

    ./crm bench [--customers 1500]

It starts its own broker on free ports in a temporary state directory and removes it afterwards."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
from kafka import KafkaProducer

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


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


def visibility_latencies(config, probe, messages, samples: int = 15) -> list[float]:
    """Seconds from sending one event until the writer has committed its projection rows."""
    from streams import topics

    producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all")
    valid = [m for m in messages if m.kind == "valid"]
    latencies = []
    for n in range(samples):
        body = orjson.loads(valid[n].value)
        body["event_id"] = str(uuid.uuid4())  # a new event, not a duplicate
        started = time.perf_counter()
        producer.send(topics.EVENTS.name, key=valid[n].key, value=orjson.dumps(body))
        producer.flush()
        while not probe.lag().caught_up:
            time.sleep(0.05)
        latencies.append(time.perf_counter() - started)
    producer.close()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1500)
    parser.add_argument("--days", type=int, default=120)
    args = parser.parse_args()

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
    processes: list[subprocess.Popen] = []
    try:
        broker.start()
        ensure_topics(config)
        print(f"machine: {machine()}")
        workload = Workload(customers=args.customers, days=args.days, seed=11)
        messages = list(Simulator(workload).messages(topics.EVENT_PARTITIONS))
        producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all", linger_ms=20,
                                 batch_size=1024 * 1024, enable_idempotence=True)
        started = time.perf_counter()
        for message in messages:
            producer.send(topics.EVENTS.name, key=message.key, value=message.value, partition=message.partition)
        producer.flush()
        producer.close()
        total = len(messages)
        print(f"produced {total} records in {time.perf_counter() - started:.1f}s (kafka-python producer)")

        rate_plain, valid = asyncio.run(plain_consumer_rate(config.kafka_bootstrap, topics.EVENTS.name, total))
        print(f"(a) plain aiokafka consumer, read + decode + validate: {rate_plain:,.0f} events/s "
              f"({valid} valid)")

        logs = state_dir / "logs"
        logs.mkdir()
        started = time.perf_counter()
        for name, argv in (("worker", ["worker", "--loglevel", "warn"]), ("writer", ["writer"])):
            processes.append(subprocess.Popen([sys.executable, "-m", "services.cli", *argv], cwd=PROJECT_ROOT,
                                              stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT))
        probe = LagProbe(config)
        first_progress = None
        folded_at_first = 0
        while True:
            lag = probe.lag()
            if lag.worker is None:
                time.sleep(0.25)
                continue
            folded = total - lag.worker
            if first_progress is None and folded > 0:
                first_progress, folded_at_first = time.perf_counter(), folded
            if lag.caught_up and folded == total:
                break
            for process, name in zip(processes, ("worker", "writer")):
                if process.poll() is not None:
                    tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the {name} exited with code {process.returncode}:\n{tail}")
            time.sleep(0.25)
        finished = time.perf_counter()
        latencies = visibility_latencies(config, probe, messages)
        probe.close()
        rate_total = total / (finished - started)
        rate_steady = (total - folded_at_first) / (finished - first_progress)
        worker_mib, writer_mib = (peak_rss_mib(p.pid) for p in processes)
        print(f"(b) pipeline to committed ClickHouse projections: {rate_steady:,.0f} events/s once running "
              f"({rate_total:,.0f} events/s including {first_progress - started:.0f}s of worker start-up)")
        print(f"ratio (b)/(a): {rate_steady / rate_plain:.3f}")
        print(f"event-to-ClickHouse latency on an idle pipeline ({len(latencies)} single events): "
              f"p50 {statistics.median(latencies):.2f}s, max {max(latencies):.2f}s")
        print(f"peak memory: worker {worker_mib:.0f} MiB, writer {writer_mib:.0f} MiB, "
              f"benchmark process (plain consumer) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        broker.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
