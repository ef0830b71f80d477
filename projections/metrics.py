"""The projection writer's Prometheus metrics (docs/operations.md), served by `crm writer` through
`serve`. Counted per poll and per insert, never per record; labels are bounded by the writer's
topics, their partitions and its tables."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram

from deploy.metrics_endpoint import MetricsEndpoint
from deploy.metrics_endpoint import serve as serve_endpoint
from streams.config import Settings

LAG_SECONDS = 5.0  # measuring the lag costs about 2 ms with 40 partitions: not at every poll

RECORDS = Counter("crm_writer_records_consumed_total", "Records of the worker's output topics polled.", ["topic"])
ROWS = Counter("crm_writer_rows_inserted_total", "Rows ClickHouse accepted, by table.", ["table"])
INSERT_SECONDS = Histogram("crm_writer_insert_duration_seconds", "Time per accepted insert of one batch's rows "
                           "into one table.", ["table"],
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
INSERT_FAILURES = Counter("crm_writer_insert_failures_total", "Inserts ClickHouse refused or that failed on the "
                          "way (each is tried again until stored).", ["table"])
LAST_WRITE = Gauge("crm_writer_last_write_timestamp_seconds", "Unix time of the last insert ClickHouse accepted.")
LAG = Gauge("crm_writer_consumer_lag_records", "Records in an assigned partition not yet polled: the highwater the "
            "last fetch reported minus the consumer's position.", ["topic", "partition"])


def serve(settings: Settings) -> MetricsEndpoint:
    """/metrics of this process on CRM_WRITER_METRICS_PORT, announced in run/writer.metrics."""
    return serve_endpoint("writer", settings.state_dir, settings.writer_metrics_port)


def polled(consumer: KafkaConsumer, batch: Mapping[Any, list[Any]]) -> None:
    """One poll: its records by topic, and every LAG_SECONDS the lag of the assigned partitions."""
    by_topic: Tally[str] = Tally()
    for tp, records in batch.items():
        by_topic[tp.topic] += len(records)
    for topic, n in by_topic.items():
        RECORDS.labels(topic).inc(n)
    if time.monotonic() >= _lag.due:
        _lag.measure(consumer)


class _Lag:
    """The LAG series this process has set: a partition no longer assigned is withdrawn, since
    its lag is another writer's to report."""

    def __init__(self) -> None:
        self.reported: set[tuple[str, str]] = set()
        self.due = 0.0

    def measure(self, consumer: KafkaConsumer) -> None:
        """Positions and highwaters are the consumer's own figures from its fetches (no request to
        the broker); a partition without them yet, or taken away meanwhile, is left out until it
        has them again."""
        self.due = time.monotonic() + LAG_SECONDS
        lag: dict[tuple[str, str], int] = {}
        for tp in consumer.assignment():
            try:
                end, position = consumer.highwater(tp), consumer.position(tp, timeout_ms=0)
            except KafkaError:  # IllegalStateError: no longer assigned
                continue
            if end is not None and position is not None:
                lag[(tp.topic, str(tp.partition))] = max(0, end - position)
        for labels in self.reported - lag.keys():
            LAG.remove(*labels)
        for labels, records in lag.items():
            LAG.labels(*labels).set(records)
        self.reported = set(lag)


_lag = _Lag()


@contextmanager
def insert(table: str, rows: int) -> Iterator[None]:
    """Around one insert: its time and rows when ClickHouse accepts it, a failure when it raises
    (and the exception goes on to the writer, which tries again)."""
    started = time.perf_counter()
    try:
        yield
    except Exception:
        INSERT_FAILURES.labels(table).inc()
        raise
    INSERT_SECONDS.labels(table).observe(time.perf_counter() - started)
    ROWS.labels(table).inc(rows)
    LAST_WRITE.set_to_current_time()
