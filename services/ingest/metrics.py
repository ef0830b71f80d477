"""The ingestion API's Prometheus metrics (docs/operations.md), answered at its own `/metrics`.
Labels are bounded: routes are the app's route templates (a path that matches none is `unmatched`),
methods the standard ones (anything else is `other`), refusal reasons those of hygiene.py and the
codec."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("crm_api_requests_total", "HTTP requests answered, by method, route template and status code.",
                   ["method", "route", "status"])
REQUEST_SECONDS = Histogram("crm_api_request_duration_seconds", "Time to answer a request, by method and route "
                            "template.", ["method", "route"])
ACCEPTED = Counter("crm_api_events_accepted_total", "Events written to the events topic (Kafka acknowledged them).")
DUPLICATES = Counter("crm_api_events_duplicates_total", "Events whose event_id was written before with the same "
                     "content: answered as duplicates, not written again.")
REFUSED = Counter("crm_api_events_refused_total", "Events refused and dead-lettered, by reason.", ["reason"])
KAFKA_SEND_SECONDS = Histogram("crm_api_kafka_send_duration_seconds", "Time from handing a request's records to "
                               "the producer until Kafka acknowledged them all (or the send failed), by topic.",
                               ["topic"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                                   5, 10, 30))

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def answered(method: str, route: str | None, status: int, seconds: float) -> None:
    """One request answered; `route` is the matched route's template, None when none matched."""
    method = method if method in METHODS else "other"
    route = route or "unmatched"
    REQUESTS.labels(method, route, str(status)).inc()
    REQUEST_SECONDS.labels(method, route).observe(seconds)
