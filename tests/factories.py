"""Valid catalog events as dictionaries, for tests that need one quickly and want to vary a field."""

from __future__ import annotations

import uuid
from typing import Any

import orjson


def event(type_: str = "purchase_completed", customer_id: str = "cust-1", **overrides: Any) -> dict[str, Any]:
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
