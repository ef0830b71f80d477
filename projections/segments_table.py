"""From crm.segment-changes, two tables:

`segment_changes`: every entry of a customer into a segment, with the segment left, the exact event
time, and what caused it (an event, time passing, or new boundaries). Keyed (customer_key, seq): `seq`
numbers a customer's changes 0, 1, 2… so a re-sent change replaces itself (ReplacingMergeTree) and a
gap would show a lost one. The current segments per customer are in `customer_profiles`; this table
answers who moved where, and when.

`segment_boundaries`: every set of population boundaries that value tiers and RFM scores were cut by
(schemas/boundaries.py), keyed by its id (each partition sends the same row)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Iterable

import orjson

MIGRATIONS = [
    (7, """
CREATE TABLE IF NOT EXISTS {db}.segment_changes
(
    customer_key    String,
    seq             UInt64 COMMENT 'the customer''s change number, from 0 without gaps',
    dimension       LowCardinality(String) COMMENT 'lifecycle',
    from_segment    LowCardinality(String) COMMENT 'empty on the first entry',
    to_segment      LowCardinality(String),
    occurred_at     DateTime64(3, 'UTC') COMMENT 'event time of the change; a boundary time when time caused it',
    cause_event_id  String COMMENT 'empty when time caused it',
    cause_type      LowCardinality(String) COMMENT 'event or time',
    rules_version   LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_key, seq)
"""),
    (11, """
ALTER TABLE {db}.segment_changes
    COMMENT COLUMN dimension 'lifecycle, value_tier, rfm, or tag:<name>',
    COMMENT COLUMN cause_event_id 'the event, or the boundaries id; empty when time caused it',
    COMMENT COLUMN cause_type 'event, time or boundaries'
"""),
    (12, """
CREATE TABLE IF NOT EXISTS {db}.segment_boundaries
(
    boundaries_id       String,
    as_of               DateTime64(3, 'UTC') COMMENT 'event time the population figures are as of',
    currency            LowCardinality(String),
    value_population    UInt64 COMMENT 'customers with net spend in the 365 days before as_of',
    value_high_min      Nullable(Decimal(18, 2)) COMMENT 'spend_365d at or above this is high',
    value_mid_min       Nullable(Decimal(18, 2)) COMMENT 'spend_365d at or above this (and below high) is mid',
    rfm_population      UInt64 COMMENT 'customers who ever bought',
    recency_days_cuts   Array(UInt32) COMMENT '20/40/60/80th percentiles of days since the last purchase',
    frequency_cuts      Array(UInt32) COMMENT 'the same for purchase_count',
    monetary_cuts       Array(Decimal(18, 2)) COMMENT 'the same for lifetime net spend'
)
ENGINE = ReplacingMergeTree
ORDER BY boundaries_id
"""),
]

COLUMNS = ["customer_key", "seq", "dimension", "from_segment", "to_segment", "occurred_at", "cause_event_id",
           "cause_type", "rules_version"]
BOUNDARIES_COLUMNS = ["boundaries_id", "as_of", "currency", "value_population", "value_high_min", "value_mid_min",
                      "rfm_population", "recency_days_cuts", "frequency_cuts", "monetary_cuts"]


def rows(records: Iterable[Any]) -> dict[str, list[list[Any]]]:
    changes, boundaries = [], []
    for record in records:
        data = orjson.loads(record.value)
        if data["entry"] == "boundaries":
            boundaries.append(_boundaries_row(data))
        else:
            changes.append([datetime.fromtimestamp(data["occurred_ms"] / 1000, UTC) if name == "occurred_at" else data[name]
                            for name in COLUMNS])
    return {"segment_changes": changes, "segment_boundaries": boundaries}


def _boundaries_row(data: dict[str, Any]) -> list[Any]:
    value, rfm = data.get("value") or {}, data.get("rfm") or {}
    return [
        data["boundaries_id"], datetime.fromisoformat(data["occurred_at"]), data["currency"],
        value.get("population", 0), _major(value.get("high_min_minor")), _major(value.get("mid_min_minor")),
        rfm.get("population", 0), rfm.get("recency_days", []), rfm.get("frequency", []),
        [_major(cut) for cut in rfm.get("monetary_minor", [])],
    ]


def _major(minor: int | None) -> Decimal | None:
    return None if minor is None else Decimal(minor) / 100
