"""Create the platform's topics explicitly, with the partitions and configs in streams/topics.py."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streams.config import Settings
from streams.topics import ALL_TOPICS, TopicSpec


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
