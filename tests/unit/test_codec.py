import uuid

import orjson
import pytest

from schemas import decode_event, encode_event, fingerprint, personal_fields
from schemas.codec import MAX_EVENT_BYTES, DecodeError
from schemas.events import EVENT_TYPES, event_model
from tests.factories import encoded, event


def test_valid_purchase_decodes_with_typed_payload_and_customer_key():
    decoded = decode_event(encoded(event()))
    assert not isinstance(decoded, DecodeError)
    assert str(decoded.payload.total) == "7.00"
    assert decoded.customer_key == "cust-1"


def test_alias_only_event_is_keyed_by_its_first_alias():
    body = event("daily_sign_in", customer_id=None, identifiers={"app_user_id": "u-9", "device_id": "d-1"})
    assert decode_event(encoded(body)).customer_key == "app_user_id:u-9"


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (encoded(event(type="points_teleported")), "unknown_type"),
    (encoded(event(schema_version=99)), "unsupported_schema_version"),
    (encoded(event(occurred_at="2026-03-01T10:00:00")), "schema_invalid"),  # no timezone
    (encoded(event(customer_id=None)), "schema_invalid"),  # names no customer
    (encoded(event("survey_answered", payload={"survey_id": "s", "kind": "nps", "score": 11})), "schema_invalid"),
    (encoded(event("survey_answered", payload={"survey_id": "s", "kind": "csat", "score": 0})), "schema_invalid"),
    (encoded(event(extra_field=1)), "schema_invalid"),
    (b" " * (MAX_EVENT_BYTES + 1), "too_large"),
])
def test_bad_input_is_a_decode_error_with_its_reason(raw, reason):
    result = decode_event(raw)
    assert isinstance(result, DecodeError)
    assert result.reason == reason
    assert result.detail


def test_schema_invalid_detail_names_the_field():
    body = event()
    body["payload"]["lines"][0]["quantity"] = 0
    result = decode_event(encoded(body))
    assert result.reason == "schema_invalid"
    assert "payload.lines.0.quantity" in result.detail


def test_encode_decode_round_trip_is_stable():
    decoded = decode_event(encoded(event()))
    again = decode_event(encode_event(decoded))
    assert again == decoded
    assert encode_event(again) == encode_event(decoded)


def test_fingerprint_ignores_received_at_only():
    body = event()
    first = decode_event(encoded({**body, "received_at": "2026-03-01T10:00:01+00:00"}))
    retry = decode_event(encoded({**body, "received_at": "2026-03-02T08:00:00+00:00"}))
    changed = decode_event(encoded({**body, "occurred_at": "2026-03-01T10:00:02+00:00"}))
    assert fingerprint(first) == fingerprint(retry)
    assert fingerprint(first) != fingerprint(changed)


def test_every_type_of_the_issue_is_in_the_catalog():
    assert {
        "customer_registered", "profile_updated", "identity_linked", "consent_changed", "purchase_completed",
        "purchase_refunded", "product_viewed", "page_viewed", "search_performed", "app_session_started",
        "daily_sign_in", "content_shared", "review_posted", "complaint_filed", "complaint_resolved",
        "survey_answered", "coupon_issued", "coupon_redeemed", "points_redemption_requested",
        "points_adjusted", "customer_erasure_requested",
    } <= EVENT_TYPES


def test_personal_fields_are_marked():
    assert set(personal_fields(event_model("customer_registered"))) == {
        "payload.name", "payload.email", "payload.phone", "payload.birthday", "payload.address",
    }
    assert personal_fields(event_model("purchase_completed")) == []


def test_manual_points_adjustment_needs_reason_and_operator():
    body = event("points_adjusted", payload={"adjustment_id": "a1", "points": 50, "reason": "goodwill"})
    assert decode_event(encoded(body)).reason == "schema_invalid"
    body["payload"]["operator"] = "agent-7"
    assert not isinstance(decode_event(encoded(body)), DecodeError)


def test_daily_sign_in_may_omit_its_empty_payload():
    body = event("daily_sign_in")
    del body["payload"]
    assert not isinstance(decode_event(orjson.dumps(body)), DecodeError)


def test_event_id_must_be_a_uuid():
    assert decode_event(encoded(event(event_id="abc"))).reason == "schema_invalid"
    assert not isinstance(decode_event(encoded(event(event_id=str(uuid.uuid4())))), DecodeError)


def test_an_unknown_timezone_is_refused_before_any_fold_meets_it():
    """A zone the folds cannot load would stop the worker on every redelivery (a poison pill)."""
    for zone in ("Mars/Olympus_Mons", "y" * 300, "../../etc/passwd"):
        body = event("daily_sign_in")
        body["source"]["timezone"] = zone
        decoded = decode_event(orjson.dumps(body))
        assert isinstance(decoded, DecodeError) and decoded.reason == "schema_invalid", zone
