"""How far behind the log the worker and the projection writer are: consumer-group lag from Kafka
itself, so it works for any process layout."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from projections.writer import SINKS, WRITER_GROUP
from streams import topics
from streams.config import Settings


@dataclass(frozen=True)
class PipelineLag:
    # None while the broker cannot say yet (group coordinator moving or not yet elected).
    worker: int | None  # events not yet folded by the worker
    writer: int | None  # worker outputs not yet written to ClickHouse

    @property
    def caught_up(self) -> bool:
        return self.worker == 0 and self.writer == 0


class LagProbe:
    def __init__(self, settings: Settings):
        self.admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="crm-lag")
        self.consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id="crm-lag")

    def _group_lag(self, group: str, topic_names: list[str]) -> int | None:
        partitions = [TopicPartition(name, p) for name in topic_names
                      for p in sorted(self.consumer.partitions_for_topic(name) or ())]
        ends = self.consumer.end_offsets(partitions)
        try:
            committed = self.admin.list_group_offsets({group: None}).get(group, {})
        except KafkaError as exc:
            if not exc.retriable:
                raise
            return None
        lag = 0
        for partition in partitions:
            done = committed.get(partition)
            lag += ends[partition] - (done.offset if done is not None and done.offset >= 0 else 0)
        return lag

    def lag(self) -> PipelineLag:
        return PipelineLag(
            worker=self._group_lag(topics.WORKER_APP_ID, [topics.EVENTS.name]),
            writer=self._group_lag(WRITER_GROUP, list(SINKS)),
        )

    def close(self) -> None:
        self.admin.close()
        self.consumer.close()
