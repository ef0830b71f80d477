"""The alerts service and erasure: a customer_erased record on crm.erasures deletes that customer's
alerts and deliveries from the service's SQLite file (with secure_delete on), and alert changes of
the customer from before the erasure are not logged again when they arrive after it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import orjson

from schemas.privacy import CustomerErased
from services.alerts.consumer import store_batch
from services.alerts.filters import Filters
from services.alerts.store import AlertStore
from tests.unit.test_alert_delivery import alert, encoded

AT = datetime(2026, 3, 1, 10, tzinfo=UTC)


def record(topic: str, value: bytes, offset: int) -> SimpleNamespace:
    return SimpleNamespace(topic=topic, partition=0, offset=offset, value=value, key=b"k")


def erasure(customer: str, at: datetime = AT + timedelta(days=1)) -> bytes:
    return orjson.dumps(CustomerErased(customer_key=customer, request_event_id=uuid.uuid4(), request_id="r-1",
                                       requested_by="dpo", erased_at=at, data_keys_shredded=[], aliases_unlinked=[],
                                       points_forfeited=0, alerts_closed=[]).model_dump(mode="json"))


def test_an_erased_customer_s_alerts_and_deliveries_are_deleted_and_others_stay(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    assert store._db.execute("PRAGMA secure_delete").fetchone()[0] == 1
    hook = store.create_subscription("https://example.com/hook", Filters())
    gone, kept = alert("gone"), alert("kept")
    store_batch(store, [record("crm.alerts", encoded(gone), 0), record("crm.alerts", encoded(kept), 1)])
    assert store.delivery_counts(hook.id)["pending"] == 2

    appended = store_batch(store, [record("crm.erasures", erasure("gone"), 0)])

    assert appended.erased == 1
    assert [a.customer_key for a in store.alerts_after(0)] == ["kept"]
    assert [d.customer_key for d in store.deliveries(hook.id)] == ["kept"]
    assert "gone" in store.erased_customers()
    # The same erasure again (a redelivery) changes nothing.
    store_batch(store, [record("crm.erasures", erasure("gone"), 0)])
    assert [a.customer_key for a in store.alerts_after(0)] == ["kept"]
    store.close()


def test_changes_from_before_the_erasure_arriving_after_it_are_not_logged_but_a_new_life_s_are(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    store_batch(store, [record("crm.erasures", erasure("gone"), 0)])
    old = alert("gone")                                             # occurred before the erasure
    new = alert("gone").model_copy(update={"occurred_at": AT + timedelta(days=30)})
    appended = store_batch(store, [record("crm.alerts", encoded(old), 0), record("crm.alerts", encoded(new), 1)])
    assert (appended.alerts, appended.duplicates) == (1, 1)
    assert [a.change_id for a in store.alerts_after(0)] == [str(new.change_id)]
    store.close()


def test_an_erasure_record_of_a_long_alias_key_is_still_carried_out(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    key = "loyalty_card:" + "x" * 200                              # longer than the model's customer_key
    store_batch(store, [record("crm.alerts", encoded(alert(key[:200])), 0)])
    body = orjson.loads(erasure("placeholder"))
    body["customer_key"] = key
    appended = store_batch(store, [record("crm.erasures", orjson.dumps(body), 0)])
    assert (appended.erased, appended.invalid) == (1, 0) and key in store.erased_customers()
    store.close()
