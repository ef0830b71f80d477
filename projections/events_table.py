"""`events`: every accepted event, typed common columns plus the payload as JSON.

ReplacingMergeTree on (customer_key, occurred_at, event_id): a record written twice (writer crash
before its offset commit, or a worker redelivery) collapses to one row. Until parts merge, exact
counts use FINAL or count(DISTINCT event_id)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Iterable
from uuid import UUID

import orjson
from clickhouse_connect.driver.client import Client

MIGRATIONS = [
    (1, """
CREATE TABLE IF NOT EXISTS {db}.events
(
    event_id          UUID,
    type              LowCardinality(String),
    schema_version    UInt16,
    customer_key      String,
    customer_id       Nullable(String),
    loyalty_card      Nullable(String),
    app_user_id       Nullable(String),
    phone_hash        Nullable(String),
    email_hash        Nullable(String),
    device_id         Nullable(String),
    occurred_at       DateTime64(3, 'UTC'),
    received_at       DateTime64(3, 'UTC'),
    channel           LowCardinality(String),
    store_id          LowCardinality(String) COMMENT 'empty when the source has no store',
    terminal_id       String,
    source_device_id  String,
    amount            Decimal(18, 2) COMMENT 'purchase total or refund amount; 0 for other types',
    currency          LowCardinality(String),
    payload           String COMMENT 'the typed payload as JSON; read with JSONExtract*',
    source_partition  UInt16,
    source_offset     UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (customer_key, occurred_at, event_id)
"""),
    (13, """
ALTER TABLE {db}.events
    ADD COLUMN IF NOT EXISTS attributed_from String DEFAULT '' COMMENT 'the alias key, when the event came with only an alias and was attributed to customer_key (docs/identity.md)'
"""),
]

COLUMNS = [
    "event_id", "type", "schema_version", "customer_key", "customer_id", "loyalty_card", "app_user_id",
    "phone_hash", "email_hash", "device_id", "occurred_at", "received_at", "channel", "store_id",
    "terminal_id", "source_device_id", "amount", "currency", "payload", "source_partition", "source_offset",
    "attributed_from",
]


def rows(records: Iterable[Any]) -> list[list[Any]]:
    """Rows from records of crm.events.accepted (see streams.records.accepted_value)."""
    out = []
    for record in records:
        data = orjson.loads(record.value)
        event, payload = data["event"], data["event"].get("payload", {})
        identifiers, source = event.get("identifiers", {}), event["source"]
        out.append([
            UUID(event["event_id"]), event["type"], event["schema_version"], data["customer_key"],
            event.get("customer_id"), identifiers.get("loyalty_card"), identifiers.get("app_user_id"),
            identifiers.get("phone_hash"), identifiers.get("email_hash"), identifiers.get("device_id"),
            datetime.fromisoformat(event["occurred_at"]), datetime.fromisoformat(event["received_at"]),
            source["channel"], source.get("store_id") or "", source.get("terminal_id") or "",
            source.get("device_id") or "", Decimal(data["amount"]), data["currency"], orjson.dumps(payload).decode(),
            data["partition"], data["offset"], data.get("attributed_from", ""),
        ])
    return out


# An event that claims to happen after it reached the platform says nothing about how far the history
# has come: a producer's wrong clock (the catalog takes times up to 2199 from direct producers) would
# otherwise put every customer outside every trailing window. The ingestion API's own tolerance.
CLOCK_SKEW_SQL = "occurred_at <= received_at + INTERVAL 5 MINUTE"


def latest_event_ms(client: Client, database: str) -> int | None:
    """The event time the history reaches: the latest `occurred_at` in `events` of an event that did
    not claim to happen after it was received, or None when there is none."""
    latest = client.query(f"SELECT max(toUnixTimestamp64Milli(occurred_at)) FROM {database}.events "
                          f"WHERE {CLOCK_SKEW_SQL}").result_rows[0][0]
    return int(latest) if latest else None
