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


# --- personal data (docs/privacy.md) ---

# Plain personal data may lie only in the intake topics, which forget it within a day: segments roll
# hourly and are deleted 24 h after their last record.
SHORT_LIVED = {"cleanup.policy": "delete", "retention.ms": str(24 * 3600 * 1000), "segment.ms": str(3600 * 1000)}
INTAKE = TopicSpec(
    "crm.intake", EVENT_PARTITIONS, SHORT_LIVED,
    "Events as producers that write to Kafka directly submit them, personal fields plain. The intake "
    "agent checks and seals them into crm.events. Kept one day.",
)
INTAKE_DEAD_LETTERS = TopicSpec(
    "crm.intake.deadletter", 1, SHORT_LIVED,
    "Intake records the intake agent refused, original bytes and reason; they may hold plain personal "
    "data, so they are kept one day, like the intake topic.",
)
# Compaction drops an erased key's wrapped record within the bound of docs/privacy.md: segments roll
# hourly, and no record waits more than an hour to be compacted once its segment is closed.
CUSTOMER_KEYS = TopicSpec(
    "crm.customer-keys", EVENT_PARTITIONS,
    {"cleanup.policy": "compact", "segment.ms": str(3600 * 1000), "max.compaction.lag.ms": str(3600 * 1000),
     "min.cleanable.dirty.ratio": "0.01", "delete.retention.ms": str(24 * 3600 * 1000)},
    "Each customer's data keys, wrapped by the master key, keyed by key id (privacy/keystore.py). An "
    "erasure writes a tombstone; compaction removes the wrapped key.",
)
ERASURES = TopicSpec(
    "crm.erasures", 1, KEEP_FOREVER,
    "customer_erased: one record per erasure the worker carried out, with what was done (no personal "
    "data). Kept forever: the register a restore consults so that no erased customer comes back.",
)
AUDIT = TopicSpec(
    "crm.audit", 1, KEEP_FOREVER,
    "Who read, exported or erased whose personal data, when and why (no personal values). Kept forever.",
)


# Faust's own coordination topic. Created here like every other topic, so that the worker never
# needs to create topics itself (its creation path fails the start-up on a transient metadata error).
ASSIGNOR_LEADER = TopicSpec(f"{WORKER_APP_ID}-__assignor-__leader", 1, {"cleanup.policy": "delete"},
                            "Faust's partition-assignor leader election.")

ALL_TOPICS = (
    EVENTS, DEAD_LETTERS, ACCEPTED, PROFILES, POINTS_LEDGER, POINTS_BALANCES, SEGMENT_CHANGES, ALERTS, CHURN_MODELS,
    STATE_CHANGELOG, ASSIGNOR_LEADER, INTAKE, INTAKE_DEAD_LETTERS, CUSTOMER_KEYS, ERASURES, AUDIT,
)
