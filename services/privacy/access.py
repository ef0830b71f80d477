"""What the platform holds about one person, with personal fields opened (docs/privacy.md): the export
(everything, as one JSON document) and the support read (the current personal fields). Both read the
projections through a read-only SQL client (services/privacy/reader.py) and open sealed tokens with the
customer's data keys (privacy/keystore.py). Pure of transport: the API and the command line call them
and audit the outcome."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson

from privacy.fields import KeyUnavailable, SealError, is_sealed, personal_values, unseal_event
from schemas.events import personal_payload_fields

EXPORT_FORMAT = "crm-export/1"
PROFILE_TYPES = ("customer_registered", "profile_updated")


class Gone(Exception):
    """The customer was erased: their data keys are shredded, nothing personal can be opened."""

    def __init__(self, customer_key: str, erased_at: datetime | None = None, request_id: str | None = None):
        self.customer_key, self.erased_at, self.request_id = customer_key, erased_at, request_id
        when = f"on {erased_at.isoformat()}" if erased_at else "(its data keys are shredded)"
        super().__init__(f"customer {customer_key} was erased {when}; nothing personal remains")


class UnknownCustomer(LookupError):
    def __init__(self, customer_key: str):
        self.customer_key = customer_key
        super().__init__(f"the platform holds nothing about customer {customer_key}")


class TokenRejected(ValueError):
    """A sealed value that does not open: altered or forged, or its master key is not configured."""

    def __init__(self, event_id: str, field: str, why: str):
        self.event_id, self.field = event_id, field
        super().__init__(f"event {event_id}, field {field}: {why}")


@dataclass
class Reader:
    """One customer's rows, read through `client` (clickhouse-connect API) with `query_settings`, and
    tokens opened with `data_key(key_id)` (KeyStore.data_key). `refresh()` brings the keys up to date
    (KeyStore.catch_up) before a missing key is taken for an erasure; `live_keys(customer)`
    (KeyStore.key_ids_of) tells an erased customer from one who came back after their erasure (the
    worker starts a new life for them: their values sealed since are theirs to see)."""
    client: Any
    query_settings: dict[str, Any] | None
    data_key: Callable[[str], bytes | None]
    refresh: Callable[[], None] = lambda: None
    live_keys: Callable[[str], list[str]] = lambda customer_key: []
    # Set for a customer who came back after an erasure: values sealed under a shredded key are
    # answered as None and listed here instead of refusing the whole answer.
    after_erasure: bool = field(default=False, init=False)
    values_erased: list[dict[str, str]] = field(default_factory=list, init=False)

    def rows(self, sql: str, **parameters: Any) -> list[dict[str, Any]]:
        result = self.client.query(sql, parameters=parameters, settings=self.query_settings)
        return [dict(zip(result.column_names, row)) for row in result.result_rows]

    def has_table(self, name: str) -> bool:
        return bool(self.rows("SELECT count() AS n FROM system.tables WHERE database = currentDatabase() "
                              "AND name = {t:String}", t=name)[0]["n"])

    # --- the pieces ---

    def erasure(self, customer_key: str) -> dict[str, Any] | None:
        """The customer's row in `erasures` (fed from crm.erasures), if the table exists and has one."""
        if not self.has_table("erasures"):
            return None
        found = self.rows("SELECT * FROM erasures WHERE customer_key = {c:String}", c=customer_key)
        if not found:
            return None
        return max(found, key=lambda row: str(row.get("erased_at", "")))

    def aliases(self, customer_key: str) -> list[str]:
        """Alias keys whose profile was merged into the customer: their events held before the link."""
        return [row["customer_key"] for row in self.rows(
            "SELECT DISTINCT customer_key FROM customer_profiles FINAL WHERE merged_into = {c:String} "
            "ORDER BY customer_key", c=customer_key)]

    def events(self, customer_key: str, aliases: list[str]) -> list[dict[str, Any]]:
        """Every event row of the customer (attributed ones included), then those held under their aliases
        before the link and not attributed since: each event once."""
        rows = self.rows("SELECT * FROM events FINAL WHERE has({k:Array(String)}, customer_key) "
                         "ORDER BY occurred_at, received_at, event_id", k=[customer_key, *aliases])
        own = {str(row["event_id"]) for row in rows if row["customer_key"] == customer_key}
        return [row for row in rows if row["customer_key"] == customer_key or str(row["event_id"]) not in own]

    def open_payload(self, row: dict[str, Any]) -> Any:
        """The event's payload with its personal values opened; Gone if a key is shredded."""
        payload = orjson.loads(row["payload"]) if isinstance(row["payload"], (str, bytes)) else row["payload"]
        event_id, type_name = str(row["event_id"]), str(row["type"])
        if not isinstance(payload, dict):
            return payload
        opened = dict(payload)
        for name, value in personal_values({"type": type_name, "payload": payload}).items():
            if not is_sealed(value):
                continue
            one = {"event_id": event_id, "type": type_name, "payload": {name: value}}
            try:
                try:
                    opened[name] = unseal_event(one, self.data_key)["payload"][name]
                except KeyUnavailable:
                    self.refresh()  # a key made a moment ago reaches this process's copy within a poll
                    opened[name] = unseal_event(one, self.data_key)["payload"][name]
            except KeyUnavailable:
                if not self.after_erasure:
                    raise Gone(str(row["customer_key"])) from None
                opened[name] = None
                self.values_erased.append({"event_id": event_id, "field": f"payload.{name}"})
            except SealError as exc:
                raise TokenRejected(event_id, f"payload.{name}", str(exc)) from None
        return opened

    # --- what the endpoints answer ---

    def personal(self, customer_key: str) -> dict[str, Any]:
        """The support read: the latest value of each personal field over the customer's registration and
        profile updates (by event time), with the event each came from."""
        self._refuse_erased(customer_key)
        aliases = self.aliases(customer_key)
        events = self.rows("SELECT event_id, type, customer_key, occurred_at, payload FROM events FINAL "
                           "WHERE has({k:Array(String)}, customer_key) AND has({t:Array(String)}, type) "
                           "ORDER BY occurred_at, received_at, event_id", k=[customer_key, *aliases], t=list(PROFILE_TYPES))
        if not events and not self._known(customer_key):
            raise UnknownCustomer(customer_key)
        fields: dict[str, Any] = {}
        sources: dict[str, Any] = {}
        for row in events:
            payload = self.open_payload(row)
            for name in personal_payload_fields(str(row["type"])):
                if isinstance(payload, dict) and payload.get(name) is not None:
                    fields[name] = payload[name]
                    sources[name] = {"event_id": str(row["event_id"]), "occurred_at": jsonable(row["occurred_at"])}
        return {"customer_key": customer_key, "fields": fields, "sources": sources}

    def export(self, customer_key: str, now: datetime | None = None) -> dict[str, Any]:
        """Everything the projections hold about the customer, personal fields opened, as JSON values."""
        self._refuse_erased(customer_key)
        aliases = self.aliases(customer_key)
        keys = [customer_key, *aliases]
        profiles = self.rows("SELECT * FROM customer_profiles FINAL WHERE has({k:Array(String)}, customer_key) "
                             "ORDER BY customer_key", k=keys)
        events = self.events(customer_key, aliases)
        if not events and not profiles:
            raise UnknownCustomer(customer_key)
        opened_events = [{**row, "payload": self.open_payload(row)} for row in events]
        consents = [{"event_id": str(e["event_id"]), "occurred_at": e["occurred_at"], **e["payload"]}
                    for e in opened_events if e["type"] == "consent_changed" and isinstance(e["payload"], dict)]
        profile = next((p for p in profiles if p["customer_key"] == customer_key), None)
        document = {
            "format": EXPORT_FORMAT,
            "customer_key": customer_key,
            "exported_at": now or datetime.now(UTC),
            "aliases_merged": aliases,
            "personal": self.personal(customer_key)["fields"] if events else {},
            "profile": profile,
            "alias_profiles": [p for p in profiles if p["customer_key"] != customer_key],
            "events": opened_events,
            "points": {
                "balance": next(iter(self.rows("SELECT * FROM points_balances FINAL WHERE customer_key = {c:String}",
                                               c=customer_key)), None),
                "ledger": self.rows("SELECT * FROM points_ledger FINAL WHERE customer_key = {c:String} ORDER BY seq",
                                    c=customer_key),
                "tier_changes": self.rows("SELECT * FROM tier_changes FINAL WHERE customer_key = {c:String} "
                                          "ORDER BY version", c=customer_key),
            },
            "segment_changes": self.rows("SELECT * FROM segment_changes FINAL WHERE has({k:Array(String)}, customer_key) "
                                         "ORDER BY customer_key, seq", k=keys),
            "churn_alerts": self.rows("SELECT * FROM churn_alerts FINAL WHERE customer_key = {c:String} "
                                      "ORDER BY occurred_at, alert_id, version", c=customer_key),
            "consents": {"changes": consents,
                         "marketing_consent_now": profile.get("marketing_consent") if profile else None},
            "dead_letters": self._dead_letters(keys),
        }
        if self.after_erasure:
            document["erasures"] = self.rows("SELECT * FROM erasures WHERE customer_key = {c:String}", c=customer_key)
            document["values_erased"] = self.values_erased
        return jsonable(document)

    # --- helpers ---

    def _refuse_erased(self, customer_key: str) -> None:
        """Gone if the customer was erased and has no data key since; a customer who came back after
        their erasure is answered what they gave since (`after_erasure`)."""
        erasure = self.erasure(customer_key)
        if erasure is None:
            return
        self.refresh()
        if self.live_keys(customer_key):
            self.after_erasure = True
            return
        erased_at = erasure.get("erased_at")
        raise Gone(customer_key, erased_at if isinstance(erased_at, datetime) else None,
                   str(erasure.get("request_id") or "") or None)

    def _known(self, customer_key: str) -> bool:
        return bool(self.rows("SELECT count() AS n FROM customer_profiles FINAL WHERE customer_key = {c:String}",
                              c=customer_key)[0]["n"])

    def _dead_letters(self, keys: list[str]) -> list[dict[str, Any]]:
        """Refused records that name the customer: keyed by one of their keys, or carrying their
        customer_id. Their personal values are opened where they were sealed and their key lives."""
        letters = self.rows(
            "SELECT * FROM dead_letters FINAL WHERE has({k:Array(String)}, record_key) OR "
            "(isValidJSON(original) AND has({k:Array(String)}, JSONExtractString(original, 'customer_id'))) "
            "ORDER BY source_timestamp, source_topic, source_partition, source_offset", k=keys)
        for letter in letters:
            try:
                body = orjson.loads(letter["original"])
            except (orjson.JSONDecodeError, TypeError):
                continue
            if isinstance(body, dict) and isinstance(body.get("payload"), dict) and body.get("event_id"):
                try:
                    letter["original_opened"] = {**body, "payload": self.open_payload(
                        {"event_id": body["event_id"], "type": body.get("type"), "customer_key": keys[0],
                         "payload": body["payload"]})}
                except (Gone, TokenRejected) as exc:
                    letter["original_opened"] = {"not_opened": str(exc)}
        return letters


def jsonable(value: Any) -> Any:
    """ClickHouse values as JSON values: times in ISO 8601, decimals as strings (exact), UUIDs as text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(document: Any) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
