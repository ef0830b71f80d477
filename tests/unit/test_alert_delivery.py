"""Webhook delivery (services/alerts/dispatch.py) against real HTTP receivers on 127.0.0.1: retries
until a flaky receiver recovers, per-customer order, signatures, dead letters and redelivery, a slow
receiver that must not hold up a healthy one, and pending deliveries that survive a restart.

No Kafka: the tests write the alert log themselves. Backoffs are tens of milliseconds, so a test takes
about a second. `Receiver` and `alert` are shared with the other alert tests."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

from schemas.alerts import Action, AlertChange, Cause, Reason
from services.alerts.dispatch import Dispatcher, RetryPolicy
from services.alerts.filters import Filters
from services.alerts.service import AlertService
from services.alerts.signing import verify
from services.alerts.store import DEAD, DELIVERED, PENDING, AlertStore, Subscription
from streams.config import Settings

FAST = RetryPolicy(max_attempts=8, base_seconds=0.02, cap_seconds=0.1)


def alert(customer: str = "cust-1", *, alert_type: str = "churn_risk", severity: str = "high",
          store_id: str = "store-1", segments: Iterable[str] = ("value_tier:high", "rfm:champions"),
          version: int = 1, alert_id: uuid.UUID | None = None) -> AlertChange:
    at = datetime(2026, 3, 1, 10, tzinfo=UTC)
    return AlertChange(
        change_id=uuid.uuid4(), alert_id=alert_id or uuid.uuid4(), version=version,
        status="opened" if version == 1 else "updated", alert_type=alert_type, customer_key=customer,
        customer_id=customer, severity=severity, severity_score=2.5,
        reasons=[Reason(code="purchase_gap", evidence={"days_since_last": 41, "usual_gap_days": 9})],
        action=Action(kind="coupon", channel="email", note="a high-value customer going quiet"),
        value_tier="high", segments=list(segments), store_id=store_id, p_alive=0.31, opened_at=at, occurred_at=at,
        cause=Cause(type="time"), rules_version="test")


def encoded(value: AlertChange | dict) -> bytes:
    return value.model_dump_json().encode() if isinstance(value, AlertChange) else orjson.dumps(value)


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    status: int
    at: float

    @property
    def change_id(self) -> str:
        return self.headers["x-crm-change-id"]


class _QuietServer(ThreadingHTTPServer):
    block_on_close = False    # stop() must not wait for a request held by `delay`

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A sender that stops mid-request (the tests stop the dispatcher at any moment) resets its
        # connection; that is expected here, not worth a traceback.
        pass


class Receiver:
    """A webhook receiver: a real HTTP server on a free 127.0.0.1 port, in a thread. It answers
    `fail_status` to its first `fail_first` requests (with Retry-After if given), always fails the
    change_ids in `poison`, and holds each request `delay` seconds (until stop() at most)."""

    def __init__(self, fail_first: int = 0, fail_status: int = 500, retry_after: str | None = None,
                 delay: float = 0.0, poison: Iterable[str] = ()):
        self.fail_first, self.fail_status, self.retry_after = fail_first, fail_status, retry_after
        self.delay, self.poison = delay, set(poison)
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # keep-alive, as real receivers do

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if len(body) < length:
                    return      # the sender stopped mid-request (a test stopping the service): nothing arrived
                with receiver.lock:
                    failing = len(receiver.requests) < receiver.fail_first
                    status = receiver.fail_status if failing else 200
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    if headers.get("x-crm-change-id") in receiver.poison:
                        status = 500
                    receiver.requests.append(Received(headers, body, status, time.monotonic()))
                if receiver.delay:
                    receiver._released.wait(receiver.delay)
                answer = b'{"ok":true}' if status < 300 else b'{"error":"planned failure"}'
                self.send_response(status)
                if status >= 300 and receiver.retry_after is not None:
                    self.send_header("Retry-After", receiver.retry_after)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/crm"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._released.set()
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def accepted(self) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.status < 300]

    def all(self) -> list[Received]:
        with self.lock:
            return list(self.requests)


def subscribe(store: AlertStore, receiver: Receiver, filters: Filters = Filters()) -> Subscription:
    return store.create_subscription(receiver.url, filters)


def log_alerts(store: AlertStore, alerts: list[AlertChange]) -> None:
    store.append([(a, encoded(a)) for a in alerts])


def run_dispatcher(store: AlertStore, until: Callable[[], bool], policy: RetryPolicy = FAST, timeout: float = 10.0,
                   request_timeout: float = 5.0, concurrency: int = 4) -> float:
    """Deliver until `until()` holds; the seconds it took."""

    async def main() -> float:
        dispatcher = Dispatcher(store, policy, request_timeout, concurrency)
        task = asyncio.create_task(dispatcher.run())
        started = time.monotonic()
        try:
            while not until():
                if task.done():
                    task.result()
                if time.monotonic() - started > timeout:
                    raise AssertionError(f"not done after {timeout} s")
                await asyncio.sleep(0.01)
            return time.monotonic() - started
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


def interleaved(customers: int, per_customer: int) -> list[AlertChange]:
    """Alerts of several customers, in log order c0#0, c1#0, ..., c0#1, ...; one alert_id per customer."""
    ids = [uuid.uuid4() for _ in range(customers)]
    return [alert(f"cust-{c}", alert_id=ids[c], version=n + 1) for n in range(per_customer) for c in range(customers)]


