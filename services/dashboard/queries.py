"""Every figure of the dashboard, each one SQL query, and the pages that show them.

One module on purpose: docs/dashboard.md shows these queries as they stand, and the browser test runs
them directly to check what the pages show (tests/integration/test_dashboard.py keeps the two in step).
Queries follow the docs' rules for the replacing tables: `FINAL`, an alert's state is its highest
`version`, profiles kept under a linked alias (`merged_into != ''`) are left out. "Over time" charts
cover the last 90 days up to the latest day the data has (event time), so a replayed or simulated
history shows as well as a live one; the cut is a window function so that the view runs once.

A customer panel takes the customer key as the query parameter `{key:String}`, never spliced into SQL.
A chart reads its query's columns by position, as `chart` and `options` say (charts.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Panel:
    name: str
    title: str
    about: str          # what the figure shows, for the page and docs/dashboard.md
    sql: str
    chart: str          # a renderer of charts.py (RENDERERS): lines, bars, grid, table, ...
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def per_customer(self) -> bool:
        return "{key:String}" in self.sql


@dataclass(frozen=True)
class Page:
    path: str
    title: str
    panels: tuple[str, ...]
    live_feed: bool = False   # the alerts page also shows alerts as they open (live.py)


PANELS: dict[str, Panel] = {panel.name: panel for panel in (
    Panel("lifecycle_over_time", "Customers by lifecycle stage",
          "Customers in each lifecycle stage at the end of each day (new, active, dormant, lost).", """
SELECT day, segment, customers
FROM (SELECT day, segment, customers, max(day) OVER () AS last_day
      FROM segment_sizes_daily WHERE dimension = 'lifecycle')
WHERE day > last_day - 90
ORDER BY day, segment""", "lines_by"),
    Panel("value_tier_over_time", "Customers by value tier",
          "Customers in each value tier (high, mid, low) at the end of each day, as cut by the population "
          "boundaries in force.", """
SELECT day, segment, customers
FROM (SELECT day, segment, customers, max(day) OVER () AS last_day
      FROM segment_sizes_daily WHERE dimension = 'value_tier')
WHERE day > last_day - 90
ORDER BY day, segment""", "lines_by"),
    Panel("rfm_grid", "RFM grid: recency x frequency",
          "Customers now in each cell of recency score (rows, 5 = bought most recently) by frequency score "
          "(columns, 5 = buys most often); customers never scored are left out.", """
SELECT rfm_recency AS recency, rfm_frequency AS frequency, count() AS customers
FROM customer_profiles FINAL
WHERE merged_into = '' AND rfm_recency > 0
GROUP BY recency, frequency
ORDER BY recency DESC, frequency""", "grid",
          {"rows_order": [5, 4, 3, 2, 1], "columns_order": [1, 2, 3, 4, 5], "row_title": "recency",
           "column_title": "frequency"}),
    Panel("tags", "Tags", "Customers who hold each tag now.", """
SELECT tag, count() AS customers
FROM customer_profiles FINAL ARRAY JOIN tags AS tag
WHERE merged_into = ''
GROUP BY tag
ORDER BY customers DESC, tag""", "bars"),
    Panel("store_channel_revenue", "Revenue by store and channel",
          "Purchase totals after discount (before refunds), per store, channel and currency, over the whole "
          "history; sales without a store (app, web) show as (none).", """
SELECT store, channel, currency, sum(amount) AS revenue
FROM (SELECT if(store_id = '', '(none)', store_id) AS store, channel, currency, amount
      FROM daily_store_channel ARRAY JOIN mapKeys(revenue) AS currency, mapValues(revenue) AS amount)
GROUP BY store, channel, currency
ORDER BY revenue DESC, store, channel, currency
LIMIT 20""", "bars"),
    Panel("points_flow", "Points issued, redeemed and expired",
          "Loyalty points issued (purchases and bonuses), redeemed and expired per day.", """
SELECT day, issued, redeemed, expired
FROM (SELECT day, issued, redeemed, expired, max(day) OVER () AS last_day FROM points_liability_daily)
WHERE day > last_day - 90
ORDER BY day""", "lines"),
    Panel("points_outstanding", "Outstanding points",
          "Points members hold at the end of each day: available, and pending in the return window.", """
SELECT day, available_points, pending_points
FROM (SELECT day, available_points, pending_points, max(day) OVER () AS last_day FROM points_liability_daily)
WHERE day > last_day - 90
ORDER BY day""", "lines"),
    Panel("points_liability", "Points liability now",
          "Points outstanding now and what they are worth at the rules' point value.", """
SELECT sum(available) AS available_points, sum(pending) AS pending_points,
       sum((available + pending) * point_value) AS liability, any(point_value_currency) AS currency
FROM points_balances FINAL""", "kpis"),
    Panel("tier_mix", "Member tiers", "Members in each loyalty tier now.", """
SELECT tier, count() AS members
FROM points_balances FINAL
GROUP BY tier
ORDER BY members DESC, tier""", "bars"),
    Panel("alert_funnel", "Alert funnel",
          "Alerts opened per type and where they stand now: won back (resolved by a purchase within 30 days), "
          "resolved otherwise, expired, still open; and the win-back rate.", """
