"""`segment_changes`, from crm.segment-changes: every entry of a customer into a segment, with the
segment left, the exact event time, and what caused it (an event, or time passing). Keyed
(customer_key, seq): `seq` numbers a customer's changes 0, 1, 2… so a re-sent change replaces itself
(ReplacingMergeTree) and a gap would show a lost one. The current segment per customer is in
`customer_profiles` (lifecycle_stage); this table answers who moved where, and when."""

from __future__ import annotations

from datetime import UTC, datetime
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
]

COLUMNS = ["customer_key", "seq", "dimension", "from_segment", "to_segment", "occurred_at", "cause_event_id",
           "cause_type", "rules_version"]


def rows(records: Iterable[Any]) -> list[list[Any]]:
    out = []
    for record in records:
        change = orjson.loads(record.value)
        out.append([datetime.fromtimestamp(change["occurred_ms"] / 1000, UTC) if name == "occurred_at" else change[name]
                    for name in COLUMNS])
    return out
