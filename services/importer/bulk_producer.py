"""The import's producer: librdkafka (confluent-kafka 2.16) behind the part of kafka-python's
KafkaProducer that send.py and run.py use: `send` returning a future (`get`, `is_done`,
`succeeded`), `flush`, `close`, `partitions_for`, and KafkaTimeoutError when time runs out.

Why another client: kafka-python builds every record in Python, about 13 µs of CPU each, which was
a sixth of an import's CPU and the reason it fell short of 20,000 events/s on two cores (BENCHMARKS.md);
librdkafka does it in C, about 3.5 µs. The settings are the importer's: acks=all, idempotent (a
partition keeps the order records were handed over in, retries included), zstd, 20 ms linger,
512 KiB batches; and Kafka's Java partitioner (murmur2), as kafka-python's, for records sent without
a partition (the dead letters), so a key lands where every other producer of the platform puts it.

Delivery reports reach their futures only while this process polls the producer: `get` and `flush`
poll; `send` polls without waiting, so reports never pile up."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import confluent_kafka
from kafka.errors import KafkaError, KafkaTimeoutError

POLL_SECONDS = 0.05
log = logging.getLogger("crm.import")


class DeliveryFailed(KafkaError):
    """Kafka refused a record, or librdkafka gave up on it (its message says why)."""


class Delivery:
    """One record's acknowledgement: librdkafka calls it with the outcome (on_delivery)."""
    __slots__ = ("_client", "error", "is_done")

    def __init__(self, client: confluent_kafka.Producer):
        self._client = client
        self.error: confluent_kafka.KafkaError | None = None
        self.is_done = False

    def __call__(self, error: confluent_kafka.KafkaError | None, _message: object) -> None:
        self.error, self.is_done = error, True

    def succeeded(self) -> bool:
        return self.is_done and self.error is None

    def get(self, timeout: float) -> None:
        """Returns once Kafka acknowledged the record; DeliveryFailed if it refused it,
        KafkaTimeoutError if no answer came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.is_done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KafkaTimeoutError(f"no acknowledgement within {timeout} s")
            self._client.poll(min(left, POLL_SECONDS))
        if self.error is not None:
            raise DeliveryFailed(self.error.str())


class BulkProducer:
    def __init__(self, bootstrap: str, client_id: str = "crm-import"):
        self._client = confluent_kafka.Producer({
            "bootstrap.servers": bootstrap, "client.id": client_id, "acks": "all", "enable.idempotence": True,
            "linger.ms": 20, "batch.size": 512 * 1024, "compression.type": "zstd", "partitioner": "murmur2_random",
        }, logger=logging.getLogger("crm.import.kafka"))

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, partition: int | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None) -> Delivery:
        delivery = Delivery(self._client)
        while True:
            try:
                self._client.produce(topic, value, key, -1 if partition is None else partition,
                                     on_delivery=delivery, headers=list(headers) if headers else None)
                break
            except BufferError:  # librdkafka's queue is full: wait for some acknowledgements
                self._client.poll(POLL_SECONDS)
        self._client.poll(0)
        return delivery

    def flush(self, timeout: float | None = None) -> None:
        """Waits until every record was acknowledged or refused; KafkaTimeoutError if `timeout` passes first."""
        left = self._client.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} records unacknowledged after {timeout} s")

    def close(self, timeout: float = 10) -> None:
        """Waits up to `timeout` for the records not yet acknowledged, as kafka-python's close does;
        what is still unanswered then is given up (its futures never complete)."""
        left = self._client.flush(timeout)
        if left:
            log.warning("%d records unacknowledged when the producer closed after %s s", left, timeout)

    def partitions_for(self, topic: str, timeout: float = 30) -> set[int]:
        try:
            found = self._client.list_topics(topic, timeout=timeout).topics.get(topic)
        except confluent_kafka.KafkaException as exc:
            raise KafkaTimeoutError(f"no metadata for {topic}: {exc}") from exc
        if found is None or found.error is not None or not found.partitions:
            raise KafkaTimeoutError(f"no metadata for {topic}: {found.error if found else 'unknown topic'}")
        return set(found.partitions)
