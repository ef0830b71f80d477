"""The POS spool (services/pos_spool.py) against a fake ingestion API on 127.0.0.1 that fails for a
while (503, 429 with Retry-After, connection refused, an answer lost after the events were written)
and then recovers. A fake clock stands in for time: nothing here sleeps through a backoff."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.pos_spool import Spool
from streams.config import PROJECT_ROOT
from tests.factories import event

KEY = "crm_test_secret"


class FakeApi:
    """Enough of POST /v1/events/batch: the key, the event-count and body limits, de-duplication by
    event_id, and rejection of events whose type is "bad". `plan` holds what the next requests get
    instead: an HTTP status (with headers), or "drop" (write the events, then close the connection
    without an answer). `stop()` makes the port refuse connections; `start()` serves it again."""

    def __init__(self, max_events: int = 500, max_bytes: int = 5 * 1024 * 1024):
        self.max_events, self.max_bytes = max_events, max_bytes
        self.written: list[dict] = []        # what reached "Kafka", in order
        self.seen: dict[str, str] = {}
        self.requests: list[int] = []        # events per request that got this far
        self.plan: deque = deque()
        self.port = 0
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                step = api.plan.popleft() if api.plan else None
                if isinstance(step, tuple):
                    return self.answer(step[0], {"error": "planned"}, step[1])
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self.answer(401, {"error": "unauthorized"})
                items = json.loads(raw)["events"]
                if len(raw) > api.max_bytes or len(items) > api.max_events:
                    return self.answer(413, {"error": "too_large"})
                api.requests.append(len(items))
                results = [api.take(index, item) for index, item in enumerate(items)]
                if step == "drop":
                    self.close_connection = True
                    return
                self.answer(200, {"request_id": self.headers.get("X-Request-ID"), "results": results})

            def answer(self, code, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def take(self, index: int, item: dict) -> dict:
        event_id = item["event_id"]
        if item["type"] == "bad":
            return {"index": index, "event_id": event_id, "status": "rejected", "reason": "schema_invalid",
                    "errors": [{"field": "type", "message": "bad is not in the event catalog"}]}
        content = json.dumps(item, sort_keys=True)
        if event_id in self.seen:
            status = "duplicate" if self.seen[event_id] == content else "rejected"
            return {"index": index, "event_id": event_id, "status": status, "errors": []}
        self.seen[event_id] = content
        self.written.append(item)
        return {"index": index, "event_id": event_id, "status": "accepted", "errors": []}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_api():
    api = FakeApi()
    api.start()
    yield api
    api.stop()


@pytest.fixture
def clock():
    return Clock()


def open_spool(path, api, clock, **options) -> Spool:
    return Spool(path, api.url, options.pop("key", KEY), clock=clock, random=options.pop("random", lambda: 1.0),
                 **options)


def purchases(customers=("c-1", "c-2", "c-3"), rounds=4, bad: set[int] = frozenset()) -> list[dict]:
    """Events of several customers, interleaved; those at the positions in `bad` get rejected."""
    events = [event("purchase_completed", customer_id=customers[i % len(customers)])
              for i in range(rounds * len(customers))]
    for i in bad:
        events[i]["type"] = "bad"
    return events


def per_customer(events: list[dict]) -> dict[str, list[str]]:
    order: dict[str, list[str]] = {}
    for e in events:
        order.setdefault(e["customer_id"], []).append(e["event_id"])
    return order


def test_enqueue_stores_durably_in_arrival_order_and_fills_a_missing_event_id(tmp_path, fake_api, clock):
    with open_spool(tmp_path / "spool.db", fake_api, clock) as spool:
        assert spool._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        given = event("purchase_completed")
        assert spool.enqueue(given) == given["event_id"]
        without = {k: v for k, v in event("purchase_completed").items() if k != "event_id"}
        new_id = spool.enqueue(without)
        assert "event_id" not in without, "the caller's dict is not changed"
        with pytest.raises(ValueError):
            spool.enqueue({**given, "payload": {"amount": float("nan")}})  # not JSON: refused now, not later
    # Another process sees both, in order, with the filled id kept: a re-send carries the same id.
    rows = sqlite3.connect(tmp_path / "spool.db").execute("SELECT event_id, body FROM waiting ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == [given["event_id"], new_id]
    assert json.loads(rows[1][1])["event_id"] == new_id


def test_an_outage_then_recovery_delivers_every_event_once_in_order_per_customer(tmp_path, fake_api, clock):
    spool = open_spool(tmp_path / "spool.db", fake_api, clock)
    events = purchases(rounds=5)
    for e in events[:9]:
        spool.enqueue(e)
    fake_api.plan.extend([(503, {"Retry-After": "5"}), (503, {}), (429, {"Retry-After": "40"}), (500, {})])

    class Stop:
        """The run loop's stop event: each wait moves the fake clock; the story unfolds meanwhile."""
        def __init__(self):
            self.waits = 0
            self.done = False

        def is_set(self):
            return self.done

        def wait(self, seconds):
            clock.now += seconds
            self.waits += 1
            if self.waits == 3:
                fake_api.stop()                       # the network goes: connection refused
                for e in events[9:]:                  # the till goes on selling meanwhile
                    spool.enqueue(e)
            if self.waits == 100:
                fake_api.start()
                fake_api.plan.append("drop")          # written, but the answer is lost
            self.done = self.waits > 5000 or (spool.status().waiting == 0 and self.waits > 100)

    stop = Stop()
    spool.run(stop)
    assert spool.status().waiting == 0 and stop.waits < 5000 and not fake_api.plan, "every failure was met"
    assert sorted(e["event_id"] for e in fake_api.written) == sorted(e["event_id"] for e in events), "each once"
    assert per_customer(fake_api.written) == per_customer(events)
    assert spool.status().next_attempt_at is None and "RemoteProtocolError" in spool.status().last_error
    spool.close()


