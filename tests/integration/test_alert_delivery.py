"""`crm alerts` against the real broker: AlertChange records written straight to crm.alerts (valid
ones, one sent twice, one invalid) reach a webhook that fails its first requests and then recovers:
every alert once, in customer order, correctly signed; the invalid record is skipped and reported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from services.alerts.signing import verify
from services.alerts.store import AlertStore
from services.ingest.keys import ApiKeyStore
from streams import topics
from streams.config import PROJECT_ROOT
from tests.integration.conftest import free_port
from tests.unit.test_alert_delivery import Receiver, alert, by_customer, encoded, requested_order

pytestmark = pytest.mark.integration


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _health(url: str) -> dict | None:
    try:
        return httpx.get(f"{url}/health", timeout=2).json()
    except httpx.TransportError:
        return None


@dataclass
class RunningService:
    url: str
    api_key: str     # a backoffice key, for the subscription API
    log_path: Path
    process: subprocess.Popen


@contextmanager
def alert_service(stack, tmp_path: Path, backoff_cap_seconds: str) -> Iterator[RunningService]:
    """`crm alerts` as a subprocess on a free port with fast retries, running once this yields;
    stopped with SIGTERM on the way out (the caller checks how it exited)."""
    keys = ApiKeyStore(stack.settings.ingest_db)
    _, api_key = keys.create("backoffice", "alerts integration test")
    keys.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CRM_ALERTS_HOST": "127.0.0.1", "CRM_ALERTS_PORT": str(port),
           "CRM_ALERTS_BACKOFF_BASE_SECONDS": "0.05", "CRM_ALERTS_BACKOFF_CAP_SECONDS": backoff_cap_seconds}
    log_path = tmp_path / "alerts.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.cli", "alerts"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, start_new_session=True)
    try:
        _wait(lambda: (_health(url) or {}).get("consumer") == "running", 60, f"crm alerts to run (log {log_path})")
        yield RunningService(url, api_key, log_path, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def test_alerts_from_kafka_reach_a_flaky_webhook_once_each_in_order_and_signed(stack, tmp_path):
    with alert_service(stack, tmp_path, backoff_cap_seconds="0.2") as service:
        url, secret, log_path, process = service.url, service.api_key, service.log_path, service.process
        # Only this test's alerts: the worker may write others to crm.alerts meanwhile.
        store_id = f"it-{uuid.uuid4().hex[:8]}"
        with Receiver(fail_first=5, fail_status=503) as receiver:
            created = httpx.post(f"{url}/v1/webhooks", json={"url": receiver.url, "filters": {"stores": [store_id]}},
                                 headers={"Authorization": f"Bearer {secret}"})
            assert created.status_code == 201, created.text
            hook_secret = created.json()["secret"]

            customers = [f"it-cust-{uuid.uuid4().hex[:6]}" for _ in range(3)]
            alerts = [alert(c, store_id=store_id, version=v) for v in (1, 2, 3) for c in customers]
            for a in alerts:
                stack.send(a.customer_key.encode(), encoded(a), topic=topics.ALERTS.name)
            stack.send(alerts[0].customer_key.encode(), encoded(alerts[0]), topic=topics.ALERTS.name)  # a re-send
            # The same customer's next change, after the re-send in the same partition: once it is
            # delivered, the re-send has been read too.
            marker = alert(alerts[0].customer_key, store_id=store_id, version=4)
            stack.send(marker.customer_key.encode(), encoded(marker), topic=topics.ALERTS.name)
            broken = orjson.dumps({**orjson.loads(encoded(alert(store_id=store_id))), "change_id": "not-a-uuid"})
            stack.send(b"broken", broken, topic=topics.ALERTS.name)
            stack.flush()
            sent = [*alerts, marker]

            _wait(lambda: len(receiver.accepted()) >= len(sent), 60, "every alert at the receiver")
            accepted = receiver.accepted()
            assert sorted(r.change_id for r in accepted) == sorted(str(a.change_id) for a in sent)  # once each
            assert all(verify(hook_secret, r.headers["x-crm-signature"], r.body) for r in accepted)
            assert {r.body for r in accepted} == {encoded(a) for a in sent}
            assert requested_order(receiver.all()) == by_customer(sent)
            assert len(receiver.all()) > len(sent)      # the first requests failed and were retried

            _wait(lambda: (_health(url) or {}).get("invalid_records", 0) >= 1, 30, "the invalid record to be counted")
        store = AlertStore(stack.settings.alerts_db)
        try:
            invalid = [r for r in store.invalid_records() if r.value == broken]
        finally:
            store.close()
        assert len(invalid) == 1 and "change_id" in invalid[0].error and invalid[0].topic == topics.ALERTS.name
    assert process.returncode == 0, log_path.read_text()[-3000:]
    output = log_path.read_text()
    assert f"skipped {topics.ALERTS.name}[" in output and "not a valid AlertChange" in output
    assert "alerts service stopped" in output
    _forget_projected(stack, customers, expected_rows=len(sent))


def _forget_projected(stack, customers: list[str], expected_rows: int) -> None:
    """The projection writer also put these hand-made alerts into `churn_alerts`. Nothing in
    `crm.events` derives them, so a rebuild from the log (tests/integration/test_replay.py) would
    rightly not have them: once they are projected, take them out again."""
    where = "customer_key IN (" + ", ".join(f"'{customer}'" for customer in customers) + ")"
    stack.wait_for(lambda: stack.query(f"SELECT count() FROM churn_alerts FINAL WHERE {where}")[0][0] == expected_rows,
                   what="the hand-made alerts in churn_alerts")
    stack.client.command(f"ALTER TABLE churn_alerts DELETE WHERE {where} SETTINGS mutations_sync = 2")


def test_a_customer_erased_record_deletes_the_customer_s_alerts_and_deliveries_from_the_service(stack, tmp_path):
    with alert_service(stack, tmp_path, backoff_cap_seconds="0.2") as service:
        store_id = f"it-{uuid.uuid4().hex[:8]}"
        # A subscriber that never answers well: the deliveries stay pending until the erasure.
        with Receiver(fail_first=10**6, fail_status=503) as receiver:
            created = httpx.post(f"{service.url}/v1/webhooks", json={"url": receiver.url, "filters": {"stores": [store_id]}},
                                 headers={"Authorization": f"Bearer {service.api_key}"})
            assert created.status_code == 201, created.text
            gone, kept = f"it-gone-{uuid.uuid4().hex[:6]}", f"it-kept-{uuid.uuid4().hex[:6]}"
            for customer in (gone, kept):
                change = alert(customer, store_id=store_id)
                stack.send(customer.encode(), encoded(change), topic=topics.ALERTS.name)
            stack.flush()

            def logged() -> set[str]:
                store = AlertStore(stack.settings.alerts_db)
                try:
                    return {a.customer_key for a in store.alerts_after(0, limit=100_000)} & {gone, kept}
                finally:
                    store.close()

            _wait(lambda: logged() == {gone, kept}, 60, "both alerts in the service's log")
            erased = {"type": "customer_erased", "customer_key": gone, "request_event_id": str(uuid.uuid4()),
                      "request_id": "it-req", "requested_by": "dpo", "erased_at": "2026-03-02T10:00:00+00:00",
                      "data_keys_shredded": [], "aliases_unlinked": [], "points_forfeited": 0, "alerts_closed": []}
            stack.send(gone.encode(), orjson.dumps(erased), topic=topics.ERASURES.name)
            stack.flush()
            _wait(lambda: logged() == {kept}, 60, "the erased customer's alerts to be deleted")
            store = AlertStore(stack.settings.alerts_db)
            try:
                assert gone in store.erased_customers()
                subscription = created.json()["id"]
                assert {d.customer_key for d in store.deliveries(subscription)} == {kept}
            finally:
                store.close()
    assert service.process.returncode == 0, service.log_path.read_text()[-3000:]
    _forget_projected(stack, [gone, kept], expected_rows=2)
    # The hand-made erasure was projected too; a rebuild from the log would rightly not have it.
    stack.wait_for(lambda: stack.query(f"SELECT count() FROM erasures FINAL WHERE customer_key = '{gone}'")[0][0] == 1,
                   what="the hand-made erasure in erasures")
    stack.client.command(f"ALTER TABLE erasures DELETE WHERE customer_key = '{gone}' SETTINGS mutations_sync = 2")
