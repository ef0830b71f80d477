"""`crm backup` and `crm restore` (docs/backup.md) as an operator runs them, on brokers of their own (free
ports, fresh state directories; no worker, whose erasure fold this test does not rely on):

a small log with sealed personal data of three customers, dead letters and audit records, the SQLite
stores open as the running services hold them; a backup; then one customer is erased the way the
worker records it (a customer_erased record, tombstones for the data keys); the register is exported;
the backup is restored onto a fresh state directory on a "new machine" with that register. Every
record comes back byte for byte at its offset, the erased customer's wrapped keys do not, an erasure
request for them follows the restored log, and the other customers' personal data opens again with
the master keys the operator kept apart. A second restore with --force over the restored installation
finds the erasure in that installation's own register."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from deploy.kafka.broker import LocalBroker
from deploy.topics import ensure_topics
from privacy.fields import KeyUnavailable, seal_event, unseal_event
from privacy.keystore import KeyStore
from privacy.secrets import identity_secret, master_keyring
from schemas.privacy import AuditRecord, CustomerErased
from services.alerts.filters import Filters
from services.alerts.store import AlertStore
from services.ingest.keys import ApiKeyStore
from streams import topics
from streams.config import PROJECT_ROOT, Settings
from tests.factories import event
from tests.integration.conftest import free_port

try:  # the submitted form, personal values plain (tests/factories.py); sealed here under the key store's keys
    from tests.factories import submitted
except ImportError:  # before `event` gave the sealed form
    submitted = event

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.environ.get("CRM_TESTCONTAINERS") == "1", reason="runs local brokers of its own")]

CUSTOMERS = ("alice", "bob", "carol")
ALICE_CARD = "loyalty_card:alice-card"


def _installation(state_dir: Path) -> tuple[Settings, dict[str, str]]:
    state_dir.mkdir(parents=True, exist_ok=True)
    kafka, controller = free_port(), free_port()
    config = Settings(state_dir=state_dir, kafka_port=kafka, kafka_controller_port=controller,
                      kafka_bootstrap_override=None)
    env = {name: value for name, value in os.environ.items()
           if name not in ("CRM_STATE_DIR", "CRM_KAFKA_BOOTSTRAP", "CRM_CLICKHOUSE_DSN", "CRM_MASTER_KEYS",
                           "CRM_IDENTITY_SECRET")}
    env.update({"CRM_KAFKA_PORT": str(kafka), "CRM_KAFKA_CONTROLLER_PORT": str(controller)})
    return config, env


def _crm(env: dict[str, str], state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "--state-dir", str(state_dir), *args], env=env,
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)


def _records(config: Settings, spec: topics.TopicSpec) -> dict[int, list]:
    """Every record of a topic, per partition, as (offset, key, value, headers, timestamp)."""
    consumer = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
        ends = consumer.end_offsets(partitions)
        found: dict[int, list] = {}
        for tp in partitions:
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            rows = found.setdefault(tp.partition, [])
            while consumer.position(tp) < ends[tp]:
                for record in consumer.poll(timeout_ms=1000).get(tp, ()):
                    rows.append((record.offset, record.key, record.value, list(record.headers or []), record.timestamp))
        return found
    finally:
        consumer.close()


def _live_keys(config: Settings) -> dict[str, dict]:
    live: dict[str, dict] = {}
    for rows in _records(config, topics.CUSTOMER_KEYS).values():
        for _, key, value, _, _ in rows:
            if value is None:
                live.pop(key.decode(), None)
            else:
                live[key.decode()] = orjson.loads(value)
    return live


@pytest.fixture
def brokers():
    started: list[LocalBroker] = []
    yield started
    for broker in started:
        broker.stop()


def test_a_restore_brings_the_log_back_at_its_offsets_and_no_erased_customer(tmp_path, monkeypatch, brokers):
    monkeypatch.delenv("CRM_MASTER_KEYS", raising=False)
    monkeypatch.delenv("CRM_IDENTITY_SECRET", raising=False)
    source, source_env = _installation(tmp_path / "old")
    brokers.append(LocalBroker(source))
    brokers[-1].start()
    ensure_topics(source)
    identity_secret(source.state_dir)  # made on first use by the running platform

    # --- a small installation: sealed personal data, plain events, dead letters, audit, the SQLite stores
    keys = KeyStore(source.kafka_bootstrap, master_keyring(source.state_dir)).open(follow=False)
    data_keys = keys.keys_for([*CUSTOMERS, ALICE_CARD])
    producer = KafkaProducer(bootstrap_servers=source.kafka_bootstrap, acks="all", linger_ms=5)
    registered = {}
    for customer in CUSTOMERS:
        key_id, key = data_keys[customer]
        registered[customer] = seal_event(submitted("customer_registered", customer_id=customer,
                                                payload={"name": f"{customer} Smith", "email": f"{customer}@example.com"}),
                                          key_id, key)
        producer.send(topics.EVENTS.name, key=customer.encode(), value=orjson.dumps(registered[customer]),
                      headers=[("traceparent", f"00-{uuid.uuid4().hex}-01".encode())])
        for n in range(4):
            producer.send(topics.EVENTS.name, key=customer.encode(), value=orjson.dumps(event(
                "purchase_completed", customer_id=customer, occurred_at=f"2026-03-0{n + 1}T10:00:00+00:00")),
                timestamp_ms=1_770_000_000_000 + n)
    producer.send(topics.DEAD_LETTERS.name, key=b"bob", value=b"{not json", headers=[("crm.dlq.reason", b"malformed_json")])
    producer.send(topics.AUDIT.name, key=b"a1", value=AuditRecord(
        audit_id=uuid.uuid4(), at=datetime.now(UTC), actor="cli:test", role="support", action="read_personal",
        customer_key="bob", reason="ticket-1", outcome="allowed").model_dump_json().encode())
    producer.flush()
    alerts, api_keys = AlertStore(source.alerts_db), ApiKeyStore(source.ingest_db)  # open, as the services hold them
    hook = alerts.create_subscription("https://example.com/hook", Filters.build(["churn_risk"]))
    api_key, _ = api_keys.create("pos", "till 1", store_id="store-1")

    # --- the backup, while everything is open
    backup_dir = tmp_path / "backups" / "b1"
    run = _crm(source_env, source.state_dir, "backup", str(backup_dir))
    assert run.returncode == 0, run.stdout + run.stderr
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    assert manifest["topics"][topics.EVENTS.name]["records"] == 15
    assert manifest["topics"][topics.CUSTOMER_KEYS.name]["records"] == 4
    assert manifest["erasure_register"]["erasures"] == 0
    assert set(manifest["sqlite"]) == {"alerts", "ingest"}
    for name in manifest["files"]:
        assert stat.S_IMODE((backup_dir / name).stat().st_mode) == 0o600
    assert not any(p.name in ("master-keys", "identity-secret") for p in backup_dir.rglob("*"))
    master_key = (source.state_dir / "secrets" / "master-keys").read_text().split(":", 1)[1].strip()
    assert not any(master_key.encode() in p.read_bytes() for p in backup_dir.rglob("*") if p.is_file())

    # --- alice is erased after the backup, as the worker records it; the register is exported
    erasure = CustomerErased(
        customer_key="alice", request_event_id=uuid.uuid4(), request_id="dsr-1", requested_by="privacy-officer",
        erased_at=datetime(2026, 4, 1, tzinfo=UTC), data_keys_shredded=[data_keys["alice"][0]],
        aliases_unlinked=[ALICE_CARD], points_forfeited=0, alerts_closed=[])
    producer.send(topics.ERASURES.name, key=b"alice", value=erasure.model_dump_json().encode())
    keys.shred([data_keys["alice"][0], data_keys[ALICE_CARD][0]])
    producer.flush()
    before = {spec.name: _records(source, spec) for spec in (topics.EVENTS, topics.DEAD_LETTERS, topics.AUDIT)}
    register = tmp_path / "registers" / "erasures.jsonl.zst"
    register.parent.mkdir()
    run = _crm(source_env, source.state_dir, "backup", "--erasures-only", str(register))
    assert run.returncode == 0 and "1 erasures" in run.stdout, run.stdout + run.stderr
    producer.close()
    keys.close()
    alerts.close()
    api_keys.close()
    brokers[-1].stop()

    # --- a new machine: the operator brings the secrets from the secret store, then restores
    target, target_env = _installation(tmp_path / "new")
    brokers.append(LocalBroker(target))
    run = _crm(target_env, target.state_dir, "restore", str(backup_dir), "--no-start")
    assert run.returncode == 1 and "master key 'm1'" in run.stderr, run.stdout + run.stderr
    shutil.copytree(source.state_dir / "secrets", target.state_dir / "secrets")
    run = _crm(target_env, target.state_dir, "restore", str(backup_dir), "--erasures", str(register), "--no-start")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "erasures after the backup, requested again: 1" in run.stdout

    _check_restored(target, before, data_keys, registered, erasure, hook.id, api_key.key_id)
    # The worker folds the restored log; its erasure fold (if present) also adds its own customer_erased
    # record for the appended request, which the next restore takes for the same erasure.
    _worker_folds_the_restored_log(target, target_env, tmp_path / "worker.log")
    run = _crm(target_env, target.state_dir, "restore", str(backup_dir), "--no-start")
    assert run.returncode == 1 and "not empty" in run.stderr, run.stdout + run.stderr

    # --- again with --force over the restored installation, without the register file: its own
    # crm.erasures (read before the wipe) still keeps alice out
    run = _crm(target_env, target.state_dir, "restore", str(backup_dir), "--force", "--yes", "--no-start")
    assert run.returncode == 0, run.stdout + run.stderr
    _check_restored(target, before, data_keys, registered, erasure, hook.id, api_key.key_id)


def _check_restored(target: Settings, before: dict, data_keys: dict, registered: dict, erasure: CustomerErased,
                    hook_id: str, api_key_id: str) -> None:
    events = _records(target, topics.EVENTS)
    requests = []
    for partition, rows in before[topics.EVENTS.name].items():
        restored = events[partition]
        # Byte for byte at the same offsets: key, value, headers, timestamp.
        assert restored[:len(rows)] == rows
        requests += [orjson.loads(value) for _, _, value, _, _ in restored[len(rows):]]
    for name in (topics.DEAD_LETTERS.name,):
        assert _records(target, topics.DEAD_LETTERS) == before[name]
    audit = _records(target, topics.AUDIT)[0]
    # The backup's own audit record is written once the backup is complete, so it is not in it.
    kept = [row for row in before[topics.AUDIT.name][0] if b'"action":"backup"' not in row[2]]
    assert audit[:len(kept)] == kept
    assert any(b'"action":"backup"' in row[2] for row in before[topics.AUDIT.name][0]), "the backup is audited"
    last = AuditRecord.model_validate_json(audit[-1][2])
    assert last.action == "restore" and last.actor.startswith("cli:") and last.outcome == "allowed"

    # An erasure request for alice follows the restored records, with an id derived from the original.
    assert [(r["type"], r["customer_id"], r["payload"]["requested_by"]) for r in requests] == [
        ("customer_erasure_requested", "alice", "restore")]
    assert requests[0]["event_id"] == str(uuid.uuid5(
        uuid.uuid5(uuid.NAMESPACE_URL, "crm-platform:restore:customer_erasure_requested"), str(erasure.request_event_id)))
    register = [CustomerErased.model_validate_json(v) for _, _, v, _, _ in _records(target, topics.ERASURES)[0]]
    assert erasure in register

    # No wrapped key of alice (nor of the alias the erasure unlinked); the others' keys as they were.
    live = _live_keys(target)
    assert {k["customer_key"] for k in live.values()} == {"bob", "carol"}
    assert data_keys["alice"][0] not in live and data_keys[ALICE_CARD][0] not in live
    keys = KeyStore(target.kafka_bootstrap, master_keyring(target.state_dir)).open(follow=False)
    try:
        assert keys.data_key(data_keys["bob"][0]) == data_keys["bob"][1]
        assert unseal_event(registered["bob"], keys.data_key)["payload"]["name"] == "bob Smith"
        with pytest.raises(KeyUnavailable):
            unseal_event(registered["alice"], keys.data_key)
    finally:
        keys.close()

    alerts, api_keys = AlertStore(target.alerts_db), ApiKeyStore(target.ingest_db)
    try:
        assert [s.id for s in alerts.subscriptions()] == [hook_id]
        assert [k.key_id for k in api_keys.list()] == [api_key_id]
    finally:
        alerts.close()
        api_keys.close()


def _worker_folds_the_restored_log(target: Settings, env: dict[str, str], log: Path) -> None:
    """The restored log, the appended erasure request included, is one the worker accepts: every
    event reaches crm.events.accepted, and no new dead letter appears."""
    import time

    from tests.integration.conftest import CrmProcess, worker_command

    events = [orjson.loads(v) for rows in _records(target, topics.EVENTS).values() for _, _, v, _, _ in rows]
    worker = CrmProcess(worker_command(), {**env, "CRM_STATE_DIR": str(target.state_dir), "CRM_TICK_SECONDS": "0",
                                           "CRM_BOUNDARIES_SECONDS": "0", "CRM_WORKER_METRICS_PORT": "0"}, log)
    worker.start()
    try:
        deadline = time.monotonic() + 400
        while True:
            accepted = {orjson.loads(v)["event"]["event_id"]
                        for rows in _records(target, topics.ACCEPTED).values() for _, _, v, _, _ in rows}
            if accepted >= {e["event_id"] for e in events}:
                break
            assert time.monotonic() < deadline, f"the worker did not accept the restored log; see {log}"
            time.sleep(2)
        assert len(_records(target, topics.DEAD_LETTERS)[0]) == 1
    finally:
        worker.stop()
