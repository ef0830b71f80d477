"""The erasure request: a `customer_erasure_requested` event (schemas/events.py) for crm.events, keyed by
the customer key. The worker's fold carries it out (shreds the data keys, records customer_erased in
crm.erasures); erasing a customer the platform never saw is allowed, and the fold records that too.

Once the request is in the log, the requester also shreds every data key the key store holds under
the customer key (`shred_keys_of`). The fold shreds the keys its accepted events name; a key made
for an event the worker then refused (the customer's first personal event dead-lettered, say) is
named by none of them, and its ciphertext would stay readable in crm.events after the erasure."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Protocol

from schemas.codec import to_json_dict
from schemas.envelope import AliasType
from schemas.events import event_model

TYPE = "customer_erasure_requested"


def erasure_event(customer_key: str, request_id: str, requested_by: str, now: datetime | None = None) -> dict[str, Any]:
    """The event as it goes to crm.events (ValueError if the customer key or request id is not valid).
    A key `alias_type:value` names the customer by that alias, as the log keys such customers."""
    now = now or datetime.now(UTC)
    body: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "type": TYPE, "schema_version": 1,
        "occurred_at": now.isoformat(), "received_at": now.isoformat(), "source": {"channel": "service"},
        "payload": {"request_id": request_id, "requested_by": requested_by},
    }
    alias, sep, value = customer_key.partition(":")
    if sep and alias in {a.value for a in AliasType} and value:
        body["identifiers"] = {alias: value}
    else:
        body["customer_id"] = customer_key
    event = event_model(TYPE).model_validate(body)  # type: ignore[union-attr]
    if event.customer_key != customer_key:
        raise ValueError(f"{customer_key!r} is not a customer key")
    return to_json_dict(event)


class KeyStoreLike(Protocol):
    def catch_up(self, timeout: float = 30.0) -> None: ...
    def key_ids_of(self, customer_key: str) -> list[str]: ...
    def shred(self, key_ids: list[str]) -> None: ...


def shred_keys_of(store: KeyStoreLike, customer_key: str) -> list[str]:
    """Tombstones for every data key `store` (privacy/keystore.py) holds under the customer key, after
    reading the key topic to its end; the ids shredded. Call it only once the erasure request was
    acknowledged: a request that failed must leave the customer's values readable."""
    store.catch_up()
    found = store.key_ids_of(customer_key)
    if found:
        store.shred(found)
    return found
