"""The loyalty projections, from crm.points-ledger and crm.points-balances:

- `points_ledger`: every movement, one row each, keyed (customer_key, seq). A re-sent movement is
  the same row again, collapsed by ReplacingMergeTree; `seq` numbers a member's movements 0, 1, 2…
  so a gap would show a lost one. Zero-delta rows record refusals and unmatched refunds.
- `tier_changes`: every tier change, keyed (customer_key, version).
- `points_balances`: the latest balance per member, ReplacingMergeTree(version).
A balance equals the sum of its movements: available = sum(available_delta), and so on.
Query the replacing tables with FINAL (or argMax by version) for exact figures; docs/loyalty.md."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Iterable

import orjson

MIGRATIONS = [
    (4, """
CREATE TABLE IF NOT EXISTS {db}.points_ledger
(
    customer_key     String,
    seq              UInt64 COMMENT 'the member''s movement number, from 0 without gaps',
    kind             LowCardinality(String) COMMENT 'earned_pending, made_available, earned bonus kinds, redeemed, expired, cancelled, clawed_back, debt_settled, adjusted, *_refused, refund_unmatched',
    occurred_at      DateTime64(3, 'UTC') COMMENT 'event time of the movement',
    available_delta  Int64,
    pending_delta    Int64,
    debt_delta       Int64,
    available_after  Int64,
    pending_after    Int64,
    debt_after       Int64,
    cause_event_id   String COMMENT 'event that caused it; empty when time caused it (cause_type = time)',
    cause_type       LowCardinality(String),
    rules_version    LowCardinality(String),
    lot_id           String,
    store_id         LowCardinality(String),
    channel          LowCardinality(String),
    reason           String,
    operator         String,
    reference        String COMMENT 'order, reward or adjustment id'
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_key, seq)
"""),
    (5, """
CREATE TABLE IF NOT EXISTS {db}.tier_changes
(
    customer_key   String,
    version        UInt64,
    occurred_at    DateTime64(3, 'UTC'),
    from_tier      LowCardinality(String),
    to_tier        LowCardinality(String),
    direction      LowCardinality(String),
    qualifying     Int64,
    cause          LowCardinality(String) COMMENT 'qualified (upgrade at once) or review (periodic downgrade)',
    rules_version  LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_key, version)
"""),
    (6, """
CREATE TABLE IF NOT EXISTS {db}.points_balances
(
    customer_key        String,
    version             UInt64,
    as_of               DateTime64(3, 'UTC'),
    available           Int64,
    pending             Int64,
    debt                Int64,
    earned              Int64,
    redeemed            Int64,
    expired             Int64,
    reversed            Int64 COMMENT 'cancelled while pending plus clawed back',
    adjusted            Int64,
    expiring_soon       Int64 COMMENT 'available points expiring within expiring_soon_days of as_of',
    expiring_soon_days  UInt16,
    next_expiry_at      Nullable(DateTime64(3, 'UTC')),
    tier                LowCardinality(String),
    tier_since          DateTime64(3, 'UTC'),
    qualifying          Int64,
    tier_review_at      Nullable(DateTime64(3, 'UTC')) COMMENT 'next review at which the tier drops without new activity',
    tier_after_review   Nullable(String),
    rules_version       LowCardinality(String),
    point_value         Decimal(18, 6),
    point_value_currency LowCardinality(String)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY customer_key
"""),
]

LEDGER_COLUMNS = [
    "customer_key", "seq", "kind", "occurred_at", "available_delta", "pending_delta", "debt_delta",
    "available_after", "pending_after", "debt_after", "cause_event_id", "cause_type", "rules_version",
    "lot_id", "store_id", "channel", "reason", "operator", "reference",
]
TIER_COLUMNS = [
    "customer_key", "version", "occurred_at", "from_tier", "to_tier", "direction", "qualifying", "cause",
    "rules_version",
]
BALANCE_COLUMNS = [
    "customer_key", "version", "as_of", "available", "pending", "debt", "earned", "redeemed", "expired",
    "reversed", "adjusted", "expiring_soon", "expiring_soon_days", "next_expiry_at", "tier", "tier_since",
    "qualifying", "tier_review_at", "tier_after_review", "rules_version", "point_value", "point_value_currency",
]


def _time(millis: int | None) -> datetime | None:
    return None if millis is None else datetime.fromtimestamp(millis / 1000, UTC)


def ledger_rows(records: Iterable[Any]) -> dict[str, list[list[Any]]]:
    """Rows for points_ledger and tier_changes from records of crm.points-ledger."""
    tables: dict[str, list[list[Any]]] = defaultdict(list)
    for record in records:
        entry = orjson.loads(record.value)
        table, columns = (("points_ledger", LEDGER_COLUMNS) if entry["entry"] == "movement"
                          else ("tier_changes", TIER_COLUMNS))
        tables[table].append([_time(entry["occurred_ms"]) if name == "occurred_at" else entry[name]
                              for name in columns])
    return tables


def balance_rows(records: Iterable[Any]) -> dict[str, list[list[Any]]]:
    """Rows for points_balances, the newest per member in the batch (older ones would be replaced)."""
    newest: dict[str, dict[str, Any]] = {}
    for record in records:
        balance = orjson.loads(record.value)
        current = newest.get(balance["customer_key"])
        if current is None or balance["version"] > current["version"]:
            newest[balance["customer_key"]] = balance
    times = {"as_of": "as_of_ms", "next_expiry_at": "next_expiry_ms", "tier_since": "tier_since_ms",
             "tier_review_at": "tier_review_ms"}
    rows = []
    for balance in newest.values():
        row = []
        for name in BALANCE_COLUMNS:
            if name in times:
                row.append(_time(balance[times[name]]))
            elif name == "point_value":
                row.append(Decimal(balance[name]))
            else:
                row.append(balance[name])
        rows.append(row)
    return {"points_balances": rows}