def test_backoff_doubles_with_jitter_up_to_a_cap_and_honours_retry_after(tmp_path, fake_api, clock):
    spool = open_spool(tmp_path / "spool.db", fake_api, clock, random=lambda: 1.0)
    spool.enqueue(event("purchase_completed"))
    delays = []
    for _ in range(12):
        fake_api.plan.append((503, {}))
        result = spool.send_pending()
        delays.append(result.retry_at - clock.now)
        assert result.error.startswith("HTTP 503")
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]

    fake_api.plan.append((429, {"Retry-After": "4000"}))        # Retry-After, but no more than the cap
    assert spool.send_pending().retry_at - clock.now == 300
    spool.send_pending()                                         # success resets the backoff
    jittered = open_spool(tmp_path / "other.db", fake_api, clock, random=lambda: 0.0)
    jittered.enqueue(event("purchase_completed"))
    fake_api.plan.extend([(503, {}), (503, {}), (429, {"Retry-After": "7"})])
    assert [jittered.send_pending().retry_at - clock.now for _ in range(3)] == [0.5, 1, 7]
    fake_api.stop()                                              # refused connections back off alike
    failed = jittered.send_pending()
    assert "ConnectError" in failed.error and failed.retry_at - clock.now == 4
    assert jittered.status().waiting == 1
    spool.close()
    jittered.close()


def test_rejected_events_move_aside_with_reasons_and_do_not_block_the_rest(tmp_path, fake_api, clock):
    spool = open_spool(tmp_path / "spool.db", fake_api, clock)
    events = purchases(bad={1, 4})
    for e in events:
        spool.enqueue(e)
    result = spool.send_pending(max_batch=4)
    assert (result.accepted, result.duplicates, result.rejected, result.error) == (10, 0, 2, None)
    good = [e for i, e in enumerate(events) if i not in {1, 4}]
    assert per_customer(fake_api.written) == per_customer(good)
    rejected = spool.rejected()
    assert [r["event_id"] for r in rejected] == [events[1]["event_id"], events[4]["event_id"]]
    assert rejected[0]["reason"] == "schema_invalid" and rejected[0]["errors"][0]["field"] == "type"
    assert rejected[0]["event"] == events[1], "kept as it was, for a person to fix"
    status = spool.status()
    assert (status.waiting, status.rejected) == (0, 2)
    spool.close()


def test_a_crash_after_sending_and_before_deleting_only_causes_duplicates(tmp_path, fake_api, clock):
    path = tmp_path / "spool.db"
    events = purchases()
    spool = open_spool(path, fake_api, clock)
    for e in events:
        spool.enqueue(e)

    def crash(*args):
        raise KeyboardInterrupt("the terminal dies here")

    spool._settle = crash
    with pytest.raises(KeyboardInterrupt):
        spool.send_pending(max_batch=5)
    spool.close()
    assert len(fake_api.written) == 5
    again = open_spool(path, fake_api, clock)                  # the terminal starts again
    assert again.status().waiting == len(events)
    result = again.send_pending(max_batch=5)
    assert (result.accepted, result.duplicates, result.rejected) == (7, 5, 0)
    assert [e["event_id"] for e in fake_api.written] == [e["event_id"] for e in events]
    again.close()


def test_a_killed_process_loses_nothing_and_sends_nothing_twice(tmp_path, fake_api):
    """A real process, killed (os._exit) between the API's answer and the delete, after enqueueing
    without closing anything."""
    path = tmp_path / "spool.db"
    events = purchases()
    child = f"""
import json, os, sys
from services.pos_spool import Spool
spool = Spool(sys.argv[1], sys.argv[2], {KEY!r})
for line in sys.stdin:
    spool.enqueue(json.loads(line))
spool._settle = lambda *args: os._exit(9)
spool.send_pending()
"""
    done = subprocess.run([sys.executable, "-c", child, str(path), fake_api.url], cwd=PROJECT_ROOT, timeout=120,
                          input="\n".join(json.dumps(e) for e in events), text=True, capture_output=True)
    assert done.returncode == 9, done.stderr
    assert len(fake_api.written) == len(events)
    with Spool(path, fake_api.url, KEY) as spool:
        assert spool.status().waiting == len(events)
        result = spool.send_pending()
        assert (result.accepted, result.duplicates, spool.status().waiting) == (0, len(events), 0)
    assert [e["event_id"] for e in fake_api.written] == [e["event_id"] for e in events]


