"""The import's producer (services/importer/bulk_producer.py, librdkafka) against the real broker:
what send.py and run.py rely on of it, as they relied on kafka-python's producer."""

from __future__ import annotations

import os
import uuid

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaTimeoutError

from services.importer.build import partition_of
from services.importer.bulk_producer import BulkProducer, DeliveryFailed
from tests.integration.conftest import records_on

pytestmark = pytest.mark.integration


@pytest.fixture
def topic(stack):
    name = f"test.bulk-producer.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=1,
                                      topic_configs={"max.message.bytes": "10000"})])
        yield name
        admin.delete_topics([name])
    finally:
        admin.close()


def records_of(stack, topic: str) -> dict[int, list[tuple[bytes, bytes, list]]]:
    found: dict[int, list] = {}
    for record in records_on(stack.settings.kafka_bootstrap, topic):
        found.setdefault(record.partition, []).append((record.key, record.value, record.headers))
    return found


def test_records_keep_their_order_per_partition_and_every_future_reports_its_acknowledgement(stack, topic):
    producer = BulkProducer(stack.settings.kafka_bootstrap)
    deliveries = [producer.send(topic, key=f"k-{n % 7}".encode(), value=f"{n}".encode(), partition=n % 3)
                  for n in range(3000)]
    producer.flush()
    assert all(delivery.is_done and delivery.succeeded() for delivery in deliveries)
    for delivery in deliveries[:5]:
        delivery.get(1)
    found = records_of(stack, topic)
    assert {p: [int(value) for _, value, _ in records] for p, records in found.items()} == {
        p: list(range(p, 3000, 3)) for p in range(3)}
    producer.close()


def test_a_record_without_a_partition_goes_where_kafkas_java_partitioner_puts_its_key(stack, topic):
    producer = BulkProducer(stack.settings.kafka_bootstrap)
    keys = [f"customer-{n}".encode() for n in range(30)]
    for key in keys:
        producer.send(topic, key=key, value=b"v", headers=[("crm.test", b"yes")])
    producer.flush()
    found = records_of(stack, topic)
    assert {key: partition for partition, records in found.items() for key, _, _ in records} == {
        key: partition_of(key, 3) for key in keys}
    assert all(headers == [("crm.test", b"yes")] for records in found.values() for _, _, headers in records)
    producer.close()


def test_a_refused_record_fails_its_future_and_the_partitions_of_a_topic_are_known(stack, topic):
    producer = BulkProducer(stack.settings.kafka_bootstrap)
    assert producer.partitions_for(topic) == {0, 1, 2}
    refused = producer.send(topic, key=b"k", value=os.urandom(20_000), partition=0)  # past max.message.bytes, compressed or not
    with pytest.raises(DeliveryFailed):
        refused.get(30)
    assert refused.is_done and not refused.succeeded()
    with pytest.raises(KafkaTimeoutError):
        producer.partitions_for("test.no-such-topic", timeout=2)
    producer.close()
