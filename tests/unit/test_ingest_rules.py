"""The edge's rules as pure functions: what an event must be, and what the API does to it before
Kafka (the same rules against the real broker: tests/integration/test_ingest_api.py)."""

from datetime import UTC, datetime, timedelta

from services.ingest.hygiene import Checked, Refused, check, identity_hash
from services.ingest.keys import DEFAULT_TYPES, ApiKey, SourceKind
from services.ingest.ratelimit import RateLimiter
from tests.factories import event

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


def key(source="backoffice", store=None):
    return ApiKey("k1", SourceKind(source), "test", store, DEFAULT_TYPES[source], 10.0, 20, 0.0, None)


def test_clock_rules_refuse_the_future_and_mark_the_late():
    ahead = check(event("daily_sign_in", occurred_at=(NOW + timedelta(minutes=6)).isoformat()), key(), NOW, "DE")
    assert isinstance(ahead, Refused) and ahead.reason == "occurred_in_future"
    within = check(event("daily_sign_in", occurred_at=(NOW + timedelta(minutes=4)).isoformat()), key(), NOW, "DE")
    assert isinstance(within, Checked) and not within.late
    old = check(event("daily_sign_in", occurred_at=(NOW - timedelta(days=8)).isoformat()), key(), NOW, "DE")
    assert isinstance(old, Checked) and old.late and old.event.received_at == NOW


def test_normalisation_hashes_contact_details_and_keeps_given_hashes():
    body = event("customer_registered", occurred_at=NOW.isoformat(),
                 payload={"email": " A@B.ORG", "phone": "+44 20 7946 0958"})
    checked = check(body, key(), NOW, "DE")
    assert isinstance(checked, Checked)
    assert checked.event.identifiers.email_hash == identity_hash("a@b.org")
    assert checked.event.identifiers.phone_hash == identity_hash("+442079460958")
    given = {**body, "identifiers": {"email_hash": "precomputed"}}
    assert check(given, key(), NOW, "DE").event.identifiers.email_hash == "precomputed"


def test_field_errors_name_the_field():
    body = event("purchase_completed", occurred_at=NOW.isoformat())
    body["payload"]["currency"] = "euro"
    refused = check(body, key(), NOW, "DE")
    assert isinstance(refused, Refused) and refused.reason == "schema_invalid"
    assert [e.field for e in refused.errors] == ["payload.currency"]


def test_scopes():
    assert check(event("points_adjusted", occurred_at=NOW.isoformat()), key("app"), NOW, "DE").reason == "type_not_allowed"
    other_store = check(event("purchase_completed", occurred_at=NOW.isoformat()), key("pos", "store-2"), NOW, "DE")
    assert other_store.reason == "store_not_allowed"
    own = check(event("purchase_completed", occurred_at=NOW.isoformat()), key("pos", "store-1"), NOW, "DE")
    assert isinstance(own, Checked)


def test_rate_limiter_refills_at_the_rate_and_says_how_long_to_wait():
    clock = [0.0]
    limiter = RateLimiter(lambda: clock[0])
    assert limiter.take("k", 20, rate=10, burst=20) == 0
    assert limiter.take("k", 5, rate=10, burst=20) == 1
    clock[0] = 0.5
    assert limiter.take("k", 5, rate=10, burst=20) == 0
    assert limiter.take("k", 30, rate=10, burst=20) == 3
