"""The fault suite's stack: every part of the platform as its own OS process on 127.0.0.1 (the Kafka
broker, the worker, the projection writer with its SQL endpoint, the alerts service and the ingestion
API), on a state directory of its own, so that a test can kill any of them, or the broker under all
of them, as a crash would, and start it again. The test process never opens the embedded ClickHouse:
it queries through the writer's SQL endpoint, as an analyst would.

A webhook subscriber (`Subscriber`) is registered before any event and is down from the start of the
suite: every scenario's alerts pile up for it while the other faults happen, and the last test brings
it back and checks that each alert arrives once, in order (test_faults.py).

Each scenario writes its figures (events sent, lost, doubled, seconds to catch up) with `report()`:
printed, and appended as a JSON line to the file named by CRM_FAULT_REPORT (RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaProducer

from streams.config import Settings
from tests.integration.conftest import CrmProcess, settings_for, worker_command

pytestmark = pytest.mark.integration

SQL_USER, SQL_PASSWORD = "fault", "fault-secret"
# How long the webhook subscriber is down (the ten minutes); CRM_FAULT_SUBSCRIBER_DOWN_SECONDS
# shortens it for a quick local run.
SUBSCRIBER_DOWN_SECONDS = float(os.environ.get("CRM_FAULT_SUBSCRIBER_DOWN_SECONDS", "600"))
# The alerts service's retries while the subscriber is down: short waits, so that it gets its alerts
# within seconds of coming back, and enough attempts that their guaranteed window spans the outage
# (test_faults.py asserts it).
ALERT_RETRY_ENV = {"CRM_ALERTS_BACKOFF_BASE_SECONDS": "1", "CRM_ALERTS_BACKOFF_CAP_SECONDS": "10",
                   "CRM_ALERTS_MAX_ATTEMPTS": str(int(SUBSCRIBER_DOWN_SECONDS / 5) + 20)}


def _stable_port() -> int:
    """A free port below Linux's ephemeral range (32768 and up): the parts here are stopped and
    started again on their ports, and a port of that range could meanwhile be taken by one of the
    many outgoing connections of the other parts."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


@dataclass
class Delivery:
    change_id: str
    customer_key: str
    body: dict[str, Any]


