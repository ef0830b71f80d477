"""Curated views for analysts: plain views, computed at query time from the base tables.

Plain views rather than materialized views: they hold no data, so they can never fall behind or
double count, and they keep working when a rebuild swaps a base table for a new one
(EXCHANGE TABLES): a view names its tables and reads whichever table has that name now.
What each column means, and how to query them: docs/dictionary.md; examples: docs/cookbook.md.

Conventions shared by the views:
- Days are calendar days in UTC (`toDate(occurred_at)` of a DateTime64(3, 'UTC') column).
- An event kept under an alias and also attributed to a customer (the customer's row names the
  alias in `attributed_from`, docs/identity.md) counts once, under the customer: the alias's row is
  left out. An alias event that no customer took (never linked, or refused after an erasure
  unlinked the alias: `alias_unlinked`) counts under the alias. Segment sizes, kept per customer,
  leave out profiles kept under a linked alias (`customer_profiles.merged_into`).
- Money is a Map(currency, amount), like the money columns of `customer_profiles`:
  `revenue['EUR']`.
- `GLOBAL NOT IN` on the alias filter: on one node it is a plain `NOT IN`; on a cluster
  (projections/cluster.py) it keeps the subquery on the Distributed table legal.
- Alerts (`alert_funnel`) are counted per alert, from its latest change (the highest `version`),
  and by the day it was opened: a re-sent change is collapsed by FINAL, a later change moves the
  alert along the funnel without moving it to another day."""

from __future__ import annotations

_MERGED_ALIASES = "(SELECT customer_key FROM {db}.customer_profiles FINAL WHERE merged_into != '')"
_ATTRIBUTED = "(SELECT attributed_from, event_id FROM {db}.events FINAL WHERE attributed_from != '')"

DAILY_STORE_CHANNEL = f"""
CREATE OR REPLACE VIEW {{db}}.daily_store_channel AS
WITH
    first_purchases AS (
        SELECT customer_key, argMin((toDate(occurred_at), store_id, channel), (occurred_at, event_id)) AS first
        FROM {{db}}.events FINAL
        WHERE type = 'purchase_completed' AND (customer_key, event_id) GLOBAL NOT IN {_ATTRIBUTED}
        GROUP BY customer_key
    )
SELECT
    figures.day AS day,
    figures.store_id AS store_id,
    figures.channel AS channel,
    figures.active_customers AS active_customers,
    figures.buyers AS buyers,
    ifNull(firsts.new_customers, 0) AS new_customers,
    figures.registrations AS registrations,
    figures.orders AS orders,
    figures.revenue AS revenue,
    figures.refunds AS refunds,
    mapApply((currency, total) -> (currency,
                 CAST(round(toDecimal128(total, 4) / figures.orders_by_currency[currency], 2) AS Decimal(38, 2))),
             figures.revenue) AS average_order_value
FROM (
    SELECT
        toDate(occurred_at) AS day, store_id, channel,
        uniqExact(customer_key) AS active_customers,
        uniqExactIf(customer_key, type = 'purchase_completed') AS buyers,
        countIf(type = 'customer_registered') AS registrations,
        countIf(type = 'purchase_completed') AS orders,
        sumMapIf(map(currency, amount), type = 'purchase_completed') AS revenue,
        sumMapIf(map(currency, toUInt64(1)), type = 'purchase_completed') AS orders_by_currency,
        sumMapIf(map(currency, amount), type = 'purchase_refunded') AS refunds
    FROM {{db}}.events FINAL
    WHERE (customer_key, event_id) GLOBAL NOT IN {_ATTRIBUTED}
    GROUP BY day, store_id, channel
) AS figures
LEFT JOIN (
    SELECT first.1 AS day, first.2 AS store_id, first.3 AS channel, count() AS new_customers
    FROM first_purchases
    GROUP BY day, store_id, channel
) AS firsts ON firsts.day = figures.day AND firsts.store_id = figures.store_id AND firsts.channel = figures.channel
"""

RETENTION_COHORTS = f"""
CREATE OR REPLACE VIEW {{db}}.retention_cohorts AS
WITH
    purchases AS (
        SELECT customer_key, toStartOfMonth(occurred_at) AS month, currency, amount
        FROM {{db}}.events FINAL
        WHERE type = 'purchase_completed' AND (customer_key, event_id) GLOBAL NOT IN {_ATTRIBUTED}
    ),
    cohorts AS (
        SELECT customer_key, min(month) AS cohort_month FROM purchases GROUP BY customer_key
    )
SELECT
    cohorts.cohort_month AS cohort_month,
    toUInt32(dateDiff('month', cohorts.cohort_month, purchases.month)) AS months_since_first_purchase,
    any(sizes.cohort_customers) AS cohort_customers,
    uniqExact(purchases.customer_key) AS active_customers,
    round(active_customers / cohort_customers, 4) AS retention_rate,
    count() AS orders,
    sumMap(map(purchases.currency, purchases.amount)) AS revenue
FROM purchases
INNER JOIN cohorts ON cohorts.customer_key = purchases.customer_key
INNER JOIN (SELECT cohort_month, count() AS cohort_customers FROM cohorts GROUP BY cohort_month) AS sizes
    ON sizes.cohort_month = cohorts.cohort_month
GROUP BY cohort_month, months_since_first_purchase
"""

