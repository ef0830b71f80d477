"""Real events to the real broker, through the real worker, into ClickHouse rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from kafka import KafkaConsumer, TopicPartition

from streams import topics
from tests.factories import encoded, event, test_key
from tests.integration.fold_check import assert_projections_equal_the_fold, event_rows, pure_fold, send_workload


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


def test_projections_in_clickhouse_equal_the_pure_fold_over_the_log_after_a_worker_crash(stack):
    """SIGKILL the worker mid-stream, restart it, and compare every profile, event row, ledger
    movement, points balance, segment change and churn alert change in ClickHouse with
    `pipeline.process` run over the same records read back from the events topic. Clock ticks in the
    stream make points mature and expire, move quiet customers from stage to stage, and open and
    close churn alerts."""
    prefix = f"crash-{uuid.uuid4().hex[:6]}"
    sent = send_workload(stack, prefix, customers=120, events=2400, start=datetime(2026, 2, 1, tzinfo=UTC),
                         ticks={600: datetime(2026, 2, 18, tzinfo=UTC), 1500: datetime(2026, 3, 1, tzinfo=UTC),
                                2399: datetime(2027, 3, 10, tzinfo=UTC)})

    stack.wait_for(lambda: event_rows(stack, prefix) > 200, what="the worker to be part-way through")
    stack.worker.kill()
    partway = event_rows(stack, prefix)
    stack.worker.start()
    stack.wait_for(lambda: event_rows(stack, prefix) == len(sent), timeout=1500, what="all events after the restart")

    fold = pure_fold(stack, prefix)
    assert all(fold.customer(f"{prefix}-{n:03d}") for n in range(120))
    assert {kind for kind, *_ in fold.movements.values()} >= {"earned_pending", "made_available", "redeemed", "expired"}
    assert {to for _, to, _, _ in fold.segment_changes.values()} >= {"new", "active", "dormant", "lost"}
    assert {fields[3] for fields in fold.alerts.values()} >= {"opened", "resolved"}
    assert 0 < partway  # the crash really happened mid-stream
    assert_projections_equal_the_fold(stack, prefix, fold, sent)


def test_the_loyalty_sql_in_the_docs_runs_and_balances_equal_their_movements(stack):
    """Every query in docs/loyalty.md runs against the live tables (filled by the tests before this
    one); the last one lists members whose balance differs from the sum of their movements: none."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "loyalty.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    statements = [s.strip() for block in blocks for s in block.split(";") if s.strip()]
    assert len(statements) >= 7
    assert stack.query("SELECT count() FROM points_ledger")[0][0] > 0
    # The writer inserts ledger and balance batches separately: let it settle, then run them all.
    stack.wait_for(lambda: stack.query(statements[-1]) == [], timeout=120,
                   what="every balance equal to the sum of its movements")
    results = [stack.query(statement) for statement in statements]
    assert results[-1] == []
    assert results[0][0][0] >= 0  # liability: available points


def test_the_segment_sql_in_the_docs_runs_and_agrees_with_the_profiles(stack):
    """Every query in docs/segments.md runs; customers per stage from the change history (each
    customer's last change) equal the stages in the profiles."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "segments.md").read_text()
    statements = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    assert len(statements) >= 4
    for statement in statements:
        stack.query(statement)
    by_history = "SELECT argMax(to_segment, seq) AS stage, customer_key FROM segment_changes FINAL " \
                 "WHERE dimension = 'lifecycle' GROUP BY customer_key"
    stack.wait_for(lambda: dict((k, s) for s, k in stack.query(by_history)) == dict(stack.query(
        "SELECT customer_key, lifecycle_stage FROM customer_profiles FINAL WHERE lifecycle_stage != ''")),
        timeout=120, what="the last change of every customer equal to the stage in the profile")


def test_an_erasure_request_in_the_log_shreds_the_keys_wipes_the_profile_and_is_recorded(stack):
    customer = unique_customer("erase")
    registered = event("customer_registered", customer_id=customer, occurred_at="2026-02-01T09:00:00+00:00",
                       identifiers={"loyalty_card": f"card-{customer}"})
    bought = event(customer_id=customer, occurred_at="2026-02-02T12:00:00+00:00")
    request = event("customer_erasure_requested", customer_id=customer, occurred_at="2026-02-10T09:00:00+00:00",
                    source={"channel": "service"}, payload={"request_id": f"req-{customer}", "requested_by": "dpo"})
    for body in (registered, bought, request):
        stack.send(customer.encode(), encoded(body))
    stack.flush()
    key_id = test_key(customer)[0]

    row = stack.wait_for(lambda: stack.query(
        "SELECT request_id, data_keys_shredded, aliases_unlinked, points_forfeited FROM erasures FINAL "
        "WHERE customer_key = {c:String}", {"c": customer}), what="the erasures row")[0]
    assert row == (f"req-{customer}", [key_id], [f"loyalty_card:card-{customer}"], row[3]) and row[3] > 0
    profile = stack.wait_for(lambda: stack.query(
        "SELECT contact, aliases, marketing_consent, purchase_count, points_available + points_pending "
        "FROM customer_profiles FINAL WHERE customer_key = {c:String} AND erased_at IS NOT NULL",
        {"c": customer}), what="the erased profile")[0]
    assert profile == ([], [], [], 1, 0)
    forfeited = stack.wait_for(lambda: stack.query(
        "SELECT reason, available_delta + pending_delta FROM points_ledger FINAL "
        "WHERE customer_key = {c:String} AND kind = 'forfeited'", {"c": customer}), what="the forfeit movement")
    assert forfeited == [("erasure", -row[3])]

    # The data key's tombstone is in crm.customer-keys.
    consumer = KafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=5000)
    partitions = [TopicPartition(topics.CUSTOMER_KEYS.name, p) for p in range(topics.CUSTOMER_KEYS.partitions)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    tombstones = [r for r in consumer if r.key == key_id.encode() and r.value is None]
    consumer.close()
    assert tombstones
