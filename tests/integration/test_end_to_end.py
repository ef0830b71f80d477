"""Real events to the real broker, through the real worker, into ClickHouse rows."""

from __future__ import annotations

import uuid

from kafka import KafkaConsumer, TopicPartition

from streams import topics
from tests.factories import encoded, event


def unique_customer(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_valid_events_become_event_rows_and_a_profile(stack):
    customer = unique_customer("e2e")
    bodies = [
        event("customer_registered", customer_id=customer, occurred_at="2026-01-05T09:00:00+00:00"),
        event(customer_id=customer, occurred_at="2026-01-06T12:00:00+00:00"),
        event(customer_id=customer, occurred_at="2026-01-20T12:00:00+00:00",
              source={"channel": "pos", "store_id": "store-2", "terminal_id": "t-9"}),
        event("purchase_refunded", customer_id=customer, occurred_at="2026-01-21T08:00:00+00:00"),
        event("product_viewed", customer_id=customer, occurred_at="2026-01-22T08:00:00+00:00"),
    ]
    for body in bodies:
        stack.send(customer.encode(), encoded(body))
    stack.flush()

    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE customer_key = {c:String}",
                                       {"c": customer})[0][0] == 5, what="5 event rows")
    rows = stack.query("SELECT type, store_id, amount, currency FROM events FINAL WHERE customer_key = {c:String} "
                       "ORDER BY occurred_at", {"c": customer})
    assert [r[0] for r in rows] == ["customer_registered", "purchase_completed", "purchase_completed",
                                    "purchase_refunded", "product_viewed"]
    assert [str(r[2]) for r in rows] == ["0.00", "7.00", "7.00", "2.00", "0.00"]

    profile = stack.wait_for(lambda: stack.query(
        "SELECT purchase_count, refund_count, spend['EUR'], toString(first_seen), toString(last_seen), "
        "toString(last_purchase_at), channels, stores, version FROM customer_profiles FINAL "
        "WHERE customer_key = {c:String} AND version = 5", {"c": customer}), what="profile version 5")[0]
    assert profile[:3] == (2, 1, profile[2])
    assert str(profile[2]) == "12.00"
    assert profile[3:6] == ("2026-01-05 09:00:00.000", "2026-01-22 08:00:00.000", "2026-01-20 12:00:00.000")
    assert profile[6] == ["app", "pos"]
    assert profile[7] == ["store-1", "store-2"]


def test_bad_input_goes_to_the_dead_letter_topic_and_table_and_the_worker_keeps_going(stack):
    customer = unique_customer("dlq")
    bad = {
        "malformed_json": b'{"type": "purchase_completed", "event_id": ',
        "unknown_type": encoded(event("loyalty_teleported", customer_id=customer)),
        "schema_invalid": encoded(event(customer_id=customer, occurred_at="2026-01-05T09:00:00")),
    }
    for raw in bad.values():
        stack.send(customer.encode(), raw)
    after = event("daily_sign_in", customer_id=customer)
    stack.send(customer.encode(), encoded(after))
    stack.flush()

    stack.wait_for(lambda: stack.query("SELECT count() FROM dead_letters FINAL WHERE record_key = {c:String}",
                                       {"c": customer})[0][0] == 3, what="3 dead letters")
    rows = stack.query("SELECT reason, hex(original), detail FROM dead_letters FINAL WHERE record_key = {c:String}",
                       {"c": customer})
    # The original bytes, byte for byte.
    assert {reason: bytes.fromhex(original) for reason, original, _ in rows} == bad
    assert {reason: detail for reason, _, detail in rows}["schema_invalid"].startswith("occurred_at")
    # The event after the bad ones was processed: the worker did not stop.
    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE event_id = {e:UUID}",
                                       {"e": after["event_id"]})[0][0] == 1, what="the event after the bad input")

    # The dead-letter topic carries the same: original bytes as the value, reason and position as headers.
    consumer = KafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=3000)
    partition = TopicPartition(topics.DEAD_LETTERS.name, 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    letters = [m for m in consumer if m.key == customer.encode()]
    consumer.close()
    assert sorted(m.value for m in letters) == sorted(bad.values())
    for message in letters:
        headers = dict(message.headers)
        assert headers["crm.dlq.reason"].decode() in bad
        assert headers["crm.dlq.source.topic"] == b"crm.events"
        assert int(headers["crm.dlq.source.offset"]) >= 0


def test_an_event_delivered_twice_changes_nothing(stack):
    customer = unique_customer("dup")
    purchase = event(customer_id=customer)
    stack.send(customer.encode(), encoded(purchase))
    stack.send(customer.encode(), encoded({**purchase, "received_at": "2026-03-01T10:05:00+00:00"}))  # a retry
    marker = event("daily_sign_in", customer_id=customer)
    stack.send(customer.encode(), encoded(marker))
    stack.flush()

    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE event_id = {e:UUID}",
                                       {"e": marker["event_id"]})[0][0] == 1, what="the marker event")
    profile = stack.wait_for(lambda: stack.query(
        "SELECT purchase_count, spend['EUR'], version FROM customer_profiles FINAL WHERE customer_key = {c:String}",
        {"c": customer}), what="the profile")
    assert profile == [(1, profile[0][1], 2)] and str(profile[0][1]) == "7.00"
    # Not even before merges: the duplicate never reached the events table.
    assert stack.query("SELECT count() FROM events WHERE customer_key = {c:String}", {"c": customer})[0][0] == 2


