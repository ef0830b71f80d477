"""The intake's triage of a batch of crm.intake records (services/intake/agent.py), without Kafka:
checked with the API's rules in the intake's scope, sealed with one key lookup, addressed to
crm.events by customer key; refused records dead-lettered as they came, with the reason headers."""

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import orjson

from schemas.codec import decode_event
from schemas.envelope import Envelope
from services.ingest.sealing import Sealer, offline_keys
from services.intake.agent import triage
from tests.factories import submitted

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)
SECRET = b"test-identity-secret"


def record(value, offset, at=NOW, key=b"k"):
    raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return SimpleNamespace(topic="crm.intake", partition=2, offset=offset, timestamp=int(at.timestamp() * 1000),
                           key=key, value=raw)


def sealer(calls):
    keys = offline_keys(b"k")
    return Sealer(lambda customer_keys: calls.append(sorted(customer_keys)) or keys(customer_keys), SECRET)


def test_plain_events_come_out_sealed_keyed_by_customer_and_the_bad_ones_dead_lettered_with_reasons():
    calls: list = []
    registration = submitted("customer_registered", customer_id="c-1", occurred_at=NOW.isoformat(),
                             payload={"name": "Ann Example", "email": "Ann@Example.org", "birthday": "1990-07-14"})
    history = submitted("purchase_completed", customer_id="c-2", occurred_at=(NOW - timedelta(days=5000)).isoformat())
    by_email = submitted("daily_sign_in", occurred_at=NOW.isoformat())
    by_email.pop("customer_id")
    by_email["identifiers"] = {"email": "ann@example.org"}
    future = submitted("daily_sign_in", occurred_at=(NOW + timedelta(minutes=6)).isoformat())
    tick = {"event_id": "x", "type": "clock_ticked", "occurred_at": NOW.isoformat(), "partition": 0}
    records = [record(registration, 0), record(b'{"broken', 1), record(history, 2), record(future, 3),
               record(by_email, 4), record(tick, 5), record(None, 6), record([1, 2], 7)]
    result = triage(records, sealer(calls), "DE")

    assert calls == [["c-1"]]  # one key lookup for the batch, for the customers with personal values
    assert [orjson.loads(out.value)["event_id"] for out in result.events] == \
        [registration["event_id"], history["event_id"], by_email["event_id"]]
    for out in result.events:
        assert out.topic == "crm.events"
        decoded = decode_event(out.value)
        assert isinstance(decoded, Envelope), decoded  # what the worker takes: nothing in clear
        assert out.key == decoded.customer_key.encode()
        assert b"example.org" not in out.value.lower() and b"Ann" not in out.value
    sealed_registration = orjson.loads(result.events[0].value)
    assert sealed_registration["payload"]["birth_month"] == 7
    assert sealed_registration["received_at"].startswith("2026-11-23T12:00:00")  # the record's timestamp
    assert result.events[2].key.startswith(b"email_hash:")

    reasons = {int(dict(out.headers)["crm.dlq.source.offset"]): dict(out.headers)["crm.dlq.reason"].decode()
               for out in result.dead_letters}
    assert reasons == {1: "malformed_json", 3: "occurred_in_future", 5: "unknown_type", 6: "malformed_json",
                       7: "not_an_object"}
    for out in result.dead_letters:
        headers = dict(out.headers)
        assert out.topic == "crm.intake.deadletter"
        assert headers["crm.dlq.source.topic"] == b"crm.intake" and headers["crm.dlq.source.partition"] == b"2"
        assert headers["crm.dlq.source.timestamp"] == str(int(NOW.timestamp() * 1000)).encode()
    assert result.dead_letters[0].value == b'{"broken'  # as it came (the intake dead letters live a day)
    assert result.refused == {"malformed_json": 2, "occurred_in_future": 1, "unknown_type": 1, "not_an_object": 1}


def test_the_same_record_gives_the_same_bytes_so_a_second_pass_is_a_duplicate():
    registration = submitted("customer_registered", customer_id="c-1", occurred_at=NOW.isoformat(),
                             payload={"name": "Ann Example", "email": "ann@example.org"})
    first = triage([record(registration, 0)], sealer([]), "DE")
    again = triage([record(registration, 0)], sealer([]), "DE")
    assert [out.value for out in first.events] == [out.value for out in again.events]
