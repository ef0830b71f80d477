"""Hostile records straight to crm.events, as anyone with a standard Kafka producer can write them:
random bytes, empty values, tombstones, missing, wrong and odd keys, truncated and deeply nested
JSON, huge strings and numbers, events of every catalog type at and just past the limits of every
field (tests/catalog_strategies.py), resent events with the same and with other content, unknown
types and versions, platform records (clock ticks, boundaries, churn models, identity records) with
bad content or in the wrong partition, a far-future record timestamp, and a sprinkle of good events:
a few hundred records, the same on every run (seeded; hypothesis derandomized).

The count, by each record's position (partition, offset) as the broker acknowledged it:
- a valid event is projected: its event_id is in `events` and no dead letter is at its position;
- an exact resend (same id, same content) is the original's row: no row and no dead letter at its
  own position;
- everything else is in `dead_letters` at its position with a non-empty reason (the expected one
  where the record decides it) and no `events` row at that position;
and nothing is unaccounted for. The worker is still running at the end, and a good event sent
after the fuzz is projected: neither the worker nor the projection writer stalled.

The stack is shared with other test files: customers, aliases and keys here start with `hostile-`,
queries select records by their positions and ids, and no valid clock tick, segment boundaries or
churn model is sent (those would move every customer of a partition); platform records here are
invalid or misrouted, and so dead-lettered before they touch any state."""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from schemas.codec import MAX_EVENT_BYTES
from schemas.envelope import NAME_LENGTH
from schemas.events import event_model
from streams import topics
from tests.catalog_strategies import (
    CATALOG_TYPES, SYSTEM_MODELS, Record, catalog_event, customer_key, past_limit, system_record,
)
from tests.factories import encoded, event

pytestmark = [pytest.mark.integration, pytest.mark.last]

PREFIX = "hostile-"
SEED = 20260301
# A personal field pushed past its limit is no sealed token any more: refused as plain personal data.
REFUSALS = {"schema_invalid", "unsupported_schema_version", "unknown_type", "personal_data_in_clear"}
PLATFORM = sorted(SYSTEM_MODELS)
MISROUTED = {"clock_ticked": "misrouted_tick", "segment_boundaries_published": "misrouted_boundaries",
             "churn_model_published": "misrouted_churn_model"}
FAR_FUTURE_MS = 2**62
# The largest value kafka-python sends in one record under the broker's default limit
# (message.max.bytes, 1 MiB and some: the record batch with its header and this file's key).
BROKER_RECORD_LIMIT = 1024 * 1024 - 200


@dataclass
class Sent:
    """One record produced, what the platform must make of it, and where the broker put it."""
    what: str
    key: bytes | None
    value: bytes | None
    # projected; duplicate (of event_id, projected at another position); dead; or consumed (a
    # platform record that changes state and has no row of its own)
    expect: str
    event_id: str | None = None
    reason: str | set[str] | None = None  # the dead letter's reason, when the record decides it
    partition: int | None = None
    timestamp_ms: int | None = None
    offset: int | None = None

    @property
    def position(self) -> tuple[int, int]:
        return self.partition, self.offset  # type: ignore[return-value]

    def reason_fits(self, reason: str) -> bool:
        if self.reason is None:
            return bool(reason)
        return reason in self.reason if isinstance(self.reason, set) else reason == self.reason


