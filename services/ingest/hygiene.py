"""What every event passes at the edge, before it reaches Kafka, as pure functions of the item, the
sender's key, the receipt time and the identity secret (thresholds: docs/ingestion.md):

1. it is a JSON object of at most MAX_EVENT_BYTES;
2. normalisation: currency codes upper case; an e-mail or phone in the payload, or given as
   `identifiers.email` / `identifiers.phone`, is normalised (e-mail trimmed and lower-cased, phone to
   E.164) and its keyed hash (HMAC-SHA256 under the identity secret, privacy/seal.py keyed_hash) added
   to `identifiers` as `email_hash` / `phone_hash`, so that identity links find the customer
   (docs/identity.md); a plain `identifiers.email` / `identifiers.phone` is dropped after hashing;
3. schema validation against the event catalog as producers submit it (`submitted_model`: personal
   fields plain), field by field; unknown types are refused;
4. scope: the key may send this type; a POS key only for its own store;
5. clock: `occurred_at` more than FUTURE_TOLERANCE ahead of receipt is refused; more than LATE_AFTER
   behind is accepted and marked late; more than MAX_AGE behind is refused; `received_at` is set
   to the receipt time. With `history=True` (the intake topic, whose producers may send history)
   nothing is too old, nothing is late, and a `received_at` the producer gave is kept.
Sealing the personal fields needs the key store and happens after these checks (sealing.py);
de-duplication by `event_id` needs memory across requests and lives in seen.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
import phonenumbers
from pydantic import ValidationError

from privacy.fields import PLAIN_IDENTIFIERS
from privacy.seal import keyed_hash
from schemas.codec import MAX_EVENT_BYTES, out_of_time
from schemas.envelope import Envelope
from schemas.events import EVENT_TYPES, submitted_model
from services.ingest.keys import ApiKey, SourceKind

FUTURE_TOLERANCE = timedelta(minutes=5)
LATE_AFTER = timedelta(days=7)
MAX_AGE = timedelta(days=3660)  # ten years: older is a wrong clock, not a late terminal
PERSONAL_IDENTIFIERS = (("email", "email_hash"), ("phone", "phone_hash"))
assert tuple(name for name, _ in PERSONAL_IDENTIFIERS) == PLAIN_IDENTIFIERS


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


@dataclass(frozen=True)
class Checked:
    """An item that passed every rule: the event to produce, and whether it came late."""
    event: Envelope
    late: bool


@dataclass(frozen=True)
class Refused:
    reason: str  # machine-readable, as in dead letters: schema_invalid, unknown_type, ...
    errors: list[FieldError] = field(default_factory=list)

    @property
    def detail(self) -> str:
        return "; ".join(f"{e.field}: {e.message}" for e in self.errors) or self.reason


def check(item: Any, key: ApiKey, received_at: datetime, phone_region: str, identity_secret: bytes, *,
          history: bool = False) -> Checked | Refused:
    """The event as submitted (personal fields plain, identifiers hashed), or why it is refused.
    `history`: the intake's clock rules (module docstring)."""
    if not isinstance(item, dict):
        return Refused("not_an_object", [FieldError("(event)", f"expected a JSON object, got {type(item).__name__}")])
    try:
        size = len(orjson.dumps(item))
    except orjson.JSONEncodeError:  # nested deeper than any event of the catalog can be
        return Refused("too_deep", [FieldError("(event)", "nested too deeply")])
    if size > MAX_EVENT_BYTES:
        return Refused("too_large", [FieldError("(event)", f"{size} bytes, the limit is {MAX_EVENT_BYTES}")])
    type_name = item.get("type")
    if not isinstance(type_name, str) or type_name not in EVENT_TYPES:
        return Refused("unknown_type", [FieldError("type", f"{type_name!r} is not in the event catalog")])
    if type_name not in key.event_types:
        return Refused("type_not_allowed", [FieldError("type", f"key {key.key_id} may not send {type_name}")])
    version = item.get("schema_version", 1)
    model = submitted_model(type_name, version) if type(version) is int else None
    if model is None:
        return Refused("unsupported_schema_version", [FieldError("schema_version", f"{type_name} has no version {version!r}")])

    normalised, errors = _normalise(item, key, phone_region, identity_secret)
    if errors:
        return Refused("schema_invalid", errors)
    if not (history and normalised.get("received_at") is not None):
        normalised["received_at"] = received_at.isoformat()
    try:
        event = model.model_validate(normalised)
    except ValidationError as exc:
        return Refused("schema_invalid", [
            FieldError(".".join(str(part) for part in error["loc"]) or "(event)", error["msg"])
            for error in exc.errors(include_url=False, include_input=False)])

    stores = {event.source.store_id, getattr(getattr(event, "payload", None), "store_id", None)} - {None}
    if key.source is SourceKind.POS and stores != {key.store_id}:
        return Refused("store_not_allowed", [FieldError("source.store_id", f"key {key.key_id} sends for store "
                                                                           f"{key.store_id}, not {sorted(stores)}")])
    if not history and event.occurred_at < received_at - MAX_AGE:
        return Refused("occurred_too_long_ago", [FieldError(
            "occurred_at", f"{event.occurred_at.isoformat()} is more than {MAX_AGE.days} days before receipt")])
    if event.occurred_at > received_at + FUTURE_TOLERANCE:
        return Refused("occurred_in_future", [FieldError(
            "occurred_at", f"{event.occurred_at.isoformat()} is more than {FUTURE_TOLERANCE} after receipt "
                           f"({received_at.isoformat()})")])
    beyond = out_of_time(event)  # outside what the projections store (history may reach far back)
    if beyond is not None:
        return Refused("schema_invalid", [FieldError("occurred_at", beyond.detail)])
    return Checked(event, late=not history and received_at - event.occurred_at > LATE_AFTER)