def test_profiles_in_clickhouse_equal_the_pure_fold_over_the_log_after_a_worker_crash(stack):
    """SIGKILL the worker mid-stream, restart it, and compare every profile and event row in ClickHouse
    with `pipeline.process` run over the same records read back from the events topic."""
    from streams.pipeline import SourceRecord, process

    prefix = f"crash-{uuid.uuid4().hex[:6]}"
    customers = [f"{prefix}-{n:03d}" for n in range(200)]
    sent = []
    for n in range(4000):
        customer = customers[(n * 7919) % len(customers)]
        kind = ("purchase_completed", "product_viewed", "purchase_refunded", "daily_sign_in")[n % 4]
        body = event(kind, customer_id=customer, occurred_at=f"2026-02-{1 + n % 28:02d}T{n % 24:02d}:00:00+00:00")
        sent.append(body)
        stack.send(customer.encode(), encoded(body))
        if n % 10 == 3:  # a producer retry
            stack.send(customer.encode(), encoded(body))
    stack.flush()

    def rows_for_prefix() -> int:
        return stack.query("SELECT count() FROM events FINAL WHERE startsWith(customer_key, {p:String})",
                           {"p": prefix})[0][0]

    stack.wait_for(lambda: rows_for_prefix() > 200, what="the worker to be part-way through")
    stack.worker.kill()
    partway = rows_for_prefix()
    stack.worker.start()
    stack.wait_for(lambda: rows_for_prefix() == len(sent), timeout=600, what="all events after the restart")

    # The pure function over the same log.
    consumer = KafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=5000, max_poll_records=5000)
    partitions = [TopicPartition(topics.EVENTS.name, p) for p in range(topics.EVENT_PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    profiles, seen = {}, {}
    for message in consumer:
        if message.key and message.key.startswith(prefix.encode()):
            process(SourceRecord(message.key, message.value, message.partition, message.offset,
                                 message.timestamp, message.topic), profiles, seen)
    consumer.close()

    expected = {key: p for key, p in profiles.items()}
    assert len(expected) == len(customers)

    def projected():
        rows = stack.query(
            "SELECT customer_key, version, purchase_count, refund_count, spend['EUR'], source_offset "
            "FROM customer_profiles FINAL WHERE startsWith(customer_key, {p:String})", {"p": prefix})
        return {r[0]: r[1:] for r in rows}

    want = {key: (p.version, p.purchase_count, p.refund_count, p.spend_minor.get("EUR", 0), p.last_offset)
            for key, p in expected.items()}
    got = stack.wait_for(lambda: (lambda rows: rows if {k: (v[0], v[1], v[2], int(v[3] * 100), v[4])
                                                        for k, v in rows.items()} == want else None)(projected()),
                         timeout=60, what="profiles equal to the pure fold")
    assert len(got) == len(customers)
    ids = {r[0] for r in stack.query("SELECT toString(event_id) FROM events FINAL "
                                     "WHERE startsWith(customer_key, {p:String})", {"p": prefix})}
    assert ids == {b["event_id"] for b in sent}
    assert 0 < partway  # the crash really happened mid-stream
