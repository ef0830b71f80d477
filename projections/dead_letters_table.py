"""`dead_letters`: every record the worker refused, with the reason and the original bytes, so that
analysts and operators can count and inspect them with SQL. Keyed by source position: the same
record refused twice (redelivery) is one row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Iterable

MIGRATIONS = [
    (3, """
CREATE TABLE IF NOT EXISTS {db}.dead_letters
(
    reason            LowCardinality(String),
    detail            String,
    source_topic      LowCardinality(String),
    source_partition  UInt16,
    source_offset     UInt64,
    source_timestamp  DateTime64(3, 'UTC'),
    record_key        String,
    original          String COMMENT 'the refused record value, byte for byte',
    dlq_partition     UInt16,
    dlq_offset        UInt64
)
ENGINE = ReplacingMergeTree
ORDER BY (source_topic, source_partition, source_offset)
"""),
]

COLUMNS = [
    "reason", "detail", "source_topic", "source_partition", "source_offset", "source_timestamp",
    "record_key", "original", "dlq_partition", "dlq_offset",
]


# DateTime64(3)'s range, in epoch milliseconds. A producer stamps its records with any time it
# likes and Kafka keeps it; a refused record's timestamp outside is stored as the nearest end
# (the headers on the dead-letter topic keep the figure).
_TIMESTAMP_RANGE_MS = (-2_208_988_800_000, 10_413_791_999_999)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rows(records: Iterable[Any]) -> list[list[Any]]:
    out = []
    for record in records:
        headers = {name: value.decode(errors="replace") for name, value in record.headers or []}
        out.append([
            headers.get("crm.dlq.reason", "unknown"), headers.get("crm.dlq.detail", ""),
            headers.get("crm.dlq.source.topic", ""), int(headers.get("crm.dlq.source.partition", 0)),
            int(headers.get("crm.dlq.source.offset", 0)),
            _source_time(int(headers.get("crm.dlq.source.timestamp", 0))),
            (record.key or b""), record.value or b"", record.partition, record.offset,
        ])
    return out


def _source_time(millis: int) -> datetime:
    low, high = _TIMESTAMP_RANGE_MS
    return _EPOCH + timedelta(milliseconds=min(max(millis, low), high))
