"""What the crash tests share: a workload of one customer prefix, the pure fold (`pipeline.process`)
over the same log read back from the events topic, and the comparison of every ClickHouse
projection of that prefix with it (profiles, event rows, ledger movements, balances, segment
changes, churn alert changes): nothing lost, nothing counted twice."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from streams import topics
from tests.factories import encoded, event

# Records the platform appends to the events log that concern every customer of a partition, not
# one: the pure fold of a prefix needs them as much as the prefix's own records.
SHARED_KEYS = (b"clock", b"boundaries", b"churn-model")
KINDS = ("purchase_completed", "product_viewed", "purchase_refunded", "daily_sign_in",
         "purchase_completed", "points_redemption_requested", "content_shared", "customer_registered")
PAYLOADS = {
    "points_redemption_requested": lambda n: {"request_id": f"q-{n}", "reward_id": "voucher", "points": 100},
    "content_shared": lambda n: {"content_type": "product", "content_id": f"p-{n}"},
    "customer_registered": lambda n: {"birthday": f"1990-{1 + n % 12:02d}-15"},
}


def tick(partition: int, at: str) -> bytes:
    return encoded({"event_id": str(uuid.uuid4()), "type": "clock_ticked", "occurred_at": at, "partition": partition})


class Workload:
    """Events of customers named `<prefix>-NNN`, one every `step` of event time from `start`, every
    customer meeting every kind (purchases, views, refunds, sign-ins, redemptions, shares,
    registrations); every `resend_every`-th event sent twice (a producer retry); after event n of
    `ticks`, a clock tick at that time in every partition. `sent` holds the events sent (once each)."""

    def __init__(self, stack: Any, prefix: str, *, customers: int, start: datetime,
                 ticks: dict[int, datetime] | None = None, resend_every: int = 10,
                 step: timedelta = timedelta(minutes=10)):
        self.stack, self.start, self.step = stack, start, step
        self.names = [f"{prefix}-{n:03d}" for n in range(customers)]
        self.ticks, self.resend_every = ticks or {}, resend_every
        self.sent: list[dict[str, Any]] = []

    def send(self, events: int) -> None:
        """The next `events` events, flushed."""
        for n in range(len(self.sent), len(self.sent) + events):
            customer = self.names[n % len(self.names)]
            kind = KINDS[(n // len(self.names) + n) % len(KINDS)]
            extra = {"payload": PAYLOADS[kind](n)} if kind in PAYLOADS else {}
            body = event(kind, customer_id=customer, occurred_at=(self.start + self.step * n).isoformat(), **extra)
            self.sent.append(body)
            self.stack.send(customer.encode(), encoded(body))
            if n % self.resend_every == 3:  # a producer retry
                self.stack.send(customer.encode(), encoded(body))
            if n in self.ticks:  # time passes: points mature, later some expire
                self.tick(self.ticks[n])
        self.stack.flush()

    def tick(self, at: datetime) -> None:
        for partition in range(topics.EVENT_PARTITIONS):
            self.stack.send(b"clock", tick(partition, at.isoformat()), partition=partition)
        self.stack.flush()


def send_workload(stack: Any, prefix: str, *, customers: int, events: int, start: datetime,
                  ticks: dict[int, datetime], resend_every: int = 10) -> list[dict[str, Any]]:
    """`events` events of a `Workload`, sent at once; returns them."""
    workload = Workload(stack, prefix, customers=customers, start=start, ticks=ticks, resend_every=resend_every)
    workload.send(events)
    return workload.sent


def event_rows(stack: Any, prefix: str) -> int:
    return stack.query("SELECT count() FROM events FINAL WHERE startsWith(customer_key, {p:String})",
                       {"p": prefix})[0][0]


@dataclass
class Fold:
    """The pure fold's outputs for one prefix, in the shape the comparison queries give."""
    store: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, tuple] = field(default_factory=dict)
    movements: dict[tuple[str, int], tuple] = field(default_factory=dict)
    balances: dict[str, tuple] = field(default_factory=dict)
    segment_changes: dict[tuple[str, int], tuple] = field(default_factory=dict)
    alerts: dict[str, tuple] = field(default_factory=dict)

    def customer(self, key: str) -> Any:
        from streams.pipeline import load_customer

        return load_customer(self.store, key)


