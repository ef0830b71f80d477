"""Benchmark: events per second into `crm.events` through the ingestion API (HTTP batches, checked,
de-duplicated, acknowledged by Kafka before the answer) against a direct Kafka producer, in one run
on one machine, so that the ratio means something even where the absolute numbers do not.

    .venv/bin/python -m bench.ingest_throughput [--events 50000] [--batch 500] [--connections 4]

It starts its own broker on free ports in a temporary state directory, creates the topics, and then
(a) produces the events with kafka-python's KafkaProducer (acks=all, idempotent, linger 20 ms, 1 MiB
batches, keyed by customer: the settings of bench/pipeline_throughput.py) and flushes; (b) serves the
API (`crm api`, uvicorn, one process) on 127.0.0.1 and sends the same events with new event ids in
batches from an httpx client over a few concurrent connections, asserting that every event is
accepted. The events are the simulator's valid events (a realistic mix of types and sizes), dated in
the last month. Everything it started is stopped at the end and the directory removed."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from bench.pipeline_throughput import PROJECT_ROOT, free_port, machine

WARMUP_EVENTS = 1000


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workload(count: int) -> list[dict[str, Any]]:
    """`count` valid events of simulated customers, dated in the month before now, so that the API
    takes them all (not in the future; older than 7 days is fine: accepted, marked late)."""
    from services.simulator import Simulator, Workload

    days = 30
    customers = max(count // 8, 10)
    while True:
        start = datetime.now(UTC) - timedelta(days=days + 1)
        events = Simulator(Workload(customers=customers, days=days, start=start, seed=5)).events()
        if len(events) >= count:
            return [{**e, "occurred_at": e["occurred_at"].isoformat()} for e in events[:count]]
        customers = int(customers * 1.5 * count / max(len(events), 1)) + 10


def customer_key(event: dict[str, Any]) -> bytes:
    if event.get("customer_id"):
        return event["customer_id"].encode()
    alias_type, alias = next(iter(event["identifiers"].items()))
    return f"{alias_type}:{alias}".encode()


def with_new_ids(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "event_id": str(uuid.uuid4())} for e in events]


def topic_size(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return sum(consumer.end_offsets(partitions).values())
    finally:
        consumer.close()


def direct(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> float:
    """Seconds to produce `events` (encoding included) until every one is acknowledged."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=20,
                             batch_size=1024 * 1024)
    try:
        started = time.perf_counter()
        for event in events:
            producer.send(topic, key=customer_key(event), value=orjson.dumps(event))
        producer.flush()
        return time.perf_counter() - started
    finally:
        producer.close()


async def through_api(url: str, secret: str, events: list[dict[str, Any]], batch: int,
                      connections: int) -> tuple[float, list[float]]:
    """Seconds to send `events` in batches over `connections` concurrent connections, and the
    seconds each request took. Raises unless every event is accepted."""
    import httpx

    batches = [events[i:i + batch] for i in range(0, len(events), batch)]
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}

    async def sender(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            items = queue.get_nowait()
            sent = time.perf_counter()
            response = await client.post("/v1/events/batch", content=orjson.dumps({"events": items}), headers=headers)
            latencies.append(time.perf_counter() - sent)
            if response.status_code != 200:
                raise RuntimeError(f"the API answered {response.status_code}: {response.text[:500]}")
            answer = response.json()
            if answer["accepted"] != len(items):
                refused = next((r for r in answer["results"] if r["status"] != "accepted"), None)
                raise RuntimeError(f"{answer['accepted']} of {len(items)} accepted; e.g. {refused}")

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(sender(client) for _ in range(connections)))
        return time.perf_counter() - started, latencies


