"""Population boundaries for value tiers and RFM scores, computed over `customer_profiles` and
appended to every partition of the events topic (schemas/boundaries.py says why the log, not a
side channel).

Method (docs/segments.md):
- as of: the latest `as_of` of any profile, an event time (the partitions' clock ticks move it, so it
  may be later than any event; a far-future event from a wrong clock moves it too: docs/segments.md);
- value tier: among customers with positive net spend over 365 days (in the rules' currency), sorted
  from the highest: `high_min` is the spend of the last customer inside the top `high_share`,
  `mid_min` that of the last inside the top `high_share + mid_share`;
- RFM: among customers who ever bought, the k-th cut (k = 1..4) of each figure is the value at rank
  ceil(k * n / 5) in ascending order: days since the last purchase (as of the as-of time), purchase
  count, lifetime net spend.
The writer runs this every CRM_BOUNDARIES_SECONDS; `crm` commands and tests may call it directly."""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client
from kafka import KafkaProducer

from schemas.boundaries import RfmCuts, SegmentBoundaries, ValueCuts
from streams import topics
from streams.segments.rules import SegmentRules

log = logging.getLogger("crm.boundaries")
DAY_MS = 86_400_000

_SQL = """
WITH
    toInt64(spend_365d[{{currency:String}}] * 100) AS spend_365d_minor,
    toInt64(spend[{{currency:String}}] * 100) AS monetary_minor,
    intDiv({{as_of_ms:Int64}} - toUnixTimestamp64Milli(last_purchase_at), {day}) AS recency_days
SELECT
    arraySort(x -> -x, groupArrayIf(spend_365d_minor, spend_365d_minor > 0)),
    arraySort(groupArrayIf(recency_days, purchase_count > 0)),
    arraySort(groupArrayIf(toInt64(purchase_count), purchase_count > 0)),
    arraySort(groupArrayIf(monetary_minor, purchase_count > 0))
FROM {db}.customer_profiles FINAL
"""


def compute(client: Client, database: str, rules: SegmentRules) -> tuple[int, str, ValueCuts | None, RfmCuts | None] | None:
    """(as-of ms, currency, value cuts, RFM cuts), or None while there are no profiles."""
    as_of_ms = client.query(f"SELECT max(toUnixTimestamp64Milli(as_of)) FROM {database}.customer_profiles").result_rows[0][0]
    if not as_of_ms:
        return None
    version = rules.at_ms(as_of_ms)
    spenders, recency, frequency, monetary = client.query(
        _SQL.format(db=database, day=DAY_MS), parameters={"currency": version.currency, "as_of_ms": as_of_ms},
    ).result_rows[0]
    value = None
    if spenders:
        high = _rank((version.value.high_share,), len(spenders))
        mid = _rank((version.value.high_share, version.value.mid_share), len(spenders))
        value = ValueCuts(high_min_minor=spenders[high - 1], mid_min_minor=spenders[mid - 1], population=len(spenders))
    rfm = None
    if frequency:
        rfm = RfmCuts(recency_days=_quintile_cuts(recency), frequency=_quintile_cuts(frequency),
                      monetary_minor=_quintile_cuts(monetary), population=len(frequency))
    return as_of_ms, version.currency, value, rfm


def publish(client: Client, database: str, rules: SegmentRules, producer: KafkaProducer,
            last_id: str | None = None) -> str | None:
    """Compute the boundaries and append them to every events partition; returns their id, or
    None when there is nothing to publish (no profiles yet, or the same boundaries as `last_id`)."""
    computed = compute(client, database, rules)
    if computed is None:
        return None
    as_of_ms, currency, value, rfm = computed
    as_of = datetime.fromtimestamp(as_of_ms / 1000, UTC)
    content = orjson.dumps([currency, value and value.model_dump(), rfm and rfm.model_dump()], option=orjson.OPT_SORT_KEYS)
    boundaries_id = f"{as_of:%Y%m%dT%H%M%S}-{hashlib.blake2b(content, digest_size=4).hexdigest()}"
    if last_id is not None and last_id.split("-")[-1] == boundaries_id.split("-")[-1]:
        return None
    for partition in range(topics.EVENT_PARTITIONS):
        record = SegmentBoundaries(event_id=uuid.uuid4(), occurred_at=as_of, partition=partition,
                                   boundaries_id=boundaries_id, currency=currency, value=value, rfm=rfm)
        producer.send(topics.EVENTS.name, key=b"boundaries", value=orjson.dumps(record.model_dump(mode="json")),
                      partition=partition)
    producer.flush()
    log.info("published segment boundaries %s (value population %s, rfm population %s)", boundaries_id,
             value.population if value else 0, rfm.population if rfm else 0)
    return boundaries_id


def _rank(shares: tuple[float, ...], n: int) -> int:
    """How many of `n` customers the top `sum(shares)` holds (at least one), in decimal so that
    0.2 + 0.1 of 10 is 3."""
    return max(1, math.ceil(sum(Decimal(str(share)) for share in shares) * n))


def _quintile_cuts(ascending: list[Any]) -> list[int]:
    n = len(ascending)
    return [int(ascending[(k * n + 4) // 5 - 1]) for k in range(1, 5)]