POINTS_LIABILITY_DAILY = """
CREATE VIEW IF NOT EXISTS {db}.points_liability_daily AS
SELECT
    day,
    sum(available_change) OVER (ORDER BY day) AS available_points,
    sum(pending_change) OVER (ORDER BY day) AS pending_points,
    sum(debt_change) OVER (ORDER BY day) AS debt_points,
    available_points + pending_points AS outstanding_points,
    issued, made_available, redeemed, expired, reversed, adjusted
FROM (
    SELECT
        toDate(occurred_at) AS day,
        sum(available_delta) AS available_change,
        sum(pending_delta) AS pending_change,
        sum(debt_delta) AS debt_change,
        sumIf(pending_delta, kind = 'earned_pending')
          + sumIf(available_delta, kind IN ('registration', 'daily_sign_in', 'share', 'review', 'birthday_month'))
          AS issued,
        sumIf(available_delta, kind = 'made_available') AS made_available,
        -sumIf(available_delta, kind = 'redeemed') AS redeemed,
        -sumIf(available_delta, kind = 'expired') AS expired,
        -sumIf(available_delta + pending_delta - debt_delta, kind IN ('cancelled', 'clawed_back')) AS reversed,
        sumIf(available_delta, kind = 'adjusted') AS adjusted
    FROM {db}.points_ledger FINAL
    GROUP BY day
    ORDER BY day WITH FILL STEP 1
)
"""

SEGMENT_SIZES_DAILY = f"""
CREATE VIEW IF NOT EXISTS {{db}}.segment_sizes_daily AS
WITH
    changes AS (
        SELECT toDate(occurred_at) AS day, dimension, from_segment, to_segment
        FROM {{db}}.segment_changes FINAL
        WHERE customer_key GLOBAL NOT IN {_MERGED_ALIASES}
    ),
    moves AS (
        SELECT day, dimension, segment, countIf(change = 1) AS entered, countIf(change = -1) AS exited
        FROM (
            SELECT day, dimension, to_segment AS segment, 1 AS change FROM changes WHERE to_segment != ''
            UNION ALL
            SELECT day, dimension, from_segment AS segment, -1 AS change FROM changes WHERE from_segment != ''
        )
        GROUP BY day, dimension, segment
    ),
    calendar AS (
        SELECT arrayJoin(arrayMap(n -> first_day + n, range(toUInt32(last_day - first_day) + 1))) AS day
        FROM (SELECT min(day) AS first_day, max(day) AS last_day FROM changes)
    ),
    grid AS (
        SELECT calendar.day AS day, segments.dimension AS dimension, segments.segment AS segment
        FROM calendar CROSS JOIN (SELECT DISTINCT dimension, segment FROM moves) AS segments
    )
SELECT
    grid.day AS day,
    grid.dimension AS dimension,
    grid.segment AS segment,
    sum(toInt64(ifNull(moves.entered, 0)) - toInt64(ifNull(moves.exited, 0)))
        OVER (PARTITION BY grid.dimension, grid.segment ORDER BY grid.day) AS customers,
    ifNull(moves.entered, 0) AS entered,
    ifNull(moves.exited, 0) AS exited
FROM grid
LEFT JOIN moves ON moves.day = grid.day AND moves.dimension = grid.dimension AND moves.segment = grid.segment
"""

ALERT_FUNNEL = """
CREATE VIEW IF NOT EXISTS {db}.alert_funnel AS
SELECT
    toDate(alerts.opened) AS day,
    alerts.type AS alert_type,
    alerts.opening_severity AS severity,
    count() AS opened,
    countIf(alerts.latest_status IN ('opened', 'updated')) AS still_open,
    countIf(alerts.was_updated) AS updated,
    countIf(alerts.latest_status = 'resolved') AS resolved,
    countIf(alerts.latest_status = 'expired') AS expired,
    countIf(alerts.latest_status = 'resolved' AND alerts.latest_cause_event_type = 'purchase_completed'
            AND alerts.last_change <= alerts.opened + INTERVAL 30 DAY) AS won_back_30d,
    round(won_back_30d / opened, 4) AS win_back_rate,
    if(resolved = 0, NULL, round(medianIf(dateDiff('millisecond', alerts.opened, alerts.last_change) / 3600000,
                                          alerts.latest_status = 'resolved'), 2)) AS median_hours_to_resolution
FROM (
    SELECT
        alert_id,
        any(alert_type) AS type,
        min(opened_at) AS opened,
        argMin(severity, version) AS opening_severity,
        argMax(status, version) AS latest_status,
        argMax(cause_event_type, version) AS latest_cause_event_type,
        argMax(occurred_at, version) AS last_change,
        max(status = 'updated') AS was_updated
    FROM {db}.churn_alerts FINAL
    GROUP BY alert_id
) AS alerts
GROUP BY day, alert_type, severity
"""

# Versions from 100 on: the table modules own the low numbers.
MIGRATIONS = [
    (100, DAILY_STORE_CHANNEL),
    (101, RETENTION_COHORTS),
    (102, POINTS_LIABILITY_DAILY),
    (103, SEGMENT_SIZES_DAILY),
    (104, ALERT_FUNNEL),
    # An alias's events count unless a customer took them, not unless the alias was ever linked:
    # after an erasure unlinked an alias, events it still forwarded stay with it (docs/privacy.md).
    (105, DAILY_STORE_CHANNEL),
    (106, RETENTION_COHORTS),
]

VIEWS = ["daily_store_channel", "retention_cohorts", "points_liability_daily", "segment_sizes_daily", "alert_funnel"]
