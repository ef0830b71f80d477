"""`customer_profiles`: the latest profile per customer, one row per snapshot.

ReplacingMergeTree(version): the highest version (count of changes folded) wins, so re-sent and
out-of-date snapshots are harmless. Query with FINAL, or argMax(column, version) GROUP BY customer_key."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Iterable

import orjson

MIGRATIONS = [
    (2, """
CREATE TABLE IF NOT EXISTS {db}.customer_profiles
(
    customer_key      String,
    customer_id       Nullable(String),
    version           UInt64 COMMENT 'number of events folded into this snapshot',
    first_seen        DateTime64(3, 'UTC'),
    last_seen         DateTime64(3, 'UTC'),
    purchase_count    UInt32,
    refund_count      UInt32,
    spend             Map(LowCardinality(String), Decimal(18, 2)) COMMENT 'net of refunds, per currency',
    last_purchase_at  Nullable(DateTime64(3, 'UTC')),
    channels          Array(LowCardinality(String)),
    stores            Array(String),
    source_partition  UInt16,
    source_offset     UInt64 COMMENT 'offset of the last event folded, in crm.events'
)
ENGINE = ReplacingMergeTree(version)
ORDER BY customer_key
"""),
]

COLUMNS = [
    "customer_key", "customer_id", "version", "first_seen", "last_seen", "purchase_count", "refund_count",
    "spend", "last_purchase_at", "channels", "stores", "source_partition", "source_offset", "lifecycle_stage",
    "lifecycle_since",
]


def _time(millis: int | None) -> datetime | None:
    return None if millis is None else datetime.fromtimestamp(millis / 1000, UTC)


def rows(records: Iterable[Any]) -> list[list[Any]]:
    """Rows from records of crm.customer-profiles, keeping only the newest snapshot per customer in
    the batch: the older ones would be replaced anyway."""
    newest: dict[str, tuple[dict[str, Any], int]] = {}
    for record in records:
        profile = orjson.loads(record.value)
        current = newest.get(profile["customer_key"])
        if current is None or profile["version"] > current[0]["version"]:
            newest[profile["customer_key"]] = (profile, record.partition)
    return [
        [
            p["customer_key"], p["customer_id"], p["version"], _time(p["first_seen_ms"]), _time(p["last_seen_ms"]),
            p["purchase_count"], p["refund_count"],
            {currency: Decimal(minor) / 100 for currency, minor in p["spend_minor"].items()},
            _time(p["last_purchase_ms"]), list(p["channels"]), list(p["stores"]), partition, p["last_offset"],
            p["lifecycle_stage"], _time(p["lifecycle_since_ms"]),
        ]
        for p, partition in newest.values()
    ]
