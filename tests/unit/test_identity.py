"""Events that arrive with only an alias reach the customer the alias belongs to, whether they came
before the link or after it, through identity records that the worker appends to the log."""

import zlib
from collections import deque
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.config import settings as crm_settings
from streams.pipeline import Accepted, Duplicate, Forward, SourceRecord, load_customer, process
from streams.rulebooks import load_rulebooks
from tests.factories import encoded, event

RULES = load_rulebooks(crm_settings())
T0 = datetime(2026, 3, 2, 10, tzinfo=UTC)
CARD = "loyalty_card:LC77"
PARTITIONS = 3


def partition_of(key: bytes) -> int:
    return zlib.crc32(key) % PARTITIONS


class Log:
    """A tiny events topic: records appended per partition, processed in order, with what the worker
    appends (Forward outputs) going back into the log as a producer would send them."""

    def __init__(self):
        self.offsets = [0] * PARTITIONS
        self.queue: deque[SourceRecord] = deque()
        self.store, self.seen = {}, {}
        self.outputs: list = []

    def send(self, key: bytes, body: dict):
        partition = partition_of(key)
        self.queue.append(SourceRecord(key, encoded(body), partition, self.offsets[partition], 0))
        self.offsets[partition] += 1

    def run(self):
        while self.queue:
            record = self.queue.popleft()
            for output in process(record, self.store, self.seen, RULES):
                self.outputs.append(output)
                if isinstance(output, Forward):
                    self.send(output.key.encode(), output.record)

    def state(self, key):
        return load_customer(self.store, key)


def anonymous(type_, at, **fields):
    body = event(type_, occurred_at=at.isoformat(), **fields)
    del body["customer_id"]
    body["identifiers"] = {"loyalty_card": "LC77"}
    return body


def member(type_, at, **fields):
    return event(type_, customer_id="c-1", occurred_at=at.isoformat(), identifiers={"loyalty_card": "LC77"}, **fields)


def test_events_before_the_link_are_attributed_at_the_link_and_later_ones_at_once():
    log = Log()
    log.send(CARD.encode(), anonymous("purchase_completed", T0))
    log.run()
    held = log.state(CARD)
    assert held.profile.purchase_count == 1 and held.account.available == 0 and len(held.held) == 1

    log.send(b"c-1", member("customer_registered", T0 + timedelta(days=1)))
    log.run()
    alias, customer = log.state(CARD), log.state("c-1")
    assert alias.linked_to == "c-1" and alias.profile.merged_into == "c-1" and alias.held == []
    assert customer.profile.purchase_count == 1 and customer.account.pending + customer.account.available > 0
    attributed = [o for o in log.outputs if isinstance(o, Accepted) and o.attributed_from == CARD]
    assert len(attributed) == 1 and attributed[0].event.customer_key == "c-1"

    # After the link, an alias-only event goes straight to the customer, and is accepted only there.
    before = len([o for o in log.outputs if isinstance(o, Accepted)])
    log.send(CARD.encode(), anonymous("purchase_completed", T0 + timedelta(days=2)))
    log.run()
    accepted = [o for o in log.outputs if isinstance(o, Accepted)][before:]
    assert [o.event.customer_key for o in accepted] == ["c-1"]
    assert log.state("c-1").profile.purchase_count == 2
    assert log.state(CARD).profile.purchase_count == 1  # the alias's profile stays as it was at the link


def test_redelivered_identity_records_and_repeated_sends_change_nothing():
    log = Log()
    log.send(CARD.encode(), anonymous("purchase_completed", T0))
    body = anonymous("product_viewed", T0)
    log.send(CARD.encode(), body)
    log.send(CARD.encode(), body)  # the producer retried
    log.send(b"c-1", member("customer_registered", T0 + timedelta(days=1)))
    log.run()
    assert sum(isinstance(o, Duplicate) for o in log.outputs) == 1
    figures = log.state("c-1").profile.figures()
    # Replay every forwarded record again at new offsets (a worker that crashed before committing
    # re-sends them): duplicates by their derived ids.
    for output in [o for o in log.outputs if isinstance(o, Forward)]:
        log.send(output.key.encode(), output.record)
    log.outputs.clear()
    log.run()
    assert log.state("c-1").profile.figures() == figures
    assert not any(isinstance(o, Accepted) for o in log.outputs)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.sampled_from(["purchase_completed", "product_viewed"]),
                          st.booleans()), min_size=1, max_size=10),
       st.integers(0, 10))
def test_a_customer_ends_with_the_same_figures_however_events_named_them(activity, link_after):
    """Whether each event carried the customer id or only the card, and wherever the link fell,
    the customer's purchases, spend, first and last seen are those of all the events."""
    events = [(T0 + timedelta(days=d), kind, by_alias) for d, kind, by_alias in activity]
    log, baseline = Log(), Log()
    for n, (at, kind, by_alias) in enumerate(events):
        if n == link_after:
            log.send(b"c-1", member("identity_linked", T0, payload={"alias_type": "loyalty_card", "alias_value": "LC77"}))
        same = member(kind, at)
        log.send(*((CARD.encode(), {**anonymous(kind, at), "event_id": same["event_id"], "payload": same["payload"]})
                   if by_alias else (b"c-1", same)))
        baseline.send(b"c-1", same)
    log.send(b"c-1", member("identity_linked", T0, payload={"alias_type": "loyalty_card", "alias_value": "LC77"}))
    baseline.send(b"c-1", member("identity_linked", T0, payload={"alias_type": "loyalty_card", "alias_value": "LC77"}))
    log.run()
    baseline.run()
    got, want = log.state("c-1").profile, baseline.state("c-1").profile
    fields = ("purchase_count", "spend_minor", "first_seen_ms", "last_seen_ms", "last_purchase_ms", "category_units")
    assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}