def drawn(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` examples of `strategy`, the same on every run (hypothesis, derandomized)."""
    found: list[Any] = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Any) -> None:
        found.append(example)

    collect()
    return found


class Mix:
    """The records to produce, built from one seed."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.sent: list[Sent] = []

    def new_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def own(self, body: dict[str, Any]) -> dict[str, Any]:
        """A drawn event made this file's: a fresh id, and its customer and aliases under PREFIX
        (cut to the catalog's length), so that no other test's customer is touched."""
        body = {**body, "event_id": self.new_id()}
        if body.get("customer_id"):
            body["customer_id"] = (PREFIX + body["customer_id"])[:NAME_LENGTH]
        identifiers = {name: (PREFIX + value)[:NAME_LENGTH] if isinstance(value, str) else value
                       for name, value in (body.get("identifiers") or {}).items()}
        if identifiers:
            body["identifiers"] = identifiers
        return body

    def add(self, what: str, key: bytes | None, value: bytes | None, expect: str, **details: Any) -> Sent:
        record = Sent(what, key, value, expect, **details)
        self.sent.append(record)
        return record

    def valid(self, what: str, body: dict[str, Any], escaped: bool = False) -> Sent:
        """A valid event: projected, unless written (escaped) past MAX_EVENT_BYTES."""
        value = json.dumps(body, ensure_ascii=True).encode() if escaped else orjson.dumps(body)
        key = customer_key(body).encode()
        if len(value) > MAX_EVENT_BYTES:
            return self.dead(f"{what}, too large written so", key, value, "too_large")
        return self.add(what, key, value, "projected", event_id=body["event_id"])

    def dead(self, what: str, key: bytes | None, value: bytes | None, reason: str | set[str] | None = None,
             **details: Any) -> Sent:
        return self.add(what, key, value, "dead", reason=reason, **details)


def good(mix: Mix, n: int) -> dict[str, Any]:
    """An ordinary event of customer `hostile-good-<n>` (tests/factories.py, its order id made the seed's)."""
    body = event(mix.rng.choice(["purchase_completed", "daily_sign_in", "product_viewed", "survey_answered"]),
                 customer_id=f"{PREFIX}good-{n}", event_id=mix.new_id(), occurred_at="2026-03-01T10:00:00+00:00")
    if "order_id" in body["payload"]:
        body["payload"]["order_id"] = f"{PREFIX}order-{n}"
    return body


def add_noise(mix: Mix) -> None:
    """Random bytes, empty values, tombstones, truncated, nested and huge JSON."""
    rng = mix.rng
    for n in range(60):
        mix.dead("random bytes", f"{PREFIX}noise-{n}".encode(), rng.randbytes(rng.choice([1, 7, 100, 5000])))
    mix.dead("random bytes at the broker's record size limit", f"{PREFIX}noise-big".encode(),
             rng.randbytes(BROKER_RECORD_LIMIT), "too_large")
    mix.dead("empty value", f"{PREFIX}empty".encode(), b"", "malformed_json")
    mix.dead("tombstone", f"{PREFIX}tombstone".encode(), None, "malformed_json")
    for n in range(20):
        whole = encoded(good(mix, 1000 + n))
        mix.dead("truncated JSON", f"{PREFIX}good-{1000 + n}".encode(), whole[:rng.randrange(1, len(whole) - 1)],
                 "malformed_json")
    deep_key = f"{PREFIX}deep".encode()
    mix.dead("arrays 10k deep", deep_key, b"[" * 10_000 + b"]" * 10_000, "malformed_json")
    mix.dead("objects 10k deep", deep_key, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "malformed_json")
    inside = good(mix, 2000)
    mix.dead("a payload 2k deep", f"{PREFIX}good-2000".encode(),
             encoded(inside)[:-1] + b', "deep": ' + b"[" * 2000 + b"]" * 2000 + b"}", "malformed_json")
    big = good(mix, 2001)
    mix.dead("a string past the size limit", f"{PREFIX}good-2001".encode(),
             encoded({**big, "source": {"channel": "app", "device_id": "x" * (MAX_EVENT_BYTES + 1)}}), "too_large")
    mix.dead("a number of 500 digits", f"{PREFIX}good-2002".encode(),
             encoded(good(mix, 2002))[:-1] + b', "n": ' + b"9" * 500 + b"}", "malformed_json")


def add_huge_but_valid(mix: Mix) -> None:
    """Strings and numbers as large as the catalog takes: projected. Among them, events of nearly
    MAX_EVENT_BYTES of random text that name their customer only by one alias, more of them than
    one Kafka record holds: the alias keeps only some for its link (streams/pipeline.py HELD_BYTES).
    (Purchases of a thousand lines with long random skus: personal fields, the long free text before
    sealing, are sealed in the log and at most 4 KiB there.)"""
    for n in range(16):
        lines = [{"sku": f"{line:04d}" + "".join(mix.rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=180)),
                  "category": "c", "quantity": 1, "unit_price": "1.00"} for line in range(1000)]
        body = {**event("purchase_completed", customer_id=None, event_id=mix.new_id(),
                        occurred_at="2026-03-01T10:00:00+00:00",
                        payload={"order_id": f"big-{n}", "currency": "EUR", "lines": lines}),
                "identifiers": {"loyalty_card": f"{PREFIX}big-card"}}
        del body["customer_id"]
        mix.valid("a 250 kB event of an alias", body)
    body = good(mix, 3000)
    body = event("points_adjusted", customer_id=f"{PREFIX}good-3001", event_id=mix.new_id(),
                 payload={"adjustment_id": "a", "points": 10**9, "reason": "r", "operator": "o"})
    mix.valid("the most points an adjustment takes", body)
    body = event("search_performed", customer_id=f"{PREFIX}good-3002", event_id=mix.new_id(),
                 payload={"query": "q", "results_count": 2**64 - 1})
    mix.valid("the largest count JSON carries", body)


def add_catalog_edges(mix: Mix, per_type: int) -> list[dict[str, Any]]:
    """Valid events of every type at the edges of their fields (projected), and the same just past
    one limit (dead-lettered); returns the valid ones."""
    bodies = []
    for type_name in CATALOG_TYPES:
        for body, escaped in drawn(st.tuples(catalog_event(type_name), st.booleans()), per_type):
            body = mix.own(body)
            mix.valid(f"{type_name} at its edges", body, escaped)
            bodies.append(body)
        pairs = drawn(catalog_event(type_name).flatmap(
            lambda body, model=event_model(type_name): st.tuples(st.just(body), past_limit(model, body))), per_type)
        for body, (broken, path) in pairs:
            mix.dead(f"{type_name} past the limit of {'.'.join(map(str, path))}", customer_key(body).encode(),
                     Record(None, broken).value, REFUSALS)
    return bodies


def add_wrong_keys(mix: Mix, bodies: list[dict[str, Any]]) -> None:
    """Valid events under a key that is not their customer's: dead-lettered as wrong_key."""
    for key in [None, b"", b"\xff\xfe\x00", b"\xed\xa0\x80", f"{PREFIX}someone-else".encode(), b"clock"]:
        body = {**mix.rng.choice(bodies), "event_id": mix.new_id()}
        mix.dead(f"wrong key {key!r}", key, orjson.dumps(body), "wrong_key")


def add_unknown(mix: Mix) -> None:
    for n, (change, reason) in enumerate([({"type": "loyalty_teleported"}, "unknown_type"),
                                          ({"type": None}, "unknown_type"),
                                          ({"schema_version": 2}, "unsupported_schema_version"),
                                          ({"schema_version": "1"}, "unsupported_schema_version"),
                                          ({"schema_version": 2**64}, "unsupported_schema_version")]):
        body = {**good(mix, 4000 + n), **change}
        mix.dead(f"unknown {change}", f"{PREFIX}good-{4000 + n}".encode(), json.dumps(body).encode(), reason)


def add_platform(mix: Mix, customers: list[str]) -> None:
    """Platform records with bad content (dead-lettered: schema_invalid), in the wrong partition
    (misrouted_*), and identity records of this file's customers."""
    for type_name in PLATFORM:
        pairs = drawn(system_record(type_name, 0, customers).flatmap(
            lambda record, model=SYSTEM_MODELS[type_name]: st.tuples(st.just(record),
                                                                      past_limit(model, record.body))), 4)
        for record, (broken, path) in pairs:
            mix.dead(f"{type_name} past the limit of {'.'.join(map(str, path))}", record.key,
                     Record(None, broken).value, "schema_invalid")
    for type_name, reason in MISROUTED.items():
        for record in drawn(system_record(type_name, 0, customers), 2):
            mix.dead(f"{type_name} for partition 0 in partition 1", record.key,
                     orjson.dumps({**record.body, "event_id": mix.new_id()}), reason, partition=1)
    for n in range(4):
        inner = mix.own(drawn(catalog_event("daily_sign_in", anonymous=True), 1)[0])
        attributed = {"event_id": mix.new_id(), "type": "alias_event_attributed", "alias_key": customer_key(inner),
                      "customer_id": f"{PREFIX}attributed-{n}", "event": inner}
        mix.add("an attributed event", attributed["customer_id"].encode(), orjson.dumps(attributed), "projected",
                event_id=inner["event_id"])


def add_link(mix: Mix) -> dict[str, Any]:
    """An event that names only an alias, then the alias's link to a customer: the event is
    projected, and attributed to the customer. Returns the event."""
    held = {**good(mix, 5000), "identifiers": {"loyalty_card": f"{PREFIX}card"}}
    del held["customer_id"]
    mix.valid("an event with only an alias", held)
    link = {"event_id": mix.new_id(), "type": "alias_linked", "occurred_at": "2026-03-01T11:00:00Z",
            "alias_key": customer_key(held), "customer_id": f"{PREFIX}linked", "cause_event_id": mix.new_id()}
    mix.add("the alias linked", customer_key(held).encode(), orjson.dumps(link), "consumed")
    return held


def add_resends(mix: Mix, bodies: list[dict[str, Any]]) -> None:
    """Events sent again: the same bytes, the same content written otherwise (escaped, another
    received_at), and other content under the same id."""
    for body in mix.rng.sample(bodies, 12):
        key = customer_key(body).encode()
        mix.add("resent as it was", key, orjson.dumps(body), "duplicate", event_id=body["event_id"])
    for body in mix.rng.sample(bodies, 6):
        again = {**body, "received_at": "2026-03-01T10:00:00Z"} if "received_at" in body else body
        mix.add("resent, written otherwise", customer_key(body).encode(), json.dumps(again, ensure_ascii=True).encode(),
                "duplicate", event_id=body["event_id"])
    for body in mix.rng.sample(bodies, 6):
        other = {**body, "source": {"channel": "service", "store_id": f"{PREFIX}elsewhere"}}
        mix.dead("same id, other content", customer_key(body).encode(), orjson.dumps(other), "conflicting_duplicate")


def add_far_future_timestamp(mix: Mix) -> None:
    """A record timestamp the projections cannot store stands in for no received_at: refused."""
    body = good(mix, 6000)
    mix.dead("a record timestamp in the year 146 million", f"{PREFIX}good-6000".encode(), encoded(body),
             "schema_invalid", timestamp_ms=FAR_FUTURE_MS)


def build_mix() -> tuple[list[Sent], dict[str, Any]]:
    mix = Mix(SEED)
    add_noise(mix)
    bodies = add_catalog_edges(mix, per_type=6)
    add_huge_but_valid(mix)
    add_wrong_keys(mix, bodies)
    add_unknown(mix)
    add_platform(mix, [f"{PREFIX}platform-{n}" for n in range(3)])
    add_far_future_timestamp(mix)
    for n in range(20):
        mix.valid("a good event", good(mix, n))
    mix.rng.shuffle(mix.sent)
    held = add_link(mix)
    add_resends(mix, bodies)
    return mix.sent, held


def produce(stack: Any, records: list[Sent]) -> None:
    """Send every record, in order, and note where the broker put each."""
    futures = [stack.producer.send(topics.EVENTS.name, key=r.key, value=r.value, partition=r.partition,
                                   timestamp_ms=r.timestamp_ms) for r in records]
    stack.flush()
    for record, future in zip(records, futures):
        metadata = future.get(timeout=60)
        record.partition, record.offset = metadata.partition, metadata.offset


@pytest.fixture(scope="module")
def fuzzed(stack: Any) -> tuple[list[Sent], dict[str, Any]]:
    records, held = build_mix()
    produce(stack, records)
    return records, held


# --- what ClickHouse holds ----------------------------------------------------------------------------

def dead_letters(stack: Any, records: list[Sent]) -> dict[tuple[int, int], tuple[str, str]]:
    """(partition, offset) -> (reason, detail) of the dead letters at these records' positions."""
    positions = {r.position for r in records}
    rows = stack.query("SELECT source_partition, source_offset, reason, detail FROM dead_letters FINAL "
                       "WHERE source_topic = {t:String}", {"t": topics.EVENTS.name})
    return {(p, o): (reason, detail) for p, o, reason, detail in rows if (p, o) in positions}


def event_rows(stack: Any, records: list[Sent]) -> tuple[set[str], set[tuple[int, int]]]:
    """The event ids of these records that have an `events` row, and these records' positions that do."""
    ids = {r.event_id for r in records if r.event_id}
    positions = {r.position for r in records}
    rows = stack.query("SELECT toString(event_id), source_partition, source_offset FROM events FINAL "
                       "WHERE has({ids:Array(UUID)}, event_id) "
                       "OR has({positions:Array(Tuple(UInt16, UInt64))}, (source_partition, source_offset))",
                       {"ids": sorted(ids), "positions": sorted(positions)})
    return {row[0] for row in rows if row[0] in ids}, {(p, o) for _, p, o in rows if (p, o) in positions}


def unaccounted(stack: Any, records: list[Sent]) -> list[str]:
    """The records whose fate is not (yet) the one expected, each with what is wrong."""
    letters = dead_letters(stack, records)
    projected, rows_at = event_rows(stack, records)
    wrong = []
    for r in records:
        letter = letters.get(r.position)
        if r.expect == "dead":
            fine = letter is not None and r.reason_fits(letter[0]) and bool(letter[1]) and r.position not in rows_at
        elif r.expect == "projected":
            fine = r.event_id in projected and letter is None
        elif r.expect == "duplicate":
            fine = r.event_id in projected and letter is None and r.position not in rows_at
        else:  # consumed: a platform record that changes state and projects nothing of its own
            fine = letter is None and r.position not in rows_at
        if not fine:
            wrong.append(f"{r.what} at {r.position}: expected {r.expect} {r.reason or ''}, dead letter {letter}, "
                         f"row at its position {r.position in rows_at}, event id projected {r.event_id in projected}")
    return wrong


def settled(stack: Any, records: list[Sent], timeout: float = 600) -> list[str]:
    """`unaccounted` once it is empty, or once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while (wrong := unaccounted(stack, records)) and time.monotonic() < deadline:
        time.sleep(2)
    return wrong


# --- the tests ------------------------------------------------------------------------------------------

def test_every_record_produced_is_projected_or_dead_lettered_at_its_position(stack, fuzzed):
    records, _ = fuzzed
    assert len(records) > 300
    assert settled(stack, records) == []


def test_an_event_with_only_an_alias_is_attributed_once_the_alias_is_linked(stack, fuzzed):
    _, held = fuzzed

    def customers() -> set[str]:
        return {row[0] for row in stack.query("SELECT customer_key FROM events FINAL WHERE event_id = {e:UUID}",
                                              {"e": held["event_id"]})}

    stack.wait_for(lambda: f"{PREFIX}linked" in customers(), timeout=300, what="the held event attributed")
    assert customers() == {customer_key(held), f"{PREFIX}linked"}


def test_the_worker_survives_the_fuzz_and_projects_a_good_event_sent_after_it(stack, fuzzed):
    records, _ = fuzzed
    assert settled(stack, records) == []
    after = event("daily_sign_in", customer_id=f"{PREFIX}after", occurred_at="2026-03-01T12:00:00+00:00")
    stack.send(after["customer_id"].encode(), encoded(after))
    stack.flush()
    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE event_id = {e:UUID}",
                                       {"e": after["event_id"]})[0][0] == 1, timeout=300, what="the event after")
    assert stack.worker.running
