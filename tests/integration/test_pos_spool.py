"""The POS spool (services/pos_spool.py) against the real ingestion API and broker: a terminal that
was offline, then crashed between the API's answer and its own bookkeeping, then ran its background
sender, has every valid event on `crm.events` exactly once, in order per customer."""

from __future__ import annotations

import socket
import threading

import pytest

from services.pos_spool import Spool
from streams import topics
from tests.factories import event
from tests.integration.test_ingest_api import now, on_topic

pytestmark = pytest.mark.integration


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_offline_terminal_that_crashed_gets_every_event_on_the_topic_once_in_order(stack, api, tmp_path):
    key = api.key("pos", store_id="store-1")
    path = tmp_path / "spool.db"
    customers = ("spool-a", "spool-b", "spool-c")
    events = [event("purchase_completed", customer_id=customers[i % 3], occurred_at=now(minutes=-40 + i))
              for i in range(12)]
    invalid = event("purchase_completed", customer_id="spool-b", occurred_at=now(minutes=-35))
    invalid["payload"]["lines"][0]["quantity"] = -3
    events.insert(5, invalid)

    # Offline: nothing listens where the API should be.
    with Spool(path, f"http://127.0.0.1:{_unused_port()}", key) as offline:
        for e in events:
            offline.enqueue(e)
        failed = offline.send_pending()
        assert "ConnectError" in failed.error and offline.status().waiting == len(events)

    # Online, but the terminal dies after the API answered the first batch, before deleting it.
    crashing = Spool(path, api.url, key)

    def crash(*args):
        raise KeyboardInterrupt("the terminal dies here")

    crashing._settle = crash
    with pytest.raises(KeyboardInterrupt):
        crashing.send_pending(max_batch=4)
    crashing.close()

    # Restarted: what the API answered before the crash comes back as duplicates.
    spool = Spool(path, api.url, key)
    resent = spool.send_pending(max_batch=4)
    assert (resent.accepted, resent.duplicates, resent.rejected, resent.error) == (8, 4, 1, None)

    # Then the background sender runs while the till sells on.
    stop = threading.Event()
    sender = threading.Thread(target=spool.run, args=(stop, 0.2), daemon=True)
    sender.start()
    try:
        more = [event("purchase_completed", customer_id=customers[i % 3], occurred_at=now(minutes=-20 + i))
                for i in range(3)]
        for e in more:
            spool.enqueue(e)
        stack.wait_for(lambda: spool.status().waiting == 0, timeout=60, what="the spool to empty")
    finally:
        stop.set()
        sender.join(timeout=60)
    status = spool.status()
    assert (status.waiting, status.rejected, status.next_attempt_at) == (0, 1, None)
    [rejected] = spool.rejected()
    assert rejected["event_id"] == invalid["event_id"] and rejected["reason"] == "schema_invalid"
    assert rejected["errors"][0]["field"] == "payload.lines.0.quantity"
    spool.close()

    valid = [e for e in events + more if e is not invalid]
    written = on_topic(stack, topics.EVENTS.name, {e["event_id"] for e in events + more})
    assert {event_id: len(records) for event_id, records in written.items()} == {e["event_id"]: 1 for e in valid}
    for customer in customers:
        mine = [e["event_id"] for e in valid if e["customer_id"] == customer]
        records = [written[event_id][0][0] for event_id in mine]
        assert all(r.key == customer.encode() for r in records)
        assert [(r.partition, r.offset) for r in records] == sorted((r.partition, r.offset) for r in records), \
            f"{customer}'s events are on the topic in the order the terminal took them"
