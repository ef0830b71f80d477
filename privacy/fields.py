"""Which values of an event are personal, and turning them into sealed tokens and back. Pure: the
caller brings the data key (privacy/keystore.py). Events are handled as JSON dicts, the form in which
they travel, after the submitted model validated them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from privacy.seal import SealError, seal, token_key_id, unseal
from schemas.envelope import SEALED_PREFIX
from schemas.events import personal_payload_fields

REDACTED = "[redacted]"
# Plain identifiers a producer may give at an edge instead of their keyed hashes; the edge hashes them
# (privacy/seal.py keyed_hash) and never passes them on.
PLAIN_IDENTIFIERS = ("email", "phone")


class KeyUnavailable(SealError):
    """The data key a token was sealed under is gone (the customer was erased) or unknown."""


def context(event_id: str, field: str) -> str:
    return f"{event_id}/payload.{field}"


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def personal_values(event: dict[str, Any]) -> dict[str, Any]:
    """The personal payload fields the event carries (name -> value as it stands, plain or sealed)."""
    payload = event.get("payload")
    if not isinstance(payload, dict):
        return {}
    return {name: payload[name] for name in personal_payload_fields(str(event.get("type")))
            if payload.get(name) is not None}


def unsealed_fields(event: dict[str, Any]) -> list[str]:
    """Personal fields that hold a plain value: such an event must not enter the log as it is."""
    return [f"payload.{name}" for name, value in personal_values(event).items() if not is_sealed(value)]


def seal_event(event: dict[str, Any], key_id: str, data_key: bytes) -> dict[str, Any]:
    """The log form of a submitted event: every personal payload value sealed under the customer's
    data key, and `birth_month` taken from the birthday before it is sealed. Idempotent: a sealed
    value stays as it is, and sealing the same event twice gives the same tokens."""
    values = personal_values(event)
    if not values:
        return event
    payload = dict(event["payload"])
    birthday = payload.get("birthday")
    if isinstance(birthday, str) and not is_sealed(birthday):
        payload["birth_month"] = int(birthday[5:7])  # ISO date, as the submitted model wrote it
    cipher = AESGCMSIV(data_key)
    for name, value in values.items():
        if not is_sealed(value):
            payload[name] = seal(data_key, key_id, context(str(event["event_id"]), name), orjson.dumps(value), cipher)
    return {**event, "payload": payload}


def key_ids(event: dict[str, Any]) -> set[str]:
    """The data keys an event's sealed values were sealed under."""
    return {token_key_id(value) for value in personal_values(event).values() if is_sealed(value)}


def unseal_event(event: dict[str, Any], data_key: Callable[[str], bytes | None]) -> dict[str, Any]:
    """The event with its personal values opened. `data_key(key_id)` gives a key or None when it is
    gone; KeyUnavailable then, SealError for a token that was altered or forged."""
    values = personal_values(event)
    if not values:
        return event
    payload = dict(event["payload"])
    for name, value in values.items():
        if not is_sealed(value):
            continue
        key = data_key(token_key_id(value))
        if key is None:
            raise KeyUnavailable(f"payload.{name}: the data key {token_key_id(value)} is gone (erased) or unknown")
        payload[name] = orjson.loads(unseal(key, value, context(str(event["event_id"]), name)))
    return {**event, "payload": payload}


def redact(item: Any) -> Any:
    """A record with every plain personal value replaced by REDACTED: what a dead letter may keep of a
    record whose personal data must not be kept. Anything that is not an event object is returned as is."""
    if not isinstance(item, dict):
        return item
    item = dict(item)
    payload = item.get("payload")
    if isinstance(payload, dict):
        names = personal_payload_fields(str(item.get("type"))) or ("name", "email", "phone", "birthday", "address")
        item["payload"] = {name: REDACTED if name in names and value is not None and not is_sealed(value) else value
                           for name, value in payload.items()}
    identifiers = item.get("identifiers")
    if isinstance(identifiers, dict):
        item["identifiers"] = {name: REDACTED if name in PLAIN_IDENTIFIERS else value
                               for name, value in identifiers.items()}
    return item