def pure_fold(stack: Any, prefix: str) -> Fold:
    """`pipeline.process` over the events log from its beginning: the prefix's records and those
    every customer shares (clock ticks, boundaries, churn models)."""
    from streams.config import settings as crm_settings
    from streams.pipeline import (
        AlertChanged, BalanceChanged, LedgerEntry, ProfileChanged, SegmentChanged, SourceRecord, process,
    )
    from streams.rulebooks import load_rulebooks

    rules = load_rulebooks(crm_settings())
    consumer = KafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=5000, max_poll_records=5000)
    partitions = [TopicPartition(topics.EVENTS.name, p) for p in range(topics.EVENT_PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    end = consumer.end_offsets(partitions)
    fold, seen = Fold(), {}
    profiles, alerts = {}, {}
    try:
        for message in consumer:
            if message.key and (message.key.startswith(prefix.encode()) or message.key in SHARED_KEYS):
                record = SourceRecord(message.key, message.value, message.partition, message.offset,
                                      message.timestamp, message.topic)
                for output in process(record, fold.store, seen, rules):
                    if isinstance(output, ProfileChanged):
                        profiles[output.profile.customer_key] = output.profile.to_record()
                    elif isinstance(output, LedgerEntry) and output.data["entry"] == "movement":
                        fold.movements[(output.customer_key, output.data["seq"])] = (
                            output.data["kind"], output.data["available_delta"], output.data["pending_delta"],
                            output.data["debt_delta"], output.data["occurred_ms"])
                    elif isinstance(output, SegmentChanged):
                        fold.segment_changes[(output.customer_key, output.data["seq"])] = (
                            output.data["from_segment"], output.data["to_segment"], output.data["occurred_ms"],
                            output.data["cause_type"])
                    elif isinstance(output, AlertChanged):
                        change = output.data
                        alerts[change["change_id"]] = (change["customer_key"], change["alert_id"], change["version"],
                                                       change["status"], change["alert_type"], change["occurred_at"])
                    elif isinstance(output, BalanceChanged):
                        fold.balances[output.customer_key] = (
                            output.data["version"], output.data["as_of_ms"], output.data["available"],
                            output.data["pending"], output.data["debt"], output.data["tier"],
                            output.data["expiring_soon"])
        # The whole log up to where it ended when the fold began, not a read cut short by a slow broker.
        positions = {tp: consumer.position(tp) for tp in partitions}
    finally:
        consumer.close()
    assert all(positions[tp] >= end[tp] for tp in partitions), (positions, end)
    fold.profiles = {key: (p["version"], p["as_of_ms"], p["purchase_count"], p["refund_count"],
                           p["spend_minor"].get("EUR", 0), p["spend_30d_minor"].get("EUR", 0),
                           p["last_offset"], p["lifecycle_stage"], p["points_available"], p["tier"])
                     for key, p in profiles.items()}
    fold.alerts = {change_id: (*fields[:5], int(datetime.fromisoformat(fields[5]).timestamp() * 1000))
                   for change_id, fields in alerts.items()}
    return fold


def wait_until_equal(stack: Any, projected: Any, expected: dict, what: str, timeout: float = 300) -> None:
    try:
        stack.wait_for(lambda: projected() == expected, timeout=timeout, what=f"{what} equal to the pure fold")
    except AssertionError:
        got = projected()
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        differ = [(k, got[k], expected[k]) for k in sorted(set(got) & set(expected)) if got[k] != expected[k]][:5]
        raise AssertionError(f"{what}: {len(got)} in ClickHouse, {len(expected)} expected; missing {missing}; "
                             f"extra {extra}; different (got, want) {differ}") from None


def assert_projections_equal_the_fold(stack: Any, prefix: str, fold: Fold, sent: list[dict[str, Any]]) -> None:
    """Every projection of the prefix in ClickHouse equals the pure fold (waiting up to 300 s for
    the writer to catch up), the event rows are exactly the events sent, and no ledger movement is
    in the table twice, even before merges."""
    p = {"p": prefix}

    def projected_profiles():
        rows = stack.query(
            "SELECT customer_key, version, toUnixTimestamp64Milli(as_of), purchase_count, refund_count, spend['EUR'], "
            "spend_30d['EUR'], source_offset, lifecycle_stage, points_available, tier "
            "FROM customer_profiles FINAL WHERE startsWith(customer_key, {p:String})", p)
        return {r[0]: (*r[1:5], int(r[5] * 100), int(r[6] * 100), *r[7:]) for r in rows}

    def projected_ledger():
        rows = stack.query(
            "SELECT customer_key, seq, kind, available_delta, pending_delta, debt_delta, "
            "toUnixTimestamp64Milli(occurred_at) FROM points_ledger FINAL WHERE startsWith(customer_key, {p:String})", p)
        return {(r[0], r[1]): tuple(r[2:]) for r in rows}

    def projected_balances():
        rows = stack.query(
            "SELECT customer_key, version, toUnixTimestamp64Milli(as_of), available, pending, debt, tier, expiring_soon "
            "FROM points_balances FINAL WHERE startsWith(customer_key, {p:String})", p)
        return {r[0]: tuple(r[1:]) for r in rows}

    def projected_segment_changes():
        rows = stack.query(
            "SELECT customer_key, seq, from_segment, to_segment, toUnixTimestamp64Milli(occurred_at), cause_type "
            "FROM segment_changes FINAL WHERE startsWith(customer_key, {p:String})", p)
        return {(r[0], r[1]): tuple(r[2:]) for r in rows}

    def projected_alerts():
        rows = stack.query(
            "SELECT toString(change_id), customer_key, toString(alert_id), version, status, alert_type, "
            "toUnixTimestamp64Milli(occurred_at) FROM churn_alerts FINAL WHERE startsWith(customer_key, {p:String})", p)
        return {r[0]: (*r[1:6], r[6]) for r in rows}

    wait_until_equal(stack, projected_profiles, fold.profiles, "profiles")
    ids = {r[0] for r in stack.query("SELECT toString(event_id) FROM events FINAL "
                                     "WHERE startsWith(customer_key, {p:String})", p)}
    assert ids == {b["event_id"] for b in sent}
    wait_until_equal(stack, projected_ledger, fold.movements, "ledger rows")
    wait_until_equal(stack, projected_balances, fold.balances, "balances")
    wait_until_equal(stack, projected_segment_changes, fold.segment_changes, "segment changes")
    wait_until_equal(stack, projected_alerts, fold.alerts, "alert changes")
    # No duplicate open alert: per customer and type, in log order (which the table equals), each
    # alert opens after the one before it closed.
    open_now: dict[tuple[str, str], str] = {}
    for customer, alert_id, _version, status, alert_type, _ in fold.alerts.values():
        if status == "opened":
            assert (customer, alert_type) not in open_now, f"two open {alert_type} alerts for {customer}"
            open_now[(customer, alert_type)] = alert_id
        elif status in ("resolved", "expired"):
            assert open_now.pop((customer, alert_type)) == alert_id
    # Nothing counted twice, nothing missing: no row beyond the pure fold's (FINAL or not).
    assert stack.query("SELECT count() FROM (SELECT DISTINCT customer_key, seq FROM points_ledger "
                       "WHERE startsWith(customer_key, {p:String}))", p)[0][0] == len(fold.movements)
