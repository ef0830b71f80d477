"""`customer_profiles`: the latest profile per customer, one row per snapshot.

ReplacingMergeTree(version): the highest version (count of changes folded) wins, so re-sent and
out-of-date snapshots are harmless. Query with FINAL, or argMax(column, version) GROUP BY customer_key.
What each column means, and how it is computed: docs/profiles.md."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Callable, Iterable

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
    (8, """
ALTER TABLE {db}.customer_profiles
    ADD COLUMN IF NOT EXISTS lifecycle_stage LowCardinality(String) DEFAULT '' COMMENT 'new, active, dormant or lost',
    ADD COLUMN IF NOT EXISTS lifecycle_since Nullable(DateTime64(3, 'UTC'))
"""),
    (9, """
ALTER TABLE {db}.customer_profiles
    ADD COLUMN IF NOT EXISTS as_of DateTime64(3, 'UTC') COMMENT 'event time the trailing figures and the stage are as of',
    ADD COLUMN IF NOT EXISTS aliases Array(String) COMMENT 'type:value: loyalty_card, app_user_id, phone_hash, email_hash, device_id',
    ADD COLUMN IF NOT EXISTS contact Array(LowCardinality(String)) COMMENT 'contact fields given: email, phone, address, birthday',
    ADD COLUMN IF NOT EXISTS marketing_consent Array(LowCardinality(String)) COMMENT 'channels with marketing consent granted now',
    ADD COLUMN IF NOT EXISTS refunded Map(LowCardinality(String), Decimal(18, 2)),
    ADD COLUMN IF NOT EXISTS average_order_value Map(LowCardinality(String), Decimal(18, 2)) COMMENT 'order totals before refunds / orders',
    ADD COLUMN IF NOT EXISTS spend_30d Map(LowCardinality(String), Decimal(18, 2)) COMMENT 'net: purchases minus refunds dated in the window',
    ADD COLUMN IF NOT EXISTS spend_90d Map(LowCardinality(String), Decimal(18, 2)),
    ADD COLUMN IF NOT EXISTS spend_365d Map(LowCardinality(String), Decimal(18, 2)),
    ADD COLUMN IF NOT EXISTS favourite_categories Array(String) COMMENT 'top 3 by units bought, ties by name',
    ADD COLUMN IF NOT EXISTS favourite_store String COMMENT 'most purchases, ties by name',
    ADD COLUMN IF NOT EXISTS favourite_channel LowCardinality(String) COMMENT 'most events, ties by name',
    ADD COLUMN IF NOT EXISTS session_count UInt32,
    ADD COLUMN IF NOT EXISTS sign_in_count UInt32,
    ADD COLUMN IF NOT EXISTS sessions_30d UInt32,
    ADD COLUMN IF NOT EXISTS sign_ins_30d UInt32,
    ADD COLUMN IF NOT EXISTS nps_latest Nullable(UInt8),
    ADD COLUMN IF NOT EXISTS nps_trend Nullable(Int8) COMMENT 'latest minus the one before',
    ADD COLUMN IF NOT EXISTS csat_latest Nullable(UInt8),
    ADD COLUMN IF NOT EXISTS csat_trend Nullable(Int8),
    ADD COLUMN IF NOT EXISTS complaint_count UInt32,
    ADD COLUMN IF NOT EXISTS open_complaints UInt32,
    ADD COLUMN IF NOT EXISTS points_available Int64,
    ADD COLUMN IF NOT EXISTS points_pending Int64,
    ADD COLUMN IF NOT EXISTS tier LowCardinality(String)
"""),
    (10, """
ALTER TABLE {db}.customer_profiles
    ADD COLUMN IF NOT EXISTS weekend_purchases UInt32 COMMENT 'purchases on a Saturday or Sunday in the segment rules timezone',
    ADD COLUMN IF NOT EXISTS complaints_30d UInt32,
    ADD COLUMN IF NOT EXISTS value_tier LowCardinality(String) COMMENT 'high, mid or low; empty until boundaries are published',
    ADD COLUMN IF NOT EXISTS rfm_recency UInt8 COMMENT '1-5; 0 until scored (no purchase, or no boundaries yet)',
    ADD COLUMN IF NOT EXISTS rfm_frequency UInt8,
    ADD COLUMN IF NOT EXISTS rfm_monetary UInt8,
    ADD COLUMN IF NOT EXISTS rfm_segment LowCardinality(String),
    ADD COLUMN IF NOT EXISTS tags Array(LowCardinality(String)),
    ADD COLUMN IF NOT EXISTS boundaries_id String COMMENT 'the segment_boundaries row value tier and RFM were scored with'
