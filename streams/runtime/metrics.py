"""The stream worker's Prometheus metrics (served by streams/runtime/app.py, listed in
docs/operations.md). The pure fold (streams/*.py) knows nothing of them: the runtime counts what a
batch took in and sent out.

The worker folds about a thousand records a second in batches of up to 2,000, so everything here is
counted once per batch (`Counter.inc(n)`), never once per record; label values are bounded: topics,
the partitions of the events topic, dead-letter reasons, two phases."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Mapping

from prometheus_client import Counter, Gauge, Histogram

from streams.records import SourceRecord, TopicRecord

RECORDS_IN = Counter("crm_worker_records_in_total", "Records of the events topic taken into a batch and folded.",
                     ["topic", "partition"])
OUTPUTS = Counter("crm_worker_outputs_total", "Output records sent and acknowledged by Kafka, by topic "
                  "(the state changelog not included).", ["topic"])
DEAD_LETTERS = Counter("crm_worker_dead_letters_total", "Records refused to the dead-letter topic, by reason.",
                       ["reason"])
DUPLICATES = Counter("crm_worker_duplicates_total", "Producer resends of an accepted event (same event_id and "
                     "content at another offset), ignored.")
SEND_RETRIES = Counter("crm_worker_send_retries_total", "Times a batch's send to Kafka failed and was retried whole.")
BATCH_RECORDS = Histogram("crm_worker_batch_records", "Records per batch.",
                          buckets=(1, 10, 50, 100, 250, 500, 1000, 1500, 2000, 5000))
BATCH_SECONDS = Histogram("crm_worker_batch_duration_seconds", "Time per batch: folding it in memory (fold), then "
                          "sending changelog and outputs and writing RocksDB (flush).", ["phase"],
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
LAG = Gauge("crm_worker_consumer_lag_records", "Records in an assigned events partition that the worker has not "
            "taken yet: the log's end minus the next offset it expects.", ["topic", "partition"])

FOLD, FLUSH = BATCH_SECONDS.labels("fold"), BATCH_SECONDS.labels("flush")


def batch_done(records: list[SourceRecord], fold_seconds: float, flush_seconds: float) -> None:
    """One folded and flushed batch."""
    for (topic, partition), n in Tally((r.topic, r.partition) for r in records).items():
        RECORDS_IN.labels(topic, str(partition)).inc(n)
    BATCH_RECORDS.observe(len(records))
    FOLD.observe(fold_seconds)
    FLUSH.observe(flush_seconds)


def outputs_sent(records: Iterable[TopicRecord]) -> None:
    for topic, n in Tally(r.topic for r in records).items():
        OUTPUTS.labels(topic).inc(n)


def lag_measured(topic: str, lag: Mapping[int, int]) -> None:
    for partition, records in lag.items():
        LAG.labels(topic, str(partition)).set(records)


def partitions_gone(topic: str, partitions: Iterable[int]) -> None:
    """Revoked partitions: their lag is another worker's to report now."""
    for partition in partitions:
        LAG.remove(topic, str(partition))
