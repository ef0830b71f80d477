"""The alerts service's Prometheus metrics (docs/operations.md), answered at its own `/metrics`.
Subscription ids label the webhook series: there are few subscriptions (each is a receiver an
operator added), and a removed one's gauges are withdrawn."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.alerts.store import AlertStore, Appended

CHANGES = Counter("crm_alerts_changes_consumed_total", "Records of crm.alerts consumed: logged (new alert changes), "
                  "duplicate (a change_id already logged) or invalid (not an AlertChange, skipped).", ["outcome"])
DELIVERIES = Counter("crm_alerts_webhook_deliveries_total", "Webhook delivery attempts by outcome: delivered (2xx), "
                     "failed (to be retried) or dead (attempts used up).", ["subscription", "outcome"])
RETRIES = Counter("crm_alerts_webhook_retries_total", "Delivery attempts after the first of the same delivery.",
                  ["subscription"])
DELIVERY_SECONDS = Histogram("crm_alerts_webhook_delivery_duration_seconds", "Time of one delivery attempt, "
                             "request sent to answer read (or the timeout).", ["subscription"],
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PENDING = Gauge("crm_alerts_webhook_pending_deliveries", "Deliveries waiting for their first attempt or a retry.",
                ["subscription"])
DEAD = Gauge("crm_alerts_webhook_dead_deliveries", "Deliveries that used up their attempts, until redelivered.",
             ["subscription"])
STREAMS = Gauge("crm_alerts_stream_subscribers", "Live alert streams (Server-Sent Events) connected now.")

_subscriptions: set[str] = set()  # the subscriptions PENDING and DEAD have series for


def consumed(appended: Appended) -> None:
    CHANGES.labels("logged").inc(appended.alerts)
    CHANGES.labels("duplicate").inc(appended.duplicates)
    CHANGES.labels("invalid").inc(appended.invalid)


def attempted(subscription: str, attempt: int, outcome: str, seconds: float) -> None:
    """One delivery attempt (1-based `attempt`) and its outcome: delivered, failed or dead."""
    DELIVERIES.labels(subscription, outcome).inc()
    DELIVERY_SECONDS.labels(subscription).observe(seconds)
    if attempt > 1:
        RETRIES.labels(subscription).inc()


def count_deliveries(store: AlertStore) -> None:
    """Pending and dead deliveries per active subscription, read from the store when Prometheus
    scrapes (the store is the truth: the CLI redelivers and removes from another process)."""
    counts = store.unsettled_deliveries()
    for gone in _subscriptions - counts.keys():
        PENDING.remove(gone)
        DEAD.remove(gone)
    for subscription, (pending, dead) in counts.items():
        PENDING.labels(subscription).set(pending)
        DEAD.labels(subscription).set(dead)
    _subscriptions.clear()
    _subscriptions.update(counts)