def _normalise(item: dict[str, Any], key: ApiKey, phone_region: str,
               identity_secret: bytes) -> tuple[dict[str, Any], list[FieldError]]:
    item = dict(item)
    errors: list[FieldError] = []
    payload = item.get("payload")
    source = item.get("source")
    if key.source is SourceKind.POS and isinstance(source, dict) and source.get("store_id") is None:
        # A POS key is bound to one store: an event that names none is from that store.
        item["source"] = {**source, "store_id": key.store_id}
    given = item.get("identifiers")
    if given is not None and not isinstance(given, dict):
        return item, []  # not an object: schema validation says so
    identifiers = dict(given or {})
    # A producer that knows only the customer's e-mail or phone gives it plain in `identifiers`: it
    # becomes its keyed hash here and goes no further.
    for name, hash_name in PERSONAL_IDENTIFIERS:
        if name not in identifiers:
            continue
        value = identifiers.pop(name)
        if value is None:
            continue
        normal = _normal(name, value, phone_region)
        if normal is None:
            errors.append(FieldError(f"identifiers.{name}", f"not a valid {name}"))
            continue
        identifiers.setdefault(hash_name, identity_hash(identity_secret, normal))
    if isinstance(payload, dict):
        payload = dict(payload)
        if isinstance(payload.get("currency"), str):
            payload["currency"] = payload["currency"].strip().upper()
        for name, hash_name in PERSONAL_IDENTIFIERS:
            value = payload.get(name)
            if not isinstance(value, str) or not value.strip():
                continue
            normal = _normal(name, value, phone_region)
            if normal is None:
                errors.append(FieldError(f"payload.{name}", f"not a valid {name}"))
                continue
            payload[name] = normal
            identifiers.setdefault(hash_name, identity_hash(identity_secret, normal))
        item["payload"] = payload
    if identifiers:
        item["identifiers"] = identifiers
    elif given is not None:
        item.pop("identifiers")
    return item, errors


def _normal(name: str, value: Any, phone_region: str) -> str | None:
    if not isinstance(value, str):
        return None
    return _email(value) if name == "email" else _phone(value, phone_region)


def identity_hash(identity_secret: bytes, normalised: str) -> str:
    """How a phone (E.164) or an e-mail (lower case) becomes an alias: HMAC-SHA256 under the identity
    secret, hex (privacy/seal.py keyed_hash). Unlike a plain hash, nobody without the secret can
    find the address behind it by hashing a list of addresses."""
    return keyed_hash(identity_secret, normalised)


def _email(value: str) -> str | None:
    value = value.strip().lower()
    local, _, domain = value.partition("@")
    return value if local and "." in domain and " " not in value else None


def _phone(value: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
