"""`crm status`'s health lines: each process's own /metrics (found through the address files of
deploy/metrics_endpoint.py), read and summed up in a line or two. A process that is not running, has
no address file or does not answer is said so in one line; nothing here raises for it."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deploy.metrics_endpoint import read_address

SCRAPE_TIMEOUT_SECONDS = 2.0
Labels = dict[str, str]


class Samples:
    """One scrape's samples by sample name (`…_total`, `…_sum`, `…_bucket` as exposed)."""

    def __init__(self, text: str):
        self.by_name: dict[str, list[tuple[Labels, float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.by_name[sample.name].append((sample.labels, sample.value))

    def total(self, name: str, **match: str) -> float:
        """The sum over the series of `name` whose labels include `match`."""
        return sum(value for labels, value in self.by_name.get(name, ()) if match.items() <= labels.items())

    def by(self, name: str, label: str, **match: str) -> dict[str, float]:
        """The sum of `name` per value of `label`."""
        sums: dict[str, float] = defaultdict(float)
        for labels, value in self.by_name.get(name, ()):
            if match.items() <= labels.items():
                sums[labels.get(label, "")] += value
        return dict(sums)

    def mean(self, histogram: str, **match: str) -> float | None:
        """Mean of a histogram's observations (None before the first)."""
        count = self.total(f"{histogram}_count", **match)
        return self.total(f"{histogram}_sum", **match) / count if count else None


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=SCRAPE_TIMEOUT_SECONDS)
    response.raise_for_status()
    return Samples(response.text)


def report(state_dir: Path, name: str) -> list[str]:
    """The health lines of process `name` (worker, writer, alerts, api)."""
    url = read_address(state_dir, name)
    if url is None:
        return ["metrics: none announced (not running)"]
    try:
        samples = scrape(url)
    except (httpx.HTTPError, ValueError) as exc:
        return [f"metrics: DOWN, {url} does not answer ({type(exc).__name__})"]
    return [f"metrics: up, {url}", *SUMMARIES[name](samples)]


def worker(s: Samples) -> list[str]:
    fold, flush = s.mean("crm_worker_batch_duration_seconds", phase="fold"), \
        s.mean("crm_worker_batch_duration_seconds", phase="flush")
    return [
        f"records in {_n(s.total('crm_worker_records_in_total'))}, out {_n(s.total('crm_worker_outputs_total'))}; "
        f"duplicates {_n(s.total('crm_worker_duplicates_total'))}; "
        f"dead letters {_breakdown(s.by('crm_worker_dead_letters_total', 'reason'))}",
        f"lag {_lag(s, 'crm_worker_consumer_lag_records')}; batches "
        f"{_n(s.total('crm_worker_batch_records_count'))}, mean {_n(s.mean('crm_worker_batch_records'))} records, "
        f"fold {_ms(fold)}, flush {_ms(flush)}; send retries {_n(s.total('crm_worker_send_retries_total'))}",
    ]


def writer(s: Samples) -> list[str]:
    latency = {table: s.mean("crm_writer_insert_duration_seconds", table=table)
               for table in s.by("crm_writer_insert_duration_seconds_count", "table")}
    slowest = max(latency, key=lambda table: latency[table] or 0.0, default=None)
    last = s.total("crm_writer_last_write_timestamp_seconds")
    return [
        f"records {_n(s.total('crm_writer_records_consumed_total'))}, "
        f"rows {_n(s.total('crm_writer_rows_inserted_total'))}; "
        f"insert mean {_ms(s.mean('crm_writer_insert_duration_seconds'))}"
        + (f" (slowest {slowest} {_ms(latency[slowest])})" if slowest else "")
        + f"; insert failures {_breakdown(s.by('crm_writer_insert_failures_total', 'table'))}; "
        f"last write {f'{time.time() - last:.0f} s ago' if last else 'never'}",
        f"lag {_lag(s, 'crm_writer_consumer_lag_records')}",
    ]


def alerts(s: Samples) -> list[str]:
    outcomes = s.by("crm_alerts_webhook_deliveries_total", "outcome")
    return [
        f"alert changes {_breakdown(s.by('crm_alerts_changes_consumed_total', 'outcome'))}; "
        f"live streams {_n(s.total('crm_alerts_stream_subscribers'))}",
        f"webhook attempts {_breakdown(outcomes)}, mean {_ms(s.mean('crm_alerts_webhook_delivery_duration_seconds'))}; "
        f"now pending {_n(s.total('crm_alerts_webhook_pending_deliveries'))}, "
        f"dead {_n(s.total('crm_alerts_webhook_dead_deliveries'))}",
    ]


def api(s: Samples) -> list[str]:
    statuses = s.by("crm_api_requests_total", "status")
    errors = sum(n for status, n in statuses.items() if status.startswith("5"))
    return [
        f"requests {_n(sum(statuses.values()))}, 5xx {_n(errors)}; events accepted "
        f"{_n(s.total('crm_api_events_accepted_total'))}, duplicates {_n(s.total('crm_api_events_duplicates_total'))}, "
        f"refused {_breakdown(s.by('crm_api_events_refused_total', 'reason'))}; kafka send mean "
        f"{_ms(s.mean('crm_api_kafka_send_duration_seconds', topic='crm.events'))}",
    ]


SUMMARIES: dict[str, Callable[[Samples], list[str]]] = {"worker": worker, "writer": writer, "alerts": alerts,
                                                        "api": api}


def _lag(s: Samples, gauge: str) -> str:
    """Summed per topic, with the partition furthest behind."""
    series = [(labels["topic"], labels["partition"], value) for labels, value in s.by_name.get(gauge, ())]
    if not series:
        return "not measured yet"
    per_topic = defaultdict(float)
    for topic, _, value in series:
        per_topic[topic] += value
    topic, partition, worst = max(series, key=lambda one: one[2])
    summed = ", ".join(f"{name} {_n(value)}" for name, value in sorted(per_topic.items()) if value) or "0"
    return f"{summed} (worst {topic}[{partition}] {_n(worst)})"


def _breakdown(counts: dict[str, float]) -> str:
    """`12 (malformed_json 5, schema_invalid 7)`, largest first; `0` when there are none."""
    total = sum(counts.values())
    parts = ", ".join(f"{name} {_n(n)}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n)
    return f"{_n(total)} ({parts})" if parts else "0"


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:,.0f} ms"