SELECT f.alert_type AS alert_type, sum(f.opened) AS opened, sum(f.won_back_30d) AS won_back,
       sum(f.resolved) - won_back AS resolved_otherwise, sum(f.expired) AS expired,
       sum(f.still_open) AS still_open, round(won_back / opened, 4) AS win_back_rate
FROM alert_funnel AS f
GROUP BY alert_type
ORDER BY opened DESC, alert_type""", "stacked_bars",
          {"total": "opened", "parts": ["won_back", "resolved_otherwise", "expired", "still_open"],
           "note": "win_back_rate"}),
    Panel("alerts_by_reason", "Alerts by reason",
          "Alerts opened for each reason (an alert opened for two reasons counts for both), and where they "
          "stand now.", """
SELECT reason, count() AS opened, countIf(status_now IN ('opened', 'updated')) AS still_open,
       countIf(status_now = 'resolved') AS resolved, countIf(status_now = 'expired') AS expired
FROM (SELECT alert_id, argMin(reason_codes, version) AS opening_reasons, argMax(status, version) AS status_now
      FROM churn_alerts FINAL GROUP BY alert_id)
ARRAY JOIN opening_reasons AS reason
GROUP BY reason
ORDER BY opened DESC, reason""", "stacked_bars",
          {"total": "opened", "parts": ["resolved", "expired", "still_open"]}),
    Panel("latest_alerts", "Latest alerts",
          "The 20 alerts opened last by event time, with the reasons they opened for.", """
SELECT opened_at, alert_type, severity, customer_key, arrayStringConcat(reason_codes, ', ') AS reasons, store_id
FROM churn_alerts FINAL
WHERE status = 'opened'
ORDER BY opened_at DESC, change_id
LIMIT 20""", "table"),
    Panel("retention_cohorts", "Retention cohorts",
          "Of the customers whose first purchase was in a month (rows), the share who bought again N months "
          "later (columns); the last 12 cohorts.", """
SELECT cohort_month, months_since_first_purchase, cohort_customers, active_customers, retention_rate
FROM (SELECT *, max(cohort_month) OVER () AS last_cohort FROM retention_cohorts)
WHERE cohort_month > addMonths(last_cohort, -12)
ORDER BY cohort_month DESC, months_since_first_purchase""", "grid",
          {"value": "retention_rate", "row_title": "first purchase", "column_title": "months since"}),
    Panel("customer_profile", "Profile", "The customer's profile now.", """
SELECT customer_key, lifecycle_stage, value_tier, rfm_segment, tags, first_seen, last_seen, purchase_count,
       refund_count, spend, tier, points_available, points_pending, favourite_store, favourite_channel,
       churn_p_alive, open_alerts, merged_into
FROM customer_profiles FINAL
WHERE customer_key = {key:String}""", "record"),
    Panel("customer_timeline", "Timeline", "The customer's last 200 events, newest first.", """
SELECT occurred_at, type, channel, store_id, amount, currency
FROM events FINAL
WHERE customer_key = {key:String}
ORDER BY occurred_at DESC, event_id
LIMIT 200""", "timeline"),
    Panel("customer_points", "Points ledger",
          "Every points movement of the customer and the balance after it.", """
SELECT occurred_at, seq, kind, available_delta, pending_delta, available_after, pending_after, reference
FROM points_ledger FINAL
WHERE customer_key = {key:String}
ORDER BY seq""", "lines", {"series": ["available_after", "pending_after"], "step": True}),
    Panel("customer_segments", "Segments over time",
          "Each entry of the customer into a lifecycle stage, value tier, RFM segment or tag.", """
SELECT occurred_at, dimension, from_segment, to_segment, cause_type
FROM segment_changes FINAL
WHERE customer_key = {key:String}
ORDER BY seq""", "lanes"),
    Panel("customer_alerts", "Open alerts", "The customer's alerts that are open now.", """
SELECT alert_type, severity, opened_at, arrayStringConcat(reason_codes, ', ') AS reasons, action_kind, action_note
FROM (SELECT * FROM churn_alerts FINAL WHERE customer_key = {key:String} ORDER BY version DESC LIMIT 1 BY alert_id)
WHERE status IN ('opened', 'updated')
ORDER BY opened_at DESC""", "table"),
)}

PAGES: dict[str, Page] = {page.path: page for page in (
    Page("/", "Overview", ("lifecycle_over_time", "value_tier_over_time", "rfm_grid", "tags", "store_channel_revenue")),
    Page("/loyalty", "Loyalty", ("points_liability", "points_flow", "points_outstanding", "tier_mix")),
    Page("/alerts", "Alerts", ("alert_funnel", "alerts_by_reason", "latest_alerts"), live_feed=True),
    Page("/retention", "Retention", ("retention_cohorts",)),
)}

CUSTOMER_PAGE = Page("/customers/{key}", "Customer", ("customer_profile", "customer_alerts", "customer_segments",
                                                       "customer_points", "customer_timeline"))
