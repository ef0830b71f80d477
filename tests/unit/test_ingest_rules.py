"""The edge's rules as pure functions: what an event must be, and what the API does to it before
Kafka (the same rules against the real broker: tests/integration/test_ingest_api.py)."""

from datetime import UTC, datetime, timedelta

import hashlib
import hmac

import orjson

from schemas.codec import decode_catalog_event, to_json_dict
from schemas.envelope import Envelope
from services.ingest.hygiene import Checked, Refused, check, identity_hash
from services.ingest.sealing import Sealer, needs_sealing, offline_keys
from services.ingest.keys import DEFAULT_TYPES, ApiKey, SourceKind
from services.ingest.ratelimit import RateLimiter
from tests.factories import submitted as event  # the edge checks what producers submit: personal values plain

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)
SECRET = b"test-identity-secret"


def key(source="backoffice", store=None):
    return ApiKey("k1", SourceKind(source), "test", store, DEFAULT_TYPES[source], 10.0, 20, 0.0, None)


def test_clock_rules_refuse_the_future_and_mark_the_late():
    ahead = check(event("daily_sign_in", occurred_at=(NOW + timedelta(minutes=6)).isoformat()), key(), NOW, "DE", SECRET)
    assert isinstance(ahead, Refused) and ahead.reason == "occurred_in_future"
    within = check(event("daily_sign_in", occurred_at=(NOW + timedelta(minutes=4)).isoformat()), key(), NOW, "DE", SECRET)
    assert isinstance(within, Checked) and not within.late
    old = check(event("daily_sign_in", occurred_at=(NOW - timedelta(days=8)).isoformat()), key(), NOW, "DE", SECRET)
    assert isinstance(old, Checked) and old.late and old.event.received_at == NOW


def test_normalisation_hashes_contact_details_and_keeps_given_hashes():
    body = event("customer_registered", occurred_at=NOW.isoformat(),
                 payload={"email": " A@B.ORG", "phone": "+44 20 7946 0958"})
    checked = check(body, key(), NOW, "DE", SECRET)
    assert isinstance(checked, Checked)
    assert checked.event.identifiers.email_hash == identity_hash(SECRET, "a@b.org")
    assert checked.event.identifiers.phone_hash == identity_hash(SECRET, "+442079460958")
    given = {**body, "identifiers": {"email_hash": "precomputed"}}
    assert check(given, key(), NOW, "DE", SECRET).event.identifiers.email_hash == "precomputed"
    # Keyed: an HMAC under the identity secret, not a hash anyone can compute from a list of addresses.
    assert identity_hash(SECRET, "a@b.org") == hmac.new(SECRET, b"a@b.org", hashlib.sha256).hexdigest()
    assert identity_hash(SECRET, "a@b.org") != hashlib.sha256(b"a@b.org").hexdigest()
    assert identity_hash(b"another secret", "a@b.org") != identity_hash(SECRET, "a@b.org")
    # The submitted form keeps the personal values plain: sealing comes after (sealing.py).
    assert checked.event.payload.email == "a@b.org"


def test_a_producer_that_knows_only_an_email_or_phone_gives_it_plain_and_the_edge_keeps_only_its_hash():
    body = event("purchase_completed", occurred_at=NOW.isoformat())
    body.pop("customer_id")
    body["identifiers"] = {"email": " Ann@Example.ORG ", "phone": "030 1234567"}
    checked = check(body, key(), NOW, "DE", SECRET)
    assert isinstance(checked, Checked)
    assert checked.event.identifiers.email_hash == identity_hash(SECRET, "ann@example.org")
    assert checked.event.identifiers.phone_hash == identity_hash(SECRET, "+49301234567")
    assert checked.event.customer_key == f"phone_hash:{identity_hash(SECRET, '+49301234567')}"
    dumped = to_json_dict(checked.event)
    assert "email" not in dumped["identifiers"] and "phone" not in dumped["identifiers"]
    assert "ann@example.org" not in str(dumped).lower()
    bad = check({**body, "identifiers": {"email": "not an address"}}, key(), NOW, "DE", SECRET)
    assert isinstance(bad, Refused) and bad.reason == "schema_invalid"
    assert [e.field for e in bad.errors] == ["identifiers.email"]