def test_413_halves_the_batch_and_an_event_too_large_alone_is_rejected(tmp_path, clock):
    api = FakeApi(max_events=3, max_bytes=4000)
    api.start()
    try:
        spool = open_spool(tmp_path / "spool.db", api, clock)
        events = purchases(rounds=4)
        huge = event("purchase_completed", customer_id="c-2", note="x" * 5000)
        events.insert(6, huge)
        for e in events:
            spool.enqueue(e)
        result = spool.send_pending(max_batch=10)
        assert result.error is None and (result.accepted, result.rejected) == (12, 1)
        assert max(api.requests) <= 3 and api.requests[0] == 2  # 10 -> 5 -> 2
        assert per_customer(api.written) == per_customer([e for e in events if e is not huge])
        assert [r["reason"] for r in spool.rejected()] == ["body_too_large"]
        spool.close()
    finally:
        api.stop()


def test_a_wrong_key_keeps_everything_and_waits_long(tmp_path, fake_api, clock):
    spool = open_spool(tmp_path / "spool.db", fake_api, clock, key="crm_wrong", random=lambda: 0.0)
    spool.enqueue(event("purchase_completed"))
    result = spool.send_pending()
    assert result.error.startswith("HTTP 401") and result.retry_at - clock.now == 150  # half the cap, jittered
    assert fake_api.written == [] and spool.status().waiting == 1
    spool.close()


def test_an_answer_that_does_not_cover_every_event_sends_the_whole_batch_again(tmp_path, fake_api, clock):
    spool = open_spool(tmp_path / "spool.db", fake_api, clock)
    for e in purchases(rounds=1):
        spool.enqueue(e)
    original = FakeApi.take
    fake_api.take = lambda index, item: original(fake_api, index, item) if index != 1 else {"index": 7}
    failed = spool.send_pending()
    assert "without an answer for every event" in failed.error and spool.status().waiting == 3
    fake_api.take = lambda index, item: original(fake_api, index, item)
    result = spool.send_pending()
    assert (result.accepted, result.duplicates, spool.status().waiting) == (1, 2, 0)
    spool.close()


def test_status_tells_what_waits_and_why(tmp_path, fake_api, clock):
    spool = open_spool(tmp_path / "spool.db", fake_api, clock)
    assert spool.status().waiting == 0 and spool.status().oldest_age_seconds is None
    spool.enqueue(event("purchase_completed"))
    clock.now += 90
    spool.enqueue(event("purchase_completed"))
    fake_api.plan.append((503, {"Retry-After": "5"}))
    spool.send_pending()
    status = spool.status()
    assert (status.waiting, status.oldest_age_seconds, status.rejected) == (2, 90, 0)
    assert status.last_error.startswith("HTTP 503") and status.next_attempt_at == clock.now + 5
    with Spool(tmp_path / "spool.db") as elsewhere:                 # e.g. `crm spool status`
        assert elsewhere.status().last_error == status.last_error
    spool.send_pending()
    assert spool.status().next_attempt_at is None and spool.status().waiting == 0
    spool.close()


def test_the_command_line(tmp_path, fake_api, capsys):
    from services.cli import main

    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        for e in purchases(bad={0}):
            spool.enqueue(e)
    assert main(["spool", "status", "--path", str(path)]) == 0
    assert "waiting: 12" in capsys.readouterr().out
    assert main(["spool", "send", "--path", str(path), "--api", fake_api.url, "--key", KEY]) == 0
    out = capsys.readouterr().out
    assert "accepted 11, duplicates 0, rejected 1" in out and "waiting: 0" in out
    assert main(["spool", "rejected", "--path", str(path), "--format", "csv"]) == 0
    assert "schema_invalid" in capsys.readouterr().out
    assert main(["spool", "status", "--path", str(tmp_path / "missing.db")]) == 1


def test_a_delivered_event_leaves_no_trace_of_its_personal_values_in_the_spool_file(tmp_path, fake_api, clock):
    from tests.factories import submitted

    path = tmp_path / "spool.db"
    marker = "erase-me-after-delivery@example.org"
    registration = submitted("customer_registered", payload={"name": "Ann Erasable", "email": marker})
    with open_spool(path, fake_api, clock) as spool:
        spool.enqueue(registration)
        assert spool.status().waiting == 1
        assert spool._db.execute("PRAGMA secure_delete").fetchone() == (1,)
        spool._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert marker.encode() in path.read_bytes()  # waiting: in clear (the terminal has no data key)
        result = spool.send_pending()
        assert result.accepted == 1 and spool.status().waiting == 0
        spool._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    files = [path, *tmp_path.glob("spool.db-*")]
    assert not any(marker.encode() in file.read_bytes() for file in files)
