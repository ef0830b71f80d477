"""`erasures`: one row per erasure the worker carried out (schemas/privacy.py CustomerErased, topic
crm.erasures), with what it did: the data keys shredded, the aliases unlinked, the points forfeited,
the alerts closed. No personal value is in it. Keyed by the request event, so a record sent again
(a redelivered request, a writer crash, a replay) is one row (ReplacingMergeTree). The worker's fold
writes the records, so a rebuild from crm.events writes them again alike (docs/privacy.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Iterable
from uuid import UUID

import orjson

MIGRATIONS = [
    (19, """
CREATE TABLE IF NOT EXISTS {db}.erasures
(
    customer_key        String,
    request_event_id    UUID COMMENT 'event_id of the customer_erasure_requested event',
    request_id          String,
    requested_by        String,
    erased_at           DateTime64(3, 'UTC') COMMENT 'event time of the request: when the erasure took effect',
    data_keys_shredded  Array(String) COMMENT 'ids of the data keys tombstoned in crm.customer-keys',
    aliases_unlinked    Array(String) COMMENT 'alias keys (type:value) no longer attributed to the customer',
    points_forfeited    Int64 COMMENT 'points (available and pending) written off',
    alerts_closed       Array(String) COMMENT 'ids of the open alerts closed with status erased'
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_key, request_event_id)
"""),
]

COLUMNS = [
    "customer_key", "request_event_id", "request_id", "requested_by", "erased_at", "data_keys_shredded",
    "aliases_unlinked", "points_forfeited", "alerts_closed",
]


def rows(records: Iterable[Any]) -> list[list[Any]]:
    """Rows from records of crm.erasures; anything that is not a customer_erased object is skipped."""
    out = []
    for record in records:
        if record.value is None:
            continue
        try:
            data = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(data, dict) or data.get("type") != "customer_erased":
            continue
        out.append([
            data["customer_key"], UUID(data["request_event_id"]), data["request_id"], data["requested_by"],
            datetime.fromisoformat(data["erased_at"]).astimezone(UTC), list(data["data_keys_shredded"]),
            list(data["aliases_unlinked"]), int(data["points_forfeited"]), list(data["alerts_closed"]),
        ])
    return out
