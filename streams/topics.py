"""Every Kafka topic the platform uses, with its partitioning and retention, in one place.
deploy/topics.py creates them explicitly; nothing relies on broker auto-creation."""

from __future__ import annotations

from dataclasses import dataclass, field

# One customer's events share a key, so they share a partition and stay in order. The count is
# fixed for the life of a cluster: per-customer state records source offsets, which are only
# comparable within one partition.
EVENT_PARTITIONS = 6
# The worker's consumer group and the prefix of its topics. "-2" since the worker owns its state
# store (streams/runtime/state_store.py): a worker of the new kind must not take over the committed
# offsets of one whose state lived in Faust tables, so an upgraded stack folds the log again.
WORKER_APP_ID = "crm-worker-2"

KEEP_FOREVER = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
COMPACTED = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
SEVEN_DAYS = {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3600 * 1000)}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


EVENTS = TopicSpec(
    "crm.events", EVENT_PARTITIONS, KEEP_FOREVER,
    "Source of truth: every event as produced, keyed by customer. Kept forever; replays start here.",
)
DEAD_LETTERS = TopicSpec(
    "crm.events.deadletter", 1, KEEP_FOREVER,
    "Events the worker could not accept: reason, original bytes and source position. Kept forever.",
)
ACCEPTED = TopicSpec(
    "crm.events.accepted", EVENT_PARTITIONS, SEVEN_DAYS,
    "Validated, de-duplicated events for the events table. Derived, so a replay can rebuild it.",
)
PROFILES = TopicSpec(
    "crm.customer-profiles", EVENT_PARTITIONS, COMPACTED,
    "Latest profile snapshot per customer (versioned). Compacted: only the newest per key matters.",
)


POINTS_LEDGER = TopicSpec(
    "crm.points-ledger", EVENT_PARTITIONS, {"cleanup.policy": "delete", "retention.ms": str(30 * 24 * 3600 * 1000)},
    "Every points movement and tier change, keyed by customer, in order. Derived: 30 days.",
)
POINTS_BALANCES = TopicSpec(
    "crm.points-balances", EVENT_PARTITIONS, COMPACTED,
    "Latest points balance and tier per customer (versioned). Compacted.",
)
SEGMENT_CHANGES = TopicSpec(
    "crm.segment-changes", EVENT_PARTITIONS, {"cleanup.policy": "delete", "retention.ms": str(30 * 24 * 3600 * 1000)},
    "Every entry of a customer into a segment (lifecycle stage), keyed by customer, in order: real-time "
    "audiences. Derived: 30 days.",
)
ALERTS = TopicSpec(
    "crm.alerts", EVENT_PARTITIONS, {"cleanup.policy": "delete", "retention.ms": str(90 * 24 * 3600 * 1000)},
    "Every state change of every churn alert (schemas/alerts.py AlertChange), keyed by customer, in "
    "order. Webhooks and the live stream read it. Derived: 90 days.",
)
CHURN_MODELS = TopicSpec(
    "crm.churn-models", 1, COMPACTED,
    "Each BG/NBD churn model the worker put in force, keyed by model id. Compacted.",
)


STATE_CHANGELOG = TopicSpec(
    f"{WORKER_APP_ID}-state-changelog", EVENT_PARTITIONS, COMPACTED,
    "Changelog of the worker's state (streams/runtime/state_store.py), partition for partition with "
    "crm.events: one record per key a batch changed. Compacted.",
)


# Faust's own coordination topic. Created here like every other topic, so that the worker never
# needs to create topics itself (its creation path fails the start-up on a transient metadata error).
ASSIGNOR_LEADER = TopicSpec(f"{WORKER_APP_ID}-__assignor-__leader", 1, {"cleanup.policy": "delete"},
                            "Faust's partition-assignor leader election.")

ALL_TOPICS = (
    EVENTS, DEAD_LETTERS, ACCEPTED, PROFILES, POINTS_LEDGER, POINTS_BALANCES, SEGMENT_CHANGES, ALERTS, CHURN_MODELS,
    STATE_CHANGELOG, ASSIGNOR_LEADER,
)
