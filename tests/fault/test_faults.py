"""Faults that operators meet, each struck while events flow: the platform rides each out, heals, and
then every projection equals the pure fold over the log (0 lost, 0 doubled), and every alert reaches
a webhook subscriber that was down for ten minutes once, in order.

The scenarios share one stack (conftest.py) and run in this file's order; each has its own customers
and its own stretch of event time, later than the one before, so that its clock ticks move time. The
subscriber is down from the start of the suite until the last test."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.alerts.dispatch import RetryPolicy
from tests.factories import event
from tests.fault.conftest import SUBSCRIBER_DOWN_SECONDS, FaultStack, report
from tests.integration.fold_check import Workload, assert_projections_equal_the_fold, event_rows, pure_fold

pytestmark = pytest.mark.integration

CUSTOMERS, EVENTS = 40, 600
CHUNK, PAUSE = 30, 0.5  # the flow: 30 events every half second, about ten seconds in all


def _start(scenario: int) -> datetime:
    return datetime(2025, 1, 1, tzinfo=UTC) + timedelta(days=45 * scenario)


class Flow:
    """A scenario's workload (fold_check.Workload: every kind of event, resends, clock ticks that
    mature and expire points and open churn alerts) sent in chunks from a thread, so that a fault
    strikes while events flow. A producer that cannot reach Kafka waits and retries, as a real one."""

    def __init__(self, stack: FaultStack, scenario: int, events: int = EVENTS):
        self.prefix = f"f{scenario}-{uuid.uuid4().hex[:6]}"
        start = _start(scenario)
        self.workload = Workload(stack, self.prefix, customers=CUSTOMERS, start=start,
                                 ticks={events // 3: start + timedelta(days=17), events - 1: start + timedelta(days=30)})
        self.events = events
        self.thread = threading.Thread(target=self._send, name=f"flow {self.prefix}", daemon=True)
        self.error: BaseException | None = None

    def _send(self) -> None:
        try:
            while len(self.workload.sent) < self.events:
                self.workload.send(min(CHUNK, self.events - len(self.workload.sent)))
                time.sleep(PAUSE)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def start(self) -> Flow:
        self.thread.start()
        return self

    def until_sent(self, fraction: float) -> None:
        while len(self.workload.sent) < fraction * self.events and self.thread.is_alive():
            time.sleep(0.1)

    def join(self, timeout: float = 600) -> list[dict[str, Any]]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the flow did not finish"
        if self.error is not None:
            raise self.error
        return self.workload.sent


def settle(stack: FaultStack, scenario: str, prefix: str, sent: list[dict[str, Any]], healed_at: float,
           **figures: Any) -> None:
    """Wait for every part to catch up, compare every projection with the pure fold, and report."""
    for part in (stack.worker, stack.writer, stack.alerts, stack.api):
        assert part.running, f"{part.command[0]} is not running; log: {part.log_path}"
    fold = pure_fold(stack, prefix)
    assert_projections_equal_the_fold(stack, prefix, fold, sent)
    caught_up = time.monotonic() - healed_at
    p = {"p": prefix}
    ids = {row[0] for row in stack.query(
        "SELECT toString(event_id) FROM events FINAL WHERE startsWith(customer_key, {p:String})", p)}
    rows, final_rows = stack.query(
        "SELECT (SELECT count() FROM events WHERE startsWith(customer_key, {p:String})), "
        "(SELECT count() FROM events FINAL WHERE startsWith(customer_key, {p:String}))", p)[0]
    ledger = stack.query("SELECT count() FROM points_ledger FINAL WHERE startsWith(customer_key, {p:String})", p)[0][0]
    report(scenario, events_sent=len(sent), lost=len({e["event_id"] for e in sent} - ids),
           doubled=(final_rows - len(ids)) + (ledger - len(fold.movements)),
           rows_inserted_again_and_collapsed=rows - final_rows, alert_changes=len(fold.alerts),
           seconds_to_catch_up=round(caught_up, 1), **figures)


# --- the broker -------------------------------------------------------------------------------------

class ApiClient:
    """A POS-like client of the ingestion API: sends its events one by one, waits out a 503 for its
    Retry-After and sends the same event again; `acknowledged` holds what the API said it stored."""

    def __init__(self, stack: FaultStack, prefix: str, start: datetime, events: int = 60):
        self.stack, self.events = stack, [
            event("daily_sign_in", customer_id=f"{prefix}-api-{n % 10}",
                  occurred_at=(start + timedelta(minutes=7 * n)).isoformat()) for n in range(events)]
        self.acknowledged: list[dict[str, Any]] = []
        self.refusals: Counter[int] = Counter()
        self.thread = threading.Thread(target=self._send, name="api client", daemon=True)

    def _send(self) -> None:
        headers = {"Authorization": f"Bearer {self.stack.api_key}"}
        for body in self.events:
            while True:
                try:
                    answer = httpx.post(f"{self.stack.api_url}/v1/events", json=body, headers=headers, timeout=60)
                except httpx.TransportError:
                    time.sleep(1)
                    continue
                if answer.status_code < 300:
                    self.acknowledged.append(body)
                    break
                assert answer.status_code == 503, answer.text
                assert "retry-after" in answer.headers
                self.refusals[answer.status_code] += 1
                time.sleep(min(5.0, float(answer.headers["retry-after"])))
            time.sleep(0.2)


def test_the_broker_killed_mid_stream_and_restarted_loses_nothing_and_doubles_nothing(fault_stack):
    stack = fault_stack
    flow = Flow(stack, 1).start()
    client = ApiClient(stack, flow.prefix, _start(1))
    client.thread.start()
    flow.until_sent(0.3)
    stack.kill_broker()
    killed_at = time.monotonic()
    # While Kafka is down the API answers 503 with Retry-After, never 2xx for an event it did not store.
    probe = event("daily_sign_in", customer_id=f"{flow.prefix}-api-probe", occurred_at=_start(1).isoformat())
    answer = httpx.post(f"{stack.api_url}/v1/events", json=probe,
                        headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=90)
    assert answer.status_code == 503, answer.text
    assert int(answer.headers["retry-after"]) > 0
    time.sleep(max(0.0, 30 - (time.monotonic() - killed_at)))  # down for 30 s
    stack.start_broker()
    healed_at = time.monotonic()
    down = healed_at - killed_at
    sent = flow.join()
    client.thread.join(600)
    assert not client.thread.is_alive()
    # The probe's client sends it again, as the 503 told it to.
    stack.wait_for(lambda: httpx.post(f"{stack.api_url}/v1/events", json=probe, timeout=60,
                                      headers={"Authorization": f"Bearer {stack.api_key}"}).status_code < 300,
                   timeout=120, what="the API to accept the probe again")
    settle(stack, "broker SIGKILLed for 30 s", flow.prefix, [*sent, *client.acknowledged, probe], healed_at,
           broker_down_seconds=round(down, 1), api_events=len(client.acknowledged) + 1,
           api_503_answers=client.refusals[503] + 1)


# --- the projection writer and ClickHouse -------------------------------------------------------------

def test_the_projection_writer_down_for_a_minute_catches_up_exactly(fault_stack):
    stack = fault_stack
    flow = Flow(stack, 2).start()
    flow.until_sent(0.3)
    stack.writer.stop()
    stopped_at = time.monotonic()
    time.sleep(60)
    stack.writer.start()
    healed_at = time.monotonic()
    settle(stack, "projection writer down for 60 s", flow.prefix, flow.join(), healed_at,
           writer_down_seconds=round(healed_at - stopped_at, 1))


def test_the_projection_writer_killed_in_the_middle_of_a_batch_inserts_it_again_exactly(fault_stack):
    stack = fault_stack
    stack.writer.stop()
    crashing = stack.writer.variant(stack.state_dir / "logs" / "writer-crashing.log",
                                    CRM_FAILPOINTS="writer.table_inserted=4")
    flow = Flow(stack, 3)
    try:
        crashing.start()
        flow.start()
        assert crashing.wait_until_dead(timeout=300) == -9, f"log: {crashing.log_path}"
    finally:
        crashing.stop()
        stack.writer.start()
    healed_at = time.monotonic()
    settle(stack, "projection writer SIGKILLed between two tables' inserts", flow.prefix, flow.join(), healed_at)


def test_clickhouse_refusing_inserts_for_a_while_delays_rows_and_skips_none(fault_stack):
    stack = fault_stack
    flow = Flow(stack, 4).start()
    flow.until_sent(0.3)
    stack.refuse_inserts.touch()
    refused_at = time.monotonic()
    try:
        time.sleep(30)
        assert stack.writer.running
        # Reads go on while inserts are refused: analysts see the data as of the refusal.
        projected = event_rows(stack, flow.prefix)
        assert projected < flow.events, "the refusal came after every row was in"
    finally:
        stack.refuse_inserts.unlink()
    healed_at = time.monotonic()
    refusals = stack.writer.log_path.read_text(errors="replace").count("Code: 243.")  # NOT_ENOUGH_SPACE
    assert refusals > 0, "the engine never refused an insert"
    settle(stack, "ClickHouse refusing inserts (no disk space) for 30 s", flow.prefix, flow.join(), healed_at,
           refusing_seconds=round(healed_at - refused_at, 1), refused_inserts_logged=refusals)


# --- the workers --------------------------------------------------------------------------------------

def test_workers_killed_during_a_rebalance_and_both_killed_lose_nothing_and_double_nothing(fault_stack):
    stack = fault_stack
    second = stack.worker.variant(stack.state_dir / "logs" / "worker-2.log",
                                  CRM_STATE_DIR=str(stack.state_dir / "worker-2"))
    flow = Flow(stack, 5, events=900).start()
    try:
        flow.until_sent(0.2)
        second.start()          # the group rebalances to give it half the partitions ...
        time.sleep(4)
        second.kill()           # ... and it dies while that is under way
        flow.until_sent(0.5)
        second.start()
        time.sleep(20)          # both fold now
        stack.worker.kill()
        second.kill()
        stack.worker.start()
        second.start()
        healed_at = time.monotonic()
        sent = flow.join()
        settle(stack, "one of two workers killed mid-rebalance, then both killed and restarted", flow.prefix,
               sent, healed_at)
    finally:
        second.stop()


def test_a_worker_whose_state_directory_was_deleted_rebuilds_it_from_the_changelog(fault_stack):
    stack = fault_stack
    first = Flow(stack, 6)
    first.workload.send(EVENTS // 2)
    stack.wait_for(lambda: event_rows(stack, first.prefix) == len(first.workload.sent), what="the first half")
    stack.worker.stop()
    state = stack.state_dir / "worker" / "state"
    assert state.is_dir()
    shutil.rmtree(state)
    stack.worker.start()
    healed_at = time.monotonic()
    first.workload.send(EVENTS - EVENTS // 2)
    settle(stack, "worker state directory deleted while stopped", first.prefix, first.workload.sent, healed_at)
    assert state.is_dir()


# --- alert subscribers ----------------------------------------------------------------------------------

def test_a_webhook_subscriber_down_for_ten_minutes_gets_every_alert_once_and_in_order(fault_stack):
    stack = fault_stack
    subscriber = stack.subscriber
    assert RetryPolicy.from_settings(stack.settings).guaranteed_window() > SUBSCRIBER_DOWN_SECONDS + 60
    flow = Flow(stack, 7)  # alerts of its own, should this test run alone
    flow.workload.send(EVENTS)
    settle(stack, "alerts while the subscriber is down", flow.prefix, flow.workload.sent, time.monotonic())
    assert subscriber.down_since is not None and not subscriber.deliveries
    time.sleep(max(0.0, subscriber.down_since + SUBSCRIBER_DOWN_SECONDS - time.monotonic()))
    down = time.monotonic() - subscriber.down_since
    subscriber.up()
    back_at = time.monotonic()

    expected = pure_fold(stack, "").alerts  # every customer's alert changes, in log order
    assert len(expected) > 50, "too few alerts for the test to mean anything"
    stack.wait_for(lambda: len({d.change_id for d in subscriber.deliveries}) >= len(expected), timeout=300,
                   what=f"{len(expected)} alert deliveries")
    time.sleep(5)  # anything sent twice would arrive by now
    delivered = [d.change_id for d in subscriber.deliveries]
    assert set(delivered) == set(expected)
    twice = [change for change, n in Counter(delivered).items() if n > 1]
    assert not twice, f"{len(twice)} alerts delivered more than once"
    for customer in {fields[0] for fields in expected.values()}:
        in_log = [change for change, fields in expected.items() if fields[0] == customer]
        assert [d.change_id for d in subscriber.deliveries if d.customer_key == customer] == in_log, customer
    report("webhook subscriber down", subscriber_down_seconds=round(down, 1), alert_changes=len(expected),
           delivered=len(delivered), delivered_twice=len(twice), lost=len(set(expected) - set(delivered)),
           seconds_to_deliver_all=round(time.monotonic() - back_at - 5, 1))
