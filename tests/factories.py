"""Valid catalog events as dictionaries, for tests that need one quickly and want to vary a field.

`event` gives the form in which events lie in `crm.events`: personal payload values sealed
(privacy/fields.py seal_event) under a fixed test data key per customer (`test_key`), so that the
folds see what the log holds. `submitted` gives the form a producer submits, personal values plain:
the worker refuses it (`personal_data_in_clear`)."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import orjson

from privacy.fields import seal_event

TEST_KEY_SECRET = b"crm-tests"


def test_key(customer_key: str) -> tuple[str, bytes]:
    """The fixed test data key of a customer: (key id, key). Never for a real stack."""
    key_id = hashlib.sha256(TEST_KEY_SECRET + b"|id|" + customer_key.encode()).hexdigest()[:32]
    return key_id, hashlib.sha256(TEST_KEY_SECRET + b"|key|" + customer_key.encode()).digest()


test_key.__test__ = False  # type: ignore[attr-defined]  # not a test for pytest to collect


def sealed(body: dict[str, Any], key: tuple[str, bytes] | None = None) -> dict[str, Any]:
    """`body` in its log form: personal values sealed under `key` (default: the customer's test key)."""
    if key is None:
        customer = body.get("customer_id") or next(
            (f"{name}:{value}" for name, value in (body.get("identifiers") or {}).items() if value), "anonymous")
        key = test_key(str(customer))
    return seal_event(body, *key)


def event(type_: str = "purchase_completed", customer_id: str = "cust-1", **overrides: Any) -> dict[str, Any]:
    """A valid event as it lies in the log (personal values sealed)."""
    return sealed(submitted(type_, customer_id, **overrides))


def submitted(type_: str = "purchase_completed", customer_id: str = "cust-1", **overrides: Any) -> dict[str, Any]:
    """A valid event as a producer submits it to an edge that seals it (personal values plain)."""
    payloads: dict[str, dict[str, Any]] = {
        "purchase_completed": {"order_id": f"ord-{uuid.uuid4().hex[:8]}", "currency": "EUR",
                               "lines": [{"sku": "gro-0001", "category": "grocery", "quantity": 2,
                                          "unit_price": "3.50"}]},
        "purchase_refunded": {"refund_id": "ref-1", "order_id": "ord-1", "currency": "EUR", "amount": "2.00"},
        "product_viewed": {"sku": "ele-0001", "category": "electronics"},
        "daily_sign_in": {},
        "survey_answered": {"survey_id": "s", "kind": "nps", "score": 9},
        "customer_registered": {"name": "Ada", "email": "ada@example.com"},
    }
    channel = "pos" if type_.startswith("purchase") else "app"
    body: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "type": type_, "schema_version": 1, "customer_id": customer_id,
        "occurred_at": "2026-03-01T10:00:00+00:00",
        "source": {"channel": channel, **({"store_id": "store-1", "terminal_id": "t-1"} if channel == "pos" else {})},
        "payload": payloads.get(type_, {}),
    }
    body.update(overrides)
    return body


def encoded(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)
