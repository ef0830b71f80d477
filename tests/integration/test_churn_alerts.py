"""Churn alerts end to end: customer events into `crm.events`, the worker opens and resolves
alerts, `crm alerts` delivers them to a webhook that fails for a while and then recovers, and the
projection writer keeps every change in `churn_alerts`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from schemas.alerts import AlertChange
from services.alerts.signing import verify
from tests.factories import encoded, event
from tests.integration.test_alert_delivery import _wait, alert_service
from tests.unit.test_alert_delivery import Receiver, requested_order

pytestmark = pytest.mark.integration


def test_worker_alerts_reach_a_recovering_webhook_signed_and_in_order_and_land_in_clickhouse(stack, tmp_path):
    store_id = f"churn-{uuid.uuid4().hex[:8]}"
    customers = [f"{store_id}-c{n}" for n in range(4)]
    with alert_service(stack, tmp_path, backoff_cap_seconds="0.3") as service:
        url, api_key = service.url, service.api_key
        with Receiver(fail_first=6, fail_status=503) as receiver:
            created = httpx.post(f"{url}/v1/webhooks", headers={"Authorization": f"Bearer {api_key}"},
                                 json={"url": receiver.url, "filters": {"stores": [store_id]}})
            assert created.status_code == 201, created.text
            secret = created.json()["secret"]

            start = datetime.now(UTC) - timedelta(days=3)
            for n, customer in enumerate(customers):
                def send(type_: str, at: datetime, customer: str = customer, **fields) -> None:
                    body = event(type_, customer, occurred_at=at.isoformat(), **fields)
                    stack.send(customer.encode(), encoded(body))

                send("purchase_completed", start, source={"channel": "pos", "store_id": store_id, "terminal_id": "t"})
                send("consent_changed", start, payload={"channel": "email", "granted": True})
                # A detractor opens a bad-experience alert at once. For half of them a complaint left
                # open 48 hours adds a reason (updated, dated at the 48th hour though no tick came:
                # the next event finds the deadline passed), and its resolution takes it away again
                # (updated). A good answer later resolves the alert for all but the last customer.
                send("survey_answered", start + timedelta(hours=1), payload={"survey_id": "s", "kind": "nps", "score": 2})
                if n % 2:
                    send("complaint_filed", start + timedelta(hours=2), payload={"complaint_id": "k", "category": "x"})
                    send("daily_sign_in", start + timedelta(hours=60))  # 58 hours after the complaint
                    send("complaint_resolved", start + timedelta(hours=61), payload={"complaint_id": "k"})
                if n < len(customers) - 1:
                    send("survey_answered", start + timedelta(hours=62), payload={"survey_id": "s2", "kind": "nps",
                                                                                   "score": 9})
            stack.flush()

            def changes_in_clickhouse() -> list[tuple]:
                return stack.query(
                    "SELECT customer_key, toString(change_id), status, version FROM churn_alerts FINAL "
                    "WHERE store_id = {s:String} ORDER BY customer_key, version", {"s": store_id})

            _wait(lambda: len(changes_in_clickhouse()) == 11, 180, "every alert change in churn_alerts")
            rows = changes_in_clickhouse()
            assert sorted(status for _, _, status, _ in rows) == sorted(["opened"] * 4 + ["updated"] * 4 + ["resolved"] * 3)

            _wait(lambda: len(receiver.accepted()) >= len(rows), 120, "every alert at the webhook")
            accepted = receiver.accepted()
            assert sorted(r.change_id for r in accepted) == sorted(change_id for _, change_id, _, _ in rows)
            assert all(verify(secret, r.headers["x-crm-signature"], r.body) for r in accepted)
            assert len(receiver.all()) > len(accepted)  # the first attempts failed and were retried
            delivered = [AlertChange.model_validate_json(r.body) for r in accepted]
            assert {a.alert_type for a in delivered} == {"bad_experience"}
            assert all(a.action.kind == "coupon" and a.action.channel == "email" for a in delivered)
            # Per customer, in the order the worker made them (versions 1, 2, ...).
            want = {customer: [change_id for c, change_id, _, _ in rows if c == customer] for customer in customers}
            assert requested_order(receiver.all()) == want
    assert service.process.returncode == 0, service.log_path.read_text()[-3000:]