"""),
    (14, """
ALTER TABLE {db}.customer_profiles
    ADD COLUMN IF NOT EXISTS merged_into String DEFAULT '' COMMENT 'for a profile kept under an alias: the customer it was linked to (docs/identity.md)'
"""),
    (17, """
ALTER TABLE {db}.customer_profiles
    ADD COLUMN IF NOT EXISTS churn_p_alive Nullable(Float64) COMMENT 'BG/NBD probability the customer is still active, as of as_of; NULL without a model',
    ADD COLUMN IF NOT EXISTS churn_expected_90d Nullable(Float64) COMMENT 'BG/NBD expected purchases in the 90 days after as_of',
    ADD COLUMN IF NOT EXISTS churn_model_id String DEFAULT '' COMMENT 'the churn_models row the score comes from; empty when none',
    ADD COLUMN IF NOT EXISTS open_alerts Array(LowCardinality(String)) COMMENT 'alert types with an open alert (churn_alerts)'
"""),
    (18, """
ALTER TABLE {db}.customer_profiles
    ADD COLUMN IF NOT EXISTS erased_at Nullable(DateTime64(3, 'UTC')) COMMENT 'when the customer was erased (docs/privacy.md): personal traces wiped; NULL otherwise'
"""),
]


def _time(millis: int | None) -> datetime | None:
    return None if millis is None else datetime.fromtimestamp(millis / 1000, UTC)


def _money(minor: dict[str, int]) -> dict[str, Decimal]:
    return {currency: Decimal(amount) / 100 for currency, amount in minor.items()}


def _same(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda record: record[name]


# Column -> how it is read from a record of crm.customer-profiles (`CustomerProfile.to_record`).
_READERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "customer_key": _same("customer_key"),
    "customer_id": _same("customer_id"),
    "version": _same("version"),
    "as_of": lambda r: _time(r["as_of_ms"]),
    "first_seen": lambda r: _time(r["first_seen_ms"]),
    "last_seen": lambda r: _time(r["last_seen_ms"]),
    **{name: _same(name) for name in ("aliases", "contact", "marketing_consent", "purchase_count", "refund_count")},
    "spend": lambda r: _money(r["spend_minor"]),
    "refunded": lambda r: _money(r["refunded_minor"]),
    "average_order_value": lambda r: _money(r["average_order_minor"]),
    **{f"spend_{days}d": (lambda days: lambda r: _money(r[f"spend_{days}d_minor"]))(days) for days in (30, 90, 365)},
    "last_purchase_at": lambda r: _time(r["last_purchase_ms"]),
    **{name: _same(name) for name in (
        "favourite_categories", "favourite_store", "favourite_channel", "channels", "stores", "session_count",
        "sign_in_count", "sessions_30d", "sign_ins_30d", "nps_latest", "nps_trend", "csat_latest", "csat_trend",
        "complaint_count", "open_complaints", "points_available", "points_pending", "tier", "lifecycle_stage",
        "weekend_purchases", "complaints_30d", "value_tier", "rfm_recency", "rfm_frequency", "rfm_monetary",
        "rfm_segment", "tags", "boundaries_id", "merged_into")},
    "lifecycle_since": lambda r: _time(r["lifecycle_since_ms"]),
    "source_offset": _same("last_offset"),
    # Churn scoring and alerts (migration 17): snapshots written before them load with the defaults.
    "churn_p_alive": lambda r: r.get("churn_p_alive"),
    "churn_expected_90d": lambda r: r.get("churn_expected_90d"),
    "churn_model_id": lambda r: r.get("churn_model_id") or "",
    "open_alerts": lambda r: list(r.get("open_alerts") or []),
    # Erasure (migration 18): snapshots written before it load as not erased.
    "erased_at": lambda r: _time(r.get("erased_at_ms")),
}
COLUMNS = [*_READERS, "source_partition"]


def rows(records: Iterable[Any]) -> list[list[Any]]:
    """Rows from records of crm.customer-profiles, keeping only the newest snapshot per customer in
    the batch: the older ones would be replaced anyway."""
    newest: dict[str, tuple[dict[str, Any], int]] = {}
    for record in records:
        profile = orjson.loads(record.value)
        current = newest.get(profile["customer_key"])
        if current is None or profile["version"] > current[0]["version"]:
            newest[profile["customer_key"]] = (profile, record.partition)
    return [[read(profile) for read in _READERS.values()] + [partition] for profile, partition in newest.values()]