def test_the_intake_clock_takes_history_and_keeps_a_given_received_at_but_refuses_the_future():
    years_ago = event("daily_sign_in", occurred_at=(NOW - timedelta(days=4000)).isoformat())
    assert check(years_ago, key(), NOW, "DE", SECRET).reason == "occurred_too_long_ago"
    taken = check(years_ago, key(), NOW, "DE", SECRET, history=True)
    assert isinstance(taken, Checked) and not taken.late and taken.event.received_at == NOW
    given = {**years_ago, "received_at": (NOW - timedelta(days=3999)).isoformat()}
    assert check(given, key(), NOW, "DE", SECRET, history=True).event.received_at == NOW - timedelta(days=3999)
    ahead = event("daily_sign_in", occurred_at=(NOW + timedelta(minutes=6)).isoformat())
    assert check(ahead, key(), NOW, "DE", SECRET, history=True).reason == "occurred_in_future"
    before_1900 = event("daily_sign_in", occurred_at="1850-01-01T00:00:00+00:00")
    assert check(before_1900, key(), NOW, "DE", SECRET, history=True).reason == "schema_invalid"


def test_sealing_a_batch_asks_for_keys_once_and_is_deterministic():
    calls = []
    keys = offline_keys(b"k")

    def keys_for(customer_keys):
        calls.append(sorted(customer_keys))
        return keys(customer_keys)

    sealer = Sealer(keys_for, SECRET)
    events = [to_json_dict(check(event("customer_registered", customer_id=f"c-{n}", occurred_at=NOW.isoformat(),
                                       payload={"name": "Ann Example", "email": "ann@example.org",
                                                "birthday": "1990-07-14"}),
                                 key(), NOW, "DE", SECRET).event) for n in range(3)]
    events.append(to_json_dict(check(event("daily_sign_in", occurred_at=NOW.isoformat()), key(), NOW, "DE",
                                     SECRET).event))
    first = sealer.seal(events)
    assert calls == [["c-0", "c-1", "c-2"]]  # one call for the batch, only customers with personal values
    assert first == sealer.seal(events) and first[3] == events[3]
    for sealed in first[:3]:
        assert isinstance(decode_catalog_event(sealed), Envelope)
        assert sealed["payload"]["birth_month"] == 7 and sealed["payload"]["name"].startswith("pii1.")
        assert "ann@example.org" not in orjson.dumps(sealed).decode()
    assert not needs_sealing(first[0]) and needs_sealing(events[0])


def test_field_errors_name_the_field():
    body = event("purchase_completed", occurred_at=NOW.isoformat())
    body["payload"]["currency"] = "euro"
    refused = check(body, key(), NOW, "DE", SECRET)
    assert isinstance(refused, Refused) and refused.reason == "schema_invalid"
    assert [e.field for e in refused.errors] == ["payload.currency"]


def test_scopes():
    assert check(event("points_adjusted", occurred_at=NOW.isoformat()), key("app"), NOW, "DE", SECRET).reason == "type_not_allowed"
    other_store = check(event("purchase_completed", occurred_at=NOW.isoformat()), key("pos", "store-2"), NOW, "DE", SECRET)
    assert other_store.reason == "store_not_allowed"
    own = check(event("purchase_completed", occurred_at=NOW.isoformat()), key("pos", "store-1"), NOW, "DE", SECRET)
    assert isinstance(own, Checked)


def test_rate_limiter_refills_at_the_rate_and_says_how_long_to_wait():
    clock = [0.0]
    limiter = RateLimiter(lambda: clock[0])
    assert limiter.take("k", 20, rate=10, burst=20) == 0
    assert limiter.take("k", 5, rate=10, burst=20) == 1
    clock[0] = 0.5
    assert limiter.take("k", 5, rate=10, burst=20) == 0
    assert limiter.take("k", 30, rate=10, burst=20) == 3
