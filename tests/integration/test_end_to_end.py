"""Real events to the real broker, through the real worker, into ClickHouse rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

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


def wait_until_equal(stack, projected, expected: dict, what: str) -> None:
    try:
        stack.wait_for(lambda: projected() == expected, timeout=300, what=f"{what} equal to the pure fold")
    except AssertionError:
        got = projected()
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        differ = [(k, got[k], expected[k]) for k in sorted(set(got) & set(expected)) if got[k] != expected[k]][:5]
        raise AssertionError(f"{what}: {len(got)} in ClickHouse, {len(expected)} expected; missing {missing}; "
                             f"extra {extra}; different (got, want) {differ}") from None


def tick(partition: int, at: str) -> bytes:
    return encoded({"event_id": str(uuid.uuid4()), "type": "clock_ticked", "occurred_at": at, "partition": partition})


def test_projections_in_clickhouse_equal_the_pure_fold_over_the_log_after_a_worker_crash(stack):
    """SIGKILL the worker mid-stream, restart it, and compare every profile, event row, ledger
    movement, points balance, segment change and churn alert change in ClickHouse with
    `pipeline.process` run over the same records read back from the events topic. Clock ticks in the
    stream make points mature and expire, move quiet customers from stage to stage, and open and
    close churn alerts."""
    from streams.config import settings as crm_settings
    from streams.rulebooks import load_rulebooks
    from streams.pipeline import (
        AlertChanged, BalanceChanged, LedgerEntry, ProfileChanged, SegmentChanged, SourceRecord, load_customer,
        process,
    )

    prefix = f"crash-{uuid.uuid4().hex[:6]}"
    customers = [f"{prefix}-{n:03d}" for n in range(120)]
    kinds = ("purchase_completed", "product_viewed", "purchase_refunded", "daily_sign_in",
             "purchase_completed", "points_redemption_requested", "content_shared", "customer_registered")
    payloads = {
        "points_redemption_requested": lambda n: {"request_id": f"q-{n}", "reward_id": "voucher", "points": 100},
        "content_shared": lambda n: {"content_type": "product", "content_id": f"p-{n}"},
        "customer_registered": lambda n: {"birthday": f"1990-{1 + n % 12:02d}-15"},
    }
    sent = []
    for n in range(2400):
        # Every customer meets every kind of event, over four weeks of event time.
        customer = customers[n % len(customers)]
        kind = kinds[(n // len(customers) + n) % len(kinds)]
        extra = {"payload": payloads[kind](n)} if kind in payloads else {}
        occurred = datetime(2026, 2, 1, tzinfo=UTC) + timedelta(minutes=10 * n)
        body = event(kind, customer_id=customer, occurred_at=occurred.isoformat(), **extra)
        sent.append(body)
        stack.send(customer.encode(), encoded(body))
        if n % 10 == 3:  # a producer retry
            stack.send(customer.encode(), encoded(body))
        if n in (600, 1500, 2399):  # time passes: points mature, later some expire
            at = {600: "2026-02-18T00:00:00+00:00", 1500: "2026-03-01T00:00:00+00:00",
                  2399: "2027-03-10T00:00:00+00:00"}[n]
            for partition in range(topics.EVENT_PARTITIONS):
                stack.send(b"clock", tick(partition, at), partition=partition)
    stack.flush()

    def rows_for_prefix() -> int:
        return stack.query("SELECT count() FROM events FINAL WHERE startsWith(customer_key, {p:String})",
                           {"p": prefix})[0][0]

    stack.wait_for(lambda: rows_for_prefix() > 200, what="the worker to be part-way through")
    stack.worker.kill()
    partway = rows_for_prefix()
    stack.worker.start()
    stack.wait_for(lambda: rows_for_prefix() == len(sent), timeout=1500, what="all events after the restart")

    # The pure function over the same log: this test's customers and every clock tick.
    rules = load_rulebooks(crm_settings())
    consumer = KafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=5000, max_poll_records=5000)
    partitions = [TopicPartition(topics.EVENTS.name, p) for p in range(topics.EVENT_PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    store, seen = {}, {}
    movements, balances, segment_changes, profiles, alerts = {}, {}, {}, {}, {}
    for message in consumer:
        if message.key and (message.key.startswith(prefix.encode()) or message.key == b"clock"):
            record = SourceRecord(message.key, message.value, message.partition, message.offset,
                                  message.timestamp, message.topic)
            for output in process(record, store, seen, rules):
                if isinstance(output, ProfileChanged):
                    profiles[output.profile.customer_key] = output.profile.to_record()
                elif isinstance(output, LedgerEntry) and output.data["entry"] == "movement":
                    movements[(output.customer_key, output.data["seq"])] = (
                        output.data["kind"], output.data["available_delta"], output.data["pending_delta"],
                        output.data["debt_delta"], output.data["occurred_ms"])
                elif isinstance(output, SegmentChanged):
                    segment_changes[(output.customer_key, output.data["seq"])] = (
                        output.data["from_segment"], output.data["to_segment"], output.data["occurred_ms"],
                        output.data["cause_type"])
                elif isinstance(output, AlertChanged):
                    change = output.data
                    alerts[change["change_id"]] = (change["customer_key"], change["alert_id"], change["version"],
                                                   change["status"], change["alert_type"], change["occurred_at"])
                elif isinstance(output, BalanceChanged):
                    balances[output.customer_key] = (output.data["version"], output.data["as_of_ms"],
                                                     output.data["available"], output.data["pending"],
                                                     output.data["debt"], output.data["tier"],
                                                     output.data["expiring_soon"])
    consumer.close()
    states = {key: load_customer(store, key) for key in customers}
    assert all(states.values())
    assert {kind for kind, *_ in movements.values()} >= {"earned_pending", "made_available", "redeemed", "expired"}

    assert {to for _, to, _, _ in segment_changes.values()} >= {"new", "active", "dormant", "lost"}
    want_profiles = {key: (p["version"], p["as_of_ms"], p["purchase_count"], p["refund_count"],
                           p["spend_minor"].get("EUR", 0), p["spend_30d_minor"].get("EUR", 0),
                           p["last_offset"], p["lifecycle_stage"], p["points_available"], p["tier"])
                     for key, p in profiles.items()}

    def projected_profiles():
        rows = stack.query(
            "SELECT customer_key, version, toUnixTimestamp64Milli(as_of), purchase_count, refund_count, spend['EUR'], "
            "spend_30d['EUR'], source_offset, lifecycle_stage, points_available, tier "
            "FROM customer_profiles FINAL WHERE startsWith(customer_key, {p:String})", {"p": prefix})
        return {r[0]: (*r[1:5], int(r[5] * 100), int(r[6] * 100), *r[7:]) for r in rows}

    def projected_ledger():
        rows = stack.query(
            "SELECT customer_key, seq, kind, available_delta, pending_delta, debt_delta, "
            "toUnixTimestamp64Milli(occurred_at) FROM points_ledger FINAL WHERE startsWith(customer_key, {p:String})",
            {"p": prefix})
        return {(r[0], r[1]): tuple(r[2:]) for r in rows}

    def projected_balances():
        rows = stack.query(
            "SELECT customer_key, version, toUnixTimestamp64Milli(as_of), available, pending, debt, tier, expiring_soon "
            "FROM points_balances FINAL WHERE startsWith(customer_key, {p:String})", {"p": prefix})
        return {r[0]: tuple(r[1:]) for r in rows}

    wait_until_equal(stack, projected_profiles, want_profiles, "profiles")
    ids = {r[0] for r in stack.query("SELECT toString(event_id) FROM events FINAL "
                                     "WHERE startsWith(customer_key, {p:String})", {"p": prefix})}
    assert ids == {b["event_id"] for b in sent}
    assert 0 < partway  # the crash really happened mid-stream
    wait_until_equal(stack, projected_ledger, movements, "ledger rows")
    wait_until_equal(stack, projected_balances, balances, "balances")

    def projected_segment_changes():
        rows = stack.query(
            "SELECT customer_key, seq, from_segment, to_segment, toUnixTimestamp64Milli(occurred_at), cause_type "
            "FROM segment_changes FINAL WHERE startsWith(customer_key, {p:String})", {"p": prefix})
        return {(r[0], r[1]): tuple(r[2:]) for r in rows}

    wait_until_equal(stack, projected_segment_changes, segment_changes, "segment changes")
    def projected_alerts():
        rows = stack.query(
            "SELECT toString(change_id), customer_key, toString(alert_id), version, status, alert_type, "
            "toUnixTimestamp64Milli(occurred_at) FROM churn_alerts FINAL WHERE startsWith(customer_key, {p:String})",
            {"p": prefix})
        return {r[0]: (*r[1:6], r[6]) for r in rows}

    want_alerts = {change_id: (*fields[:5], int(datetime.fromisoformat(fields[5]).timestamp() * 1000))
                   for change_id, fields in alerts.items()}
    assert {fields[3] for fields in want_alerts.values()} >= {"opened", "resolved"}
    wait_until_equal(stack, projected_alerts, want_alerts, "alert changes")
    # No duplicate open alert: per customer and type, in log order (which the table equals), each
    # alert opens after the one before it closed.
    open_now: dict[tuple[str, str], str] = {}
    for customer, alert_id, version, status, alert_type, _ in want_alerts.values():
        if status == "opened":
            assert (customer, alert_type) not in open_now, f"two open {alert_type} alerts for {customer}"
            open_now[(customer, alert_type)] = alert_id
        elif status in ("resolved", "expired"):
            assert open_now.pop((customer, alert_type)) == alert_id
    # Nothing counted twice, nothing missing: no row beyond the pure fold's (FINAL or not).
    assert stack.query("SELECT count() FROM (SELECT DISTINCT customer_key, seq FROM points_ledger "
                       "WHERE startsWith(customer_key, {p:String}))", {"p": prefix})[0][0] == len(movements)


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
