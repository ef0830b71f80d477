"""Create the platform's topics explicitly, with the partitions and configs in streams/topics.py,
and give the worker's consumer group a committed offset on every events partition."""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from streams.config import Settings
from streams.topics import ALL_TOPICS, TopicSpec

log = logging.getLogger("crm.deploy")


def ensure_topics(settings: Settings, topics: tuple[TopicSpec, ...] = ALL_TOPICS) -> list[str]:
    """Create whichever topics are missing; return the names created."""
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="crm-deploy")
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        if missing:
            try:
                admin.create_topics([
                    NewTopic(t.name, num_partitions=t.partitions, replication_factor=settings.kafka_replication,
                             topic_configs=t.config)
                    for t in missing
                ])
            except TopicAlreadyExistsError:
                pass  # another process created it between our list and create
        return [t.name for t in missing]
    finally:
        admin.close()


def ensure_start_offsets(settings: Settings, group: str, topic: TopicSpec) -> list[int]:
    """Commit, for `group`, the first offset of each partition of `topic` that has no committed
    offset yet; return those partitions.

    Faust relies on this. At a rebalance it discards the records it fetched while restoring its
    tables, then seeks every partition back to its committed offset; a partition with no committed
    offset is not sought back, so the discarded records are never read again. A worker that crashed
    before its first commit would leave its successor skipping part of the log: seen in the crash test
    once the worker got fast enough to be killed inside its first commit interval."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group,
                             client_id="crm-deploy", enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        missing = [tp for tp in partitions if consumer.committed(tp) is None]
        if missing:
            first = consumer.beginning_offsets(missing)
            try:
                consumer.commit({tp: OffsetAndMetadata(first[tp], "", -1) for tp in missing})
            except KafkaError as exc:
                # A running member owns the group and commits for it; nothing to start from.
                log.warning("could not set start offsets of %s for %s: %s", topic.name, group, exc)
                return []
        return [tp.partition for tp in missing]
    finally:
        consumer.close(autocommit=False)
