"""The real parts for integration tests, started once per test session and stopped at its end:
Apache Kafka (local KRaft broker on free 127.0.0.1 ports, or testcontainers when CRM_TESTCONTAINERS=1
and a Docker engine exists), the Faust worker as a subprocess, and the projection writer in this
process, owning the embedded ClickHouse (or a ClickHouse container)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streams.config import PROJECT_ROOT, Settings, settings

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `last` run after every other test of the session. The producer fuzz leaves valid
    events dated at the catalog's edges (up to 2199) in the shared stack, and the population figures
    published after it (segment boundaries, the churn model) take the latest event time as their
    "as of"; the tests that publish them come first."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_for(env: dict[str, str]) -> Settings:
    """The Settings a process started with exactly `env` would read."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def records_on(bootstrap: str, topic: str) -> list[Any]:
    """Every record of `topic`, from its start to the end it had when this was called, partition by
    partition (kafka-python ConsumerRecords: key, value, headers, partition, offset)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=2000)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        found: list[Any] = []
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            for records in consumer.poll(timeout_ms=2000).values():
                found.extend(record for record in records if record.offset < ends[TopicPartition(topic, record.partition)])
        return found
    finally:
        consumer.close()


def worker_command() -> list[str]:
    return ["worker", "--loglevel", os.environ.get("CRM_TEST_WORKER_LOGLEVEL", "warn")]


class CrmProcess:
    """A `crm` command (the stream worker, the projection writer, ...) as a real OS process, so
    tests can kill it like a crash would."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path):
        self.command, self.env, self.log_path = command, env, log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "services.cli", *self.command],
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                            start_new_session=True)

    def variant(self, log_path: Path, **env: str) -> CrmProcess:
        """Another process of this command, with these environment variables changed (for example
        CRM_FAILPOINTS, or CRM_STATE_DIR for a second worker beside this one); not started."""
        return CrmProcess(self.command, {**self.env, **env}, log_path)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_until_dead(self, timeout: float) -> int:
        """The process's return code once it has ended (-9: killed by SIGKILL)."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Stack:
    settings: Settings
    worker: CrmProcess
    writer: Any
    producer: KafkaProducer
    client: Any  # the tests' own client: the writer's is busy in its thread

    def send(self, key: bytes | None, value: bytes, topic: str = "crm.events", partition: int | None = None) -> None:
        self.producer.send(topic, key=key, value=value, partition=partition)

    def flush(self) -> None:
        self.producer.flush()

    def query(self, sql: str, parameters: dict | None = None) -> list[tuple]:
        return self.client.query(sql, parameters=parameters).result_rows

    def wait_for(self, condition: Callable[[], Any], timeout: float = 180.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(1.0)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; worker log: {self.worker.log_path}")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from deploy.topics import ensure_topics
    from projections.writer import ProjectionWriter

    state_dir = tmp_path_factory.mktemp("state")
    saved = dict(os.environ)
    os.environ["CRM_STATE_DIR"] = str(state_dir)
    # Tests write their own clock ticks at chosen event times, so that what time does is the same
    # in ClickHouse and in the pure replay they compare it with.
    os.environ["CRM_TICK_SECONDS"] = "0"
    # Likewise segment boundaries: tests publish them when they want them (projections/boundaries.py).
    os.environ["CRM_BOUNDARIES_SECONDS"] = "0"
    containers: list[Any] = []
    broker = None
    if os.environ.get("CRM_TESTCONTAINERS") == "1":
        containers = _start_containers()
    else:
        os.environ.pop("CRM_KAFKA_BOOTSTRAP", None)
        os.environ.pop("CRM_CLICKHOUSE_DSN", None)
        os.environ["CRM_KAFKA_PORT"] = str(free_port())
        os.environ["CRM_KAFKA_CONTROLLER_PORT"] = str(free_port())
        from deploy.kafka.broker import LocalBroker

        broker = LocalBroker(settings())
        broker.start()
    config = settings()
    worker = writer = producer = None
    try:
        ensure_topics(config)
        worker = CrmProcess(worker_command(), dict(os.environ), state_dir / "worker.log")
        worker.start()
        writer = ProjectionWriter(config)
        writer.start_in_thread()
        producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all", linger_ms=5)
        from projections.clickhouse import connect

        stack = Stack(config, worker, writer, producer, connect(config))
        _wait_until_the_pipeline_runs(stack)
        yield stack
    finally:
        if producer:
            producer.close()
        if writer:
            writer.stop()
        if worker:
            worker.stop()
        if broker:
            broker.stop()
        for container in containers:
            container.stop()
        os.environ.clear()
        os.environ.update(saved)


def _wait_until_the_pipeline_runs(stack: Stack) -> None:
    """Worker start-up (group join, table recovery) takes from seconds to minutes on a busy two-core
    machine; wait for it once here, so that each test's own deadline measures its own work."""
    from tests.factories import encoded, event

    warmup = event("daily_sign_in", customer_id="warmup")
    stack.send(b"warmup", encoded(warmup))
    stack.flush()
    stack.wait_for(lambda: stack.query("SELECT count() FROM events WHERE event_id = {e:UUID}",
                                       {"e": warmup["event_id"]})[0][0] == 1,
                   timeout=600, what="the first event to reach ClickHouse")


def _start_containers() -> list[Any]:
    """Kafka and ClickHouse in Docker, for machines that have an engine (not this project's CI)."""
    from testcontainers.clickhouse import ClickHouseContainer
    from testcontainers.kafka import KafkaContainer

    kafka = KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft()
    kafka.start()
    clickhouse = ClickHouseContainer("clickhouse/clickhouse-server:24.8")
    clickhouse.start()
    os.environ["CRM_KAFKA_BOOTSTRAP"] = kafka.get_bootstrap_server()
    host, port = clickhouse.get_container_host_ip(), clickhouse.get_exposed_port(8123)
    os.environ["CRM_CLICKHOUSE_DSN"] = f"http://{clickhouse.username}:{clickhouse.password}@{host}:{port}/crm"
    return [kafka, clickhouse]


@dataclass
class Api:
    url: str
    keys: Any  # ApiKeyStore: tests make the keys they need

    def key(self, source: str = "backoffice", **options: Any) -> str:
        _, secret = self.keys.create(source, f"test-{source}", **options)
        return secret


@pytest.fixture(scope="session")
def api(stack: Stack) -> Iterator[Api]:
    """The ingestion API served by uvicorn on a free 127.0.0.1 port in a thread of this process."""
    import threading

    import httpx
    import uvicorn

    from services.ingest.api import create_app
    from services.ingest.keys import ApiKeyStore

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(stack.settings), host="127.0.0.1", port=port,
                                          log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, name="ingestion-api", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        raise AssertionError("the ingestion API did not become ready")
    keys = ApiKeyStore(stack.settings.ingest_db)
    try:
        yield Api(url, keys)
    finally:
        keys.close()
        server.should_exit = True
        thread.join(timeout=30)