class Subscriber:
    """A webhook receiver on a fixed 127.0.0.1 port that records every request; `down()` closes its
    socket (senders get 'connection refused'), `up()` listens again on the same port."""

    def __init__(self) -> None:
        self.port = _stable_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.deliveries: list[Delivery] = []
        self._server: ThreadingHTTPServer | None = None
        self.down_since: float | None = None

    def up(self) -> None:
        received = self.deliveries

        class Receiver(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append(Delivery(self.headers["X-CRM-Change-Id"], body["customer_key"], body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Receiver)
        threading.Thread(target=self._server.serve_forever, name="webhook-subscriber", daemon=True).start()
        self.down_since = None

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.down_since = time.monotonic()


@dataclass
class FaultStack:
    settings: Settings
    env: dict[str, str]
    state_dir: Path
    broker: Any  # deploy.kafka.broker.LocalBroker
    worker: CrmProcess
    writer: CrmProcess
    alerts: CrmProcess
    api: CrmProcess
    producer: KafkaProducer
    api_url: str
    api_key: str
    subscriber: Subscriber
    _client: Any = None

    # --- what fold_check.py needs of a stack --------------------------------------------------------

    def send(self, key: bytes | None, value: bytes, topic: str = "crm.events", partition: int | None = None) -> None:
        self.producer.send(topic, key=key, value=value, partition=partition)

    def flush(self) -> None:
        self.producer.flush()

    def query(self, sql: str, parameters: dict | None = None) -> list[tuple]:
        """Through the writer's SQL endpoint; a fresh client after the writer restarted."""
        import clickhouse_connect

        if self._client is None:
            self._client = clickhouse_connect.get_client(
                host="127.0.0.1", port=self.settings.sql_port, username=SQL_USER, password=SQL_PASSWORD,
                database=self.settings.clickhouse_database, connect_timeout=5, send_receive_timeout=60)
        try:
            return self._client.query(sql, parameters=parameters).result_rows
        except Exception:
            self._client = None
            raise

    def wait_for(self, condition: Callable[[], Any], timeout: float = 300.0, what: str = "condition") -> Any:
        """`condition()` until it is true; an error while a part is still coming back counts as not yet."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = condition()
                if result:
                    return result
            except Exception as exc:
                last_error = exc
            time.sleep(1.0)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error!r}); "
                             f"logs in {self.state_dir / 'logs'}")

    # --- the parts ----------------------------------------------------------------------------------

    def process(self, name: str, command: list[str], **env: str) -> CrmProcess:
        return CrmProcess(command, {**self.env, **env}, self.state_dir / "logs" / f"{name}.log")

    def kill_broker(self) -> None:
        from deploy.process import process_alive

        pid = self.broker.status().pid
        os.kill(pid, 9)
        while process_alive(pid):
            time.sleep(0.1)

    def start_broker(self) -> None:
        self.broker.start()

    @property
    def refuse_inserts(self) -> Path:
        return Path(self.env["CRM_FAULT_REFUSE_INSERTS"])

    def wait_until_sql_answers(self, timeout: float = 180) -> None:
        self.wait_for(lambda: self.query("SELECT 1") == [(1,)], timeout, "the writer's SQL endpoint")

    def caught_up(self) -> bool:
        from services.lag import LagProbe

        probe = LagProbe(self.settings)
        try:
            return probe.lag().caught_up
        finally:
            probe.close()


def report(scenario: str, **figures: Any) -> None:
    """A scenario's measured figures: printed, and kept for RELIABILITY.md when CRM_FAULT_REPORT names a file."""
    line = json.dumps({"scenario": scenario, **figures})
    print(line)
    target = os.environ.get("CRM_FAULT_REPORT")
    if target:
        with open(target, "a") as out:
            out.write(line + "\n")


def _environment(state_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("CRM_") or key in ("CRM_TEST_WORKER_LOGLEVEL",)}
    env.update({
        "CRM_STATE_DIR": str(state_dir),
        "CRM_KAFKA_PORT": str(_stable_port()), "CRM_KAFKA_CONTROLLER_PORT": str(_stable_port()),
        "CRM_SQL_PORT": str(_stable_port()), "CRM_SQL_USERS": f"{SQL_USER}:{SQL_PASSWORD}",
        "CRM_API_PORT": str(_stable_port()), "CRM_ALERTS_PORT": str(_stable_port()),
        # The tests write clock ticks at event times of their choosing, and publish nothing on a timer,
        # so that the pure fold over the log is the whole truth.
        "CRM_TICK_SECONDS": "0", "CRM_BOUNDARIES_SECONDS": "0", "CRM_CHURN_MODEL_SECONDS": "0",
        # While this file exists the writer's inserts are refused by the engine (projections/writer.py).
        "CRM_FAULT_REFUSE_INSERTS": str(state_dir / "refuse-inserts"),
        **ALERT_RETRY_ENV,
    })
    return env


def _wait_until_ready(url: str, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} did not become ready at {url}")


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    from deploy.kafka.broker import LocalBroker
    from deploy.topics import ensure_topics
    from services.ingest.keys import ApiKeyStore

    state_dir = tmp_path_factory.mktemp("fault-state")
    (state_dir / "logs").mkdir()
    env = _environment(state_dir)
    config = settings_for(env)
    broker = LocalBroker(config)
    broker.start()
    subscriber = Subscriber()
    parts: list[CrmProcess] = []
    producer = None
    try:
        ensure_topics(config)
        keys = ApiKeyStore(config.ingest_db)
        _, api_key = keys.create("app", "fault suite")
        _, backoffice_key = keys.create("backoffice", "fault suite")
        keys.close()

        def part(name: str, command: list[str]) -> CrmProcess:
            process = CrmProcess(command, env, state_dir / "logs" / f"{name}.log")
            process.start()
            parts.append(process)
            return process

        worker = part("worker", worker_command())
        writer = part("writer", ["writer"])
        alerts = part("alerts", ["alerts"])
        api = part("api", ["api"])
        producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all", linger_ms=5,
                                 retries=2**31 - 1, delivery_timeout_ms=600_000, request_timeout_ms=10_000,
                                 max_in_flight_requests_per_connection=1)
        stack = FaultStack(config, env, state_dir, broker, worker, writer, alerts, api, producer,
                           f"http://127.0.0.1:{config.api_port}", api_key, subscriber)
        _wait_until_ready(f"http://127.0.0.1:{config.alerts_port}/health", "the alerts service")
        _wait_until_ready(f"{stack.api_url}/ready", "the ingestion API")
        created = httpx.post(f"http://127.0.0.1:{config.alerts_port}/v1/webhooks",
                             headers={"Authorization": f"Bearer {backoffice_key}"},
                             json={"url": subscriber.url}, timeout=30)
        assert created.status_code == 201, created.text
        subscriber.down()  # before the first alert: it will have to wait for all of them
        stack.wait_until_sql_answers(timeout=300)
        yield stack
    finally:
        if producer is not None:
            producer.close(timeout=10)
        for process in reversed(parts):
            process.stop()
        broker.stop()
        subscriber.down()