def by_customer(changes: Iterable[AlertChange]) -> dict[str, list[str]]:
    order: dict[str, list[str]] = {}
    for change in changes:
        order.setdefault(change.customer_key, []).append(str(change.change_id))
    return order


def requested_order(requests: Iterable[Received]) -> dict[str, list[str]]:
    """Per customer, the change_ids in the order they were requested, a retry of the same one collapsed."""
    order: dict[str, list[str]] = {}
    for r in requests:
        seen = order.setdefault(orjson.loads(r.body)["customer_key"], [])
        if not seen or seen[-1] != r.change_id:
            seen.append(r.change_id)
    return order


def test_a_flaky_receiver_gets_every_alert_in_customer_order_correctly_signed(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    alerts = interleaved(customers=4, per_customer=5)
    with Receiver(fail_first=7, fail_status=503) as receiver:
        subscription = subscribe(store, receiver)
        log_alerts(store, alerts)
        # Until the store has every outcome: the receiver sees a request a moment before that.
        run_dispatcher(store, lambda: store.delivery_counts(subscription.id)[DELIVERED] == len(alerts))
    accepted = receiver.accepted()
    # Every alert exactly once, byte for byte as logged, each correctly signed with the subscription's secret.
    assert sorted(r.change_id for r in accepted) == sorted(str(a.change_id) for a in alerts)
    sent = {str(a.change_id): a for a in alerts}
    for r in accepted:
        assert r.body == encoded(sent[r.change_id])
        assert verify(subscription.secret, r.headers["x-crm-signature"], r.body)
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-crm-alert-id"] == str(sent[r.change_id].alert_id)
    # A customer's later alert is never even tried before the earlier one got through.
    assert requested_order(receiver.all()) == by_customer(alerts)
    assert requested_order(accepted) == by_customer(alerts)
    # The failures were retried: attempts numbered from 1, the retried ones delivered at 2 or later.
    attempts = [int(r.headers["x-crm-delivery-attempt"]) for r in receiver.all()]
    assert attempts.count(1) == len(alerts) and max(attempts) >= 2
    assert store.delivery_counts(subscription.id) == {PENDING: 0, DELIVERED: len(alerts), DEAD: 0}
    failed_first = [d for d in store.deliveries(subscription.id) if d.attempts > 1]
    assert failed_first and all(d.response_status == 200 and d.last_error is None for d in failed_first)
    store.close()


def test_retry_after_is_honoured(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    with Receiver(fail_first=1, fail_status=429, retry_after="1") as receiver:
        subscribe(store, receiver)
        log_alerts(store, [alert()])
        run_dispatcher(store, lambda: len(receiver.accepted()) == 1)
    first, second = receiver.all()
    assert second.at - first.at >= 0.95       # not the 20 ms the backoff alone would have waited
    store.close()


def test_a_delivery_that_keeps_failing_is_dead_after_n_attempts_and_the_customer_moves_on(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    poisoned, *later = [alert("cust-1", version=v) for v in (1, 2, 3)]
    other = alert("cust-2")
    policy = RetryPolicy(max_attempts=3, base_seconds=0.01, cap_seconds=0.05)
    with Receiver(poison={str(poisoned.change_id)}) as receiver:
        subscription = subscribe(store, receiver)
        log_alerts(store, [poisoned, *later, other])
        run_dispatcher(store, lambda: store.delivery_counts(subscription.id)[DELIVERED] == 3, policy)
        assert [r.change_id for r in receiver.all() if r.change_id == str(poisoned.change_id)] == \
            [str(poisoned.change_id)] * 3
        # cust-1's later alerts went out only after the first was given up.
        tries = [r.change_id for r in receiver.all() if orjson.loads(r.body)["customer_key"] == "cust-1"]
        assert tries == [str(poisoned.change_id)] * 3 + [str(a.change_id) for a in later]

        [dead] = store.dead(subscription.id)
        assert (dead.change_id, dead.attempts, dead.response_status) == (str(poisoned.change_id), 3, 500)
        assert dead.last_error.startswith("HTTP 500: ") and "planned failure" in dead.last_error

        # The receiver is fixed; the dead letter is sent again with a fresh set of attempts.
        receiver.poison.clear()
        assert store.redeliver(subscription.id) == 1
        run_dispatcher(store, lambda: store.delivery_counts(subscription.id)[DELIVERED] == 4, policy)
    assert receiver.accepted()[-1].change_id == str(poisoned.change_id)
    assert receiver.accepted()[-1].headers["x-crm-delivery-attempt"] == "1"
    assert store.dead(subscription.id) == []
    assert store.delivery_counts(subscription.id)[DELIVERED] == 4
    store.close()


def test_redeliver_one_dead_letter_by_seq(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    alerts = [alert("a"), alert("b")]
    policy = RetryPolicy(max_attempts=1)
    with Receiver(poison={str(a.change_id) for a in alerts}) as receiver:
        subscription = subscribe(store, receiver)
        log_alerts(store, alerts)
        run_dispatcher(store, lambda: len(store.dead(subscription.id)) == 2, policy)
        receiver.poison.clear()
        first_seq = store.dead(subscription.id)[0].seq
        assert store.redeliver(subscription.id, seq=first_seq) == 1
        run_dispatcher(store, lambda: len(receiver.accepted()) == 1, policy)
    assert receiver.accepted()[0].change_id == str(alerts[0].change_id)
    assert [d.change_id for d in store.dead(subscription.id)] == [str(alerts[1].change_id)]
    with pytest.raises(LookupError):
        store.redeliver(subscription.id, seq=first_seq)   # no longer dead
    store.close()


def test_a_slow_and_a_dead_receiver_do_not_delay_a_healthy_one(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    alerts = interleaved(customers=6, per_customer=3)
    # The slow one holds every request for 30 s, far longer than the healthy receiver's whole run; the
    # dead one refuses connections (nothing listens on its port).
    with Receiver(delay=30) as slow, Receiver() as healthy:
        dead = Receiver()
        dead.stop()        # never served: its port now refuses connections
        subscribe(store, slow), subscribe(store, dead), subscribe(store, healthy)
        log_alerts(store, alerts)
        took = run_dispatcher(store, lambda: len(healthy.accepted()) == len(alerts), request_timeout=20)
        # A fraction of a second on an idle machine; anything under the slow receiver's 20 s request timeout
        # shows that nothing waited for it.
        assert took < 10.0, f"the healthy receiver took {took:.1f} s"
        assert 1 <= len(slow.all()) <= 4       # at most its concurrency limit, all still waiting for an answer
        assert requested_order(healthy.accepted()) == by_customer(alerts)
    store.close()


def test_a_deleted_subscription_gets_nothing_more(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    with Receiver() as kept, Receiver() as removed:
        subscribe(store, kept)
        gone = subscribe(store, removed)
        store.remove_subscription(gone.id)
        log_alerts(store, [alert()])
        run_dispatcher(store, lambda: len(kept.accepted()) == 1)
        time.sleep(0.1)
    assert removed.all() == [] and store.delivery_counts(gone.id) == {PENDING: 0, DELIVERED: 0, DEAD: 0}
    store.close()


def test_filters_decide_which_subscription_gets_which_alert(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    critical_champion = alert("a", severity="critical", segments=("rfm:champions",))
    low_store_2 = alert("b", severity="low", store_id="store-2", alert_type="bad_experience")
    with Receiver() as urgent, Receiver() as store_2, Receiver() as everything:
        subscribe(store, urgent, Filters.build(min_severity="high", segments=["champions"]))
        subscribe(store, store_2, Filters.build(types=["bad_experience"], stores=["store-2"]))
        subscribe(store, everything)
        log_alerts(store, [critical_champion, low_store_2])
        run_dispatcher(store, lambda: len(everything.accepted()) == 2 and len(urgent.accepted()) == 1
                       and len(store_2.accepted()) == 1)
    assert urgent.accepted()[0].change_id == str(critical_champion.change_id)
    assert store_2.accepted()[0].change_id == str(low_store_2.change_id)
    store.close()


def test_pending_deliveries_resume_after_a_restart(tmp_path):
    settings = Settings(state_dir=tmp_path, alerts_backoff_base_seconds=0.02, alerts_backoff_cap_seconds=0.05,
                        alerts_max_attempts=1000)
    alerts = interleaved(customers=3, per_customer=2)
    with Receiver(fail_first=10 ** 6, fail_status=503) as receiver:
        store = AlertStore(settings.alerts_db)       # the CLI's view of the same file
        subscription = subscribe(store, receiver)
        log_alerts(store, alerts)
        service = AlertService(settings, port=0, consume=False).start_in_thread()
        deadline = time.monotonic() + 10
        while len(receiver.all()) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        service.stop()
        before = store.deliveries(subscription.id)
        assert all(d.status == PENDING for d in before) and max(d.attempts for d in before) >= 2
        tried = len(receiver.all())

        receiver.fail_first = 0   # recovered while the service was down
        service = AlertService(settings, port=0, consume=False).start_in_thread()
        try:
            deadline = time.monotonic() + 10
            while store.delivery_counts(subscription.id)[DELIVERED] < len(alerts) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            service.stop()
    assert store.delivery_counts(subscription.id)[DELIVERED] == len(alerts)
    resumed = receiver.all()[tried:]
    assert sorted(r.change_id for r in resumed) == sorted(str(a.change_id) for a in alerts)
    # The attempt count carried over the restart.
    attempts_before = {d.change_id: d.attempts for d in before}
    assert all(int(r.headers["x-crm-delivery-attempt"]) == attempts_before[r.change_id] + 1 for r in resumed)
    assert requested_order(receiver.all()) == by_customer(alerts)
    store.close()


def test_a_second_service_on_the_same_state_refuses_to_start(tmp_path):
    from services.alerts.service import AlertsBusy

    settings = Settings(state_dir=tmp_path)
    first = AlertService(settings, port=0, consume=False).start_in_thread()
    try:
        with pytest.raises(AlertsBusy, match="another alerts service"):
            AlertService(settings, port=0, consume=False).start_in_thread()
    finally:
        first.stop()