def start_api(state_dir: Path, port: int) -> subprocess.Popen:
    import httpx

    log = open(state_dir / "api.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with code {process.returncode}; see {state_dir / 'api.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.terminate()
    raise RuntimeError("the API did not become ready within 120 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000, help="events per path (default 50000)")
    parser.add_argument("--batch", type=int, default=500, help="events per API request (at most 500)")
    parser.add_argument("--connections", type=int, default=4, help="concurrent HTTP connections (default 4)")
    args = parser.parse_args()

    state_dir = Path(tempfile.mkdtemp(prefix="crm-bench-ingest-"))
    os.environ.update({
        "CRM_STATE_DIR": str(state_dir), "CRM_KAFKA_PORT": str(free_port()),
        "CRM_KAFKA_CONTROLLER_PORT": str(free_port()),
    })
    os.environ.pop("CRM_KAFKA_BOOTSTRAP", None)
    os.environ.pop("CRM_CLICKHOUSE_DSN", None)

    from deploy.kafka.broker import LocalBroker
    from deploy.topics import ensure_topics
    from services.ingest.keys import ApiKeyStore
    from streams import topics
    from streams.config import settings

    config = settings()
    broker = LocalBroker(config)
    api: subprocess.Popen | None = None
    topic = topics.EVENTS.name
    try:
        print(f"machine: {machine()}; nproc {len(os.sched_getaffinity(0))}; load average at start {load()}", flush=True)
        broker.start()
        ensure_topics(config)
        broker_pid = int(broker.pid_file.read_text())
        events = workload(WARMUP_EVENTS + args.events)
        size = statistics.mean(len(orjson.dumps(e)) for e in events)
        print(f"{args.events} events per path (+{WARMUP_EVENTS} warm-up), {size:.0f} bytes each on average, "
              f"{len({customer_key(e) for e in events})} customers", flush=True)

        # (a) a direct producer
        direct(config.kafka_bootstrap, topic, events[:WARMUP_EVENTS])
        before, cpu_broker, cpu_self = topic_size(config.kafka_bootstrap, topic), cpu_seconds(broker_pid), sum(os.times()[:2])
        seconds_direct = direct(config.kafka_bootstrap, topic, events[WARMUP_EVENTS:])
        cpu_direct = {"broker": cpu_seconds(broker_pid) - cpu_broker, "producer": sum(os.times()[:2]) - cpu_self}
        written = topic_size(config.kafka_bootstrap, topic) - before
        assert written == args.events, f"the direct producer wrote {written} records, not {args.events}"
        rate_direct = args.events / seconds_direct
        print(f"(a) direct KafkaProducer (acks=all, idempotent, linger 20 ms): {rate_direct:,.0f} events/s "
              f"({seconds_direct:.1f} s); load average {load()}", flush=True)

        # (b) the ingestion API
        store = ApiKeyStore(config.ingest_db)
        _, secret = store.create("backoffice", "bench", rate_per_second=1e9, burst=10**9)
        store.close()
        port = free_port()
        api = start_api(state_dir, port)
        url = f"http://127.0.0.1:{port}"
        api_events = with_new_ids(events)
        asyncio.run(through_api(url, secret, api_events[:WARMUP_EVENTS], args.batch, args.connections))
        before, cpu_broker, cpu_server, cpu_self = (topic_size(config.kafka_bootstrap, topic), cpu_seconds(broker_pid),
                                                    cpu_seconds(api.pid), sum(os.times()[:2]))
        seconds_api, latencies = asyncio.run(through_api(url, secret, api_events[WARMUP_EVENTS:], args.batch,
                                                         args.connections))
        cpu_api = {"broker": cpu_seconds(broker_pid) - cpu_broker, "API server": cpu_seconds(api.pid) - cpu_server,
                   "HTTP client": sum(os.times()[:2]) - cpu_self}
        written = topic_size(config.kafka_bootstrap, topic) - before
        assert written == args.events, f"the API wrote {written} records, not {args.events}"
        rate_api = args.events / seconds_api
        latencies.sort()
        print(f"(b) ingestion API, batches of {args.batch} over {args.connections} connections: {rate_api:,.0f} events/s "
              f"({seconds_api:.1f} s, {len(latencies)} requests, all accepted; per request p50 "
              f"{statistics.median(latencies) * 1000:.0f} ms, p95 {latencies[int(len(latencies) * 0.95)] * 1000:.0f} ms); "
              f"load average {load()}", flush=True)
        print(f"ratio (b)/(a): {rate_api / rate_direct:.3f}")
        for name, cpu, count in (("(a)", cpu_direct, args.events), ("(b)", cpu_api, args.events)):
            print(f"CPU seconds per 10,000 events {name}: " + ", ".join(
                f"{process} {seconds * 10_000 / count:.2f}" for process, seconds in cpu.items()))
        print(f"load average at the end: {load()}")
    finally:
        if api is not None and api.poll() is None:
            api.terminate()
            try:
                api.wait(30)
            except subprocess.TimeoutExpired:
                api.kill()
                api.wait()
        broker.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
