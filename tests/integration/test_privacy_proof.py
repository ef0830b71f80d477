"""The privacy proof of docs/privacy.md, on a stack of its own (broker, worker, writer, alerts service,
ingestion API and intake agent as processes, one state directory): personal data sent through both
edges lies nowhere in clear, and an erased customer's personal values and data key are gone from every
file the platform wrote once the documented bounds have passed. The bounds are hours in production;
the test shortens the topics' settings and the broker's check intervals to seconds, which is what the
bounds depend on.

Every search has a positive control: the same search must find values that are meant to be there
(tokens, order ids, the wrapped keys before compaction), or it would prove nothing."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest
from kafka import KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from privacy.keystore import KeyStore
from privacy.secrets import master_keyring
from streams import topics
from streams.config import PROJECT_ROOT, Settings
from tests.integration.conftest import CrmProcess, free_port, settings_for, worker_command
from tests.stored_bytes import Finding, search

pytestmark = pytest.mark.integration

CUSTOMERS = 16
ERASED = range(0, 16, 3)  # customers 0, 3, 6, 9, 12, 15
SQL_USER, SQL_PASSWORD = "analyst", "privacy-proof"
# What the bounds depend on, in seconds instead of hours: the broker checks retention and deletes
# files at once, the cleaner wakes every second.
BROKER_SETTINGS = ("log.retention.check.interval.ms=1000;log.cleaner.backoff.ms=1000;"
                   "log.segment.delete.delay.ms=500;file.delete.delay.ms=500")
FAST_TOPIC_SETTINGS = {"segment.ms": "1000", "file.delete.delay.ms": "500"}


@dataclass(frozen=True)
class Person:
    customer_id: str
    name: str
    email: str
    new_email: str
    phone: str
    birthday: str
    street: str

    def values(self) -> list[bytes]:
        """Each personal value as it would lie in a file if it were in clear."""
        return [v.encode() for v in (self.name, self.email, self.new_email, self.phone, self.street)] + \
               [self.birthday.encode()]


def person(i: int, run: str) -> Person:
    return Person(customer_id=f"pp-{run}-{i:02d}", name=f"Quillon Vasterby{run}{i:02d}",
                  email=f"quillon.{run}{i:02d}@privacy-proof.example", new_email=f"qv.{run}{i:02d}@moved.example",
                  phone=f"+49301{int(run, 16) % 1000:03d}{i:04d}", birthday=f"19{40 + i:02d}-0{1 + i % 9}-1{i % 10}",
                  street=f"{i} Vasterbygatan {run}")


@dataclass
class ProofStack:
    settings: Settings
    env: dict[str, str]
    state_dir: Path
    api_url: str
    api_key: str
    officer_key: str
    producer: KafkaProducer
    parts: list[CrmProcess]

    def query(self, sql: str) -> list[tuple]:
        import clickhouse_connect

        client = clickhouse_connect.get_client(host="127.0.0.1", port=self.settings.sql_port, username=SQL_USER,
                                               password=SQL_PASSWORD, database=self.settings.clickhouse_database)
        try:
            return client.query(sql).result_rows
        finally:
            client.close()

    def wait_for(self, condition, timeout: float = 240.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = condition()
                if result:
                    return result
            except Exception as exc:  # noqa: BLE001 - a part still starting
                last = exc
            time.sleep(1.0)
        raise AssertionError(f"timed out waiting for {what} (last error {last!r}); logs in {self.state_dir / 'logs'}")

    def post(self, events: list[dict]) -> None:
        response = httpx.post(f"{self.api_url}/v1/events/batch", json={"events": events}, timeout=60,
                              headers={"Authorization": f"Bearer {self.api_key}"})
        assert response.status_code == 200, response.text
        refused = [r for r in response.json()["results"] if r["status"] not in ("accepted", "duplicate")]
        assert not refused, refused

    def erase(self, customer_key: str) -> None:
        response = httpx.post(f"{self.api_url}/v1/privacy/customers/{customer_key}/erasure", timeout=60,
                              json={"reason": "data subject request", "request_id": f"dsr-{customer_key}"},
                              headers={"Authorization": f"Bearer {self.officer_key}"})
        assert response.status_code == 202, response.text

    def crm(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=600, cwd=PROJECT_ROOT)


@pytest.fixture(scope="module")
def proof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProofStack]:
    from deploy.kafka.broker import LocalBroker
    from deploy.topics import ensure_topics
    from services.ingest.keys import ApiKeyStore

    state_dir = tmp_path_factory.mktemp("privacy-state")
    (state_dir / "logs").mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CRM_")}
    env.update({"CRM_STATE_DIR": str(state_dir), "CRM_KAFKA_PORT": str(free_port()),
                "CRM_KAFKA_CONTROLLER_PORT": str(free_port()), "CRM_SQL_PORT": str(free_port()),
                "CRM_SQL_USERS": f"{SQL_USER}:{SQL_PASSWORD}", "CRM_API_PORT": str(free_port()),
                "CRM_ALERTS_PORT": str(free_port()), "CRM_WORKER_METRICS_PORT": "0", "CRM_WRITER_METRICS_PORT": "0",
                "CRM_TICK_SECONDS": "0", "CRM_BOUNDARIES_SECONDS": "0", "CRM_CHURN_MODEL_SECONDS": "0",
                "CRM_KAFKA_EXTRA_CONFIG": BROKER_SETTINGS})
    config = settings_for(env)
    saved = dict(os.environ)
    os.environ["CRM_KAFKA_EXTRA_CONFIG"] = BROKER_SETTINGS  # read by the broker launcher in this process
    broker = LocalBroker(config)
    try:
        broker.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    parts: list[CrmProcess] = []
    producer = None
    try:
        ensure_topics(config)
        keys = ApiKeyStore(config.ingest_db)
        _, api_key = keys.create("backoffice", "privacy proof")
        _, officer_key = keys.create("backoffice", "privacy officer", role="privacy_officer")
        keys.close()
        for name, command in (("worker", worker_command()), ("writer", ["writer"]), ("alerts", ["alerts"]),
                              ("api", ["api"]), ("intake", ["intake"])):
            process = CrmProcess(command, env, state_dir / "logs" / f"{name}.log")
            process.start()
            parts.append(process)
        producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all", linger_ms=5)
        stack = ProofStack(config, env, state_dir, f"http://127.0.0.1:{config.api_port}", api_key, officer_key, producer,
                           parts)
        stack.wait_for(lambda: httpx.get(f"{stack.api_url}/ready", timeout=5).status_code == 200, 180, "the API")
        stack.wait_for(lambda: stack.query("SELECT 1") == [(1,)], 300, "the SQL endpoint")
        yield stack
    finally:
        if producer is not None:
            producer.close(timeout=10)
        for process in reversed(parts):
            process.stop()
        broker.stop()


def _event(type_name: str, customer_id: str | None, at: datetime, payload: dict | None = None, **extra) -> dict:
    event = {"event_id": str(uuid.uuid4()), "type": type_name, "occurred_at": at.isoformat(),
             "source": {"channel": "app"}, **extra}
    if customer_id is not None:
        event["customer_id"] = customer_id
    if payload is not None:
        event["payload"] = payload
    return event


def _registration(p: Person, at: datetime) -> dict:
    return _event("customer_registered", p.customer_id, at, {
        "name": p.name, "email": p.email, "phone": p.phone, "birthday": p.birthday,
        "address": {"line1": p.street, "city": "Berlin", "country": "DE"}})


def _purchase(customer_id: str | None, order_id: str, at: datetime, **extra) -> dict:
    return _event("purchase_completed", customer_id, at, {
        "order_id": order_id, "currency": "EUR", "lines": [{"sku": "sku-1", "category": "tea", "quantity": 1,
                                                            "unit_price": "12.50"}]}, **extra)


def _data_key_forms(key: bytes) -> list[bytes]:
    return [key, base64.b64encode(key), base64.urlsafe_b64encode(key).rstrip(b"="), key.hex().encode()]


def _shorten_bounds(stack: ProofStack) -> None:
    """What the documented bounds wait for, in seconds: the intake topics' retention, and segments of
    the key topic that roll and compact at once."""
    admin = KafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap)
    try:
        changes = {
            topics.INTAKE.name: {**FAST_TOPIC_SETTINGS, "retention.ms": "1000"},
            topics.INTAKE_DEAD_LETTERS.name: {**FAST_TOPIC_SETTINGS, "retention.ms": "1000"},
            topics.CUSTOMER_KEYS.name: {**FAST_TOPIC_SETTINGS, "max.compaction.lag.ms": "1000",
                                        "min.compaction.lag.ms": "0", "delete.retention.ms": "1000"},
        }
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs=settings)
                             for name, settings in changes.items()])
    finally:
        admin.close()


def _roll_segments(stack: ProofStack) -> None:
    """A segment rolls when a record arrives after segment.ms: one record per partition closes the
    segments that hold what must go, so that retention and compaction can take them. The records
    themselves say nothing: a tombstone of a key id nobody has, an intake record that is refused."""
    for spec in (topics.CUSTOMER_KEYS, topics.INTAKE, topics.INTAKE_DEAD_LETTERS):
        for partition in range(spec.partitions):
            value = None if spec is topics.CUSTOMER_KEYS else b"{}"
            stack.producer.send(spec.name, key=uuid.uuid4().hex.encode(), value=value, partition=partition)
    stack.producer.flush()


def _where(findings: list[Finding], root: Path) -> list[str]:
    return sorted({f"{f.path.relative_to(root)} ({f.form}): {f.needle[:40]!r}" for f in findings})


def test_personal_data_lies_nowhere_in_clear_and_an_erased_customer_leaves_no_trace(proof: ProofStack) -> None:
    run = uuid.uuid4().hex[:4]
    people = [person(i, run) for i in range(CUSTOMERS)]
    at = datetime.now(UTC) - timedelta(days=30)

    # Half register through the ingestion API, half through the intake topic, as a producer that
    # writes to Kafka directly does; every one buys twice, once known only by the e-mail (a POS that
    # reads a receipt address), and moves to a new e-mail address.
    through_api = [p for i, p in enumerate(people) if i % 2 == 0]
    through_intake = [p for i, p in enumerate(people) if i % 2 == 1]
    proof.post([_registration(p, at) for p in through_api])
    for p in through_intake:
        proof.producer.send(topics.INTAKE.name, key=p.customer_id.encode(), value=orjson.dumps(_registration(p, at)))
    proof.producer.flush()
    proof.wait_for(lambda: proof.query(f"SELECT count() FROM customer_profiles FINAL WHERE customer_key LIKE 'pp-{run}-%'")
                   == [(CUSTOMERS,)], what="every registration projected")
    proof.post([_purchase(p.customer_id, f"order-{run}-{i}", at + timedelta(days=1)) for i, p in enumerate(people)])
    proof.post([_event("profile_updated", p.customer_id, at + timedelta(days=2), {"email": p.new_email})
                for p in people])
    proof.post([_purchase(None, f"order-{run}-{i}-by-mail", at + timedelta(days=3), identifiers={"email": p.new_email})
                for i, p in enumerate(people)])
    proof.wait_for(lambda: proof.query(f"SELECT count() FROM events FINAL WHERE type = 'purchase_completed' "
                                       f"AND customer_key LIKE 'pp-{run}-%'") == [(2 * CUSTOMERS,)],
                   what="every purchase projected, those by e-mail attributed to their customer")

    # The erased customers' data keys, as this test can read them before the erasure.
    store = KeyStore(proof.settings.kafka_bootstrap, master_keyring(proof.state_dir)).open(follow=False)
    erased = [people[i] for i in ERASED]
    kept = [p for p in people if p not in erased]
    key_ids = {p.customer_id: store.key_ids_of(p.customer_id) for p in erased}
    assert all(key_ids.values()), key_ids
    wrapped = {r.wrapped.encode() for r in store.records() if r.customer_key in key_ids}
    data_keys = [form for ids in key_ids.values() for key_id in ids for form in _data_key_forms(store.data_key(key_id))]

    for customer_key in [p.customer_id for p in erased] + [f"pp-{run}-nobody"]:
        proof.erase(customer_key)
    proof.wait_for(lambda: proof.query(f"SELECT count() FROM erasures FINAL WHERE customer_key LIKE 'pp-{run}-%'")
                   == [(len(erased) + 1,)], what="every erasure carried out and projected")

    def keys_gone() -> bool:
        store.catch_up()
        return not any(store.key_ids_of(p.customer_id) for p in erased)
    proof.wait_for(keys_gone, what="the erased customers' data keys tombstoned")
    assert all(store.key_ids_of(p.customer_id) for p in kept)
    store.close()

    # Positive control: before the bounds pass, the search sees the wrapped keys inside the key topic's
    # compressed batches.
    kafka_dir = proof.settings.kafka_dir
    assert search(kafka_dir, wrapped), "the search must see the wrapped keys before compaction"
    assert search(kafka_dir, [through_intake[0].email.encode()]), "and the intake topic's plain records"

    _shorten_bounds(proof)
    time.sleep(2)
    _roll_segments(proof)
    proof.wait_for(lambda: not search(kafka_dir, wrapped), timeout=180, what="compaction removing the wrapped keys")
    plain_everyone = [v for p in people for v in p.values()]
    proof.wait_for(lambda: not search(kafka_dir, plain_everyone), timeout=180,
                   what="the intake topics' retention removing the plain records")

    # Analysts see no personal value in any table or view.
    for (table,) in proof.query("SELECT name FROM system.tables WHERE database = currentDatabase()"):
        rows = orjson.dumps(proof.query(f"SELECT * FROM `{table}`"), default=str)
        assert not [v for v in plain_everyone if v in rows], f"{table} shows a personal value in clear"

    # A rebuild from the log after the erasures gives the same projections.
    replayed = proof.crm("replay")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    verified = proof.crm("verify", "--against", "replaced", "--user", SQL_USER, "--password", SQL_PASSWORD)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # Everything stopped, so every file is complete: the whole state directory is searched.
    for process in reversed(proof.parts):
        process.stop()
    root = proof.state_dir
    assert search(root / "clickhouse", [f"order-{run}-1".encode()]), "control: the search reads ClickHouse's blocks"
    assert search(root / "worker", [people[1].customer_id.encode()]), "control: the search reads the worker's state"
    erased_values = [v for p in erased for v in p.values()]
    assert _where(search(root, erased_values + data_keys + list(wrapped)), root) == []
    assert _where(search(root, [v for p in kept for v in p.values()]), root) == []
