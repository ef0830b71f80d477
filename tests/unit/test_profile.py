import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from schemas import decode_event
from streams.config import settings as crm_settings
from streams.pipeline import ProfileChanged, SourceRecord, process
from streams.profile import fold_profile
from streams.rulebooks import load_rulebooks
from tests.factories import encoded, event

RULES = load_rulebooks(crm_settings())


def fold_all(bodies):
    profile = None
    for offset, body in enumerate(bodies):
        profile = fold_profile(profile, decode_event(encoded(body)), offset)
    return profile


def test_purchases_and_refunds_make_net_spend_in_minor_units():
    profile = fold_all([event(), event(), event("purchase_refunded")])
    assert profile.purchase_count == 2
    assert profile.refund_count == 1
    assert profile.spend_minor == {"EUR": 700 + 700 - 200}


def test_first_and_last_seen_follow_event_time_not_arrival_order():
    late = event("product_viewed", occurred_at="2026-02-01T09:00:00+00:00")
    profile = fold_all([event(), event("product_viewed", occurred_at="2026-04-01T09:00:00+01:00"), late])
    assert profile.first_seen_ms == 1769936400000  # 2026-02-01T09:00Z, the late event
    assert profile.last_seen_ms == 1775030400000  # 2026-04-01T08:00Z
    assert profile.last_purchase_ms == 1772359200000  # 2026-03-01T10:00Z


def test_channels_and_stores_are_sets_in_stable_order():
    profile = fold_all([event(), event("product_viewed"), event(source={"channel": "pos", "store_id": "store-0"})])
    assert profile.channels == ("app", "pos")
    assert profile.stores == ("store-0", "store-1")


def test_version_counts_events_and_last_offset_tracks_position():
    profile = fold_all([event(), event("daily_sign_in"), event("daily_sign_in")])
    assert (profile.version, profile.last_offset) == (3, 2)


def test_profile_survives_its_storage_round_trip():
    from streams.profile import CustomerProfile

    profile = fold_all([event(), event("product_viewed")])
    assert CustomerProfile.from_dict(profile.to_dict()) == profile


# --- the profile's richer figures --------------------------------------------------------------------

def at(day, hour=10):
    return (datetime(2026, 3, 1, hour, tzinfo=UTC) + timedelta(days=day)).isoformat()


def test_trailing_spend_and_activity_are_as_of_the_latest_event_time():
    profile = fold_all([
        event(occurred_at=at(0)),                                  # 7.00, 100 days before the last event
        event(occurred_at=at(60)),                                 # 7.00, 40 days before
        event("purchase_refunded", occurred_at=at(75)),            # -2.00, 25 days before
        event("daily_sign_in", occurred_at=at(80)),
        event("app_session_started", payload={"session_id": "s"}, occurred_at=at(99)),
        event("product_viewed", occurred_at=at(100)),
    ])
    record = profile.to_record()
    assert record["as_of_ms"] == profile.last_seen_ms
    assert (record["spend_30d_minor"], record["spend_90d_minor"], record["spend_365d_minor"]) == (
        {"EUR": -200}, {"EUR": 500}, {"EUR": 1200})
    assert (record["sessions_30d"], record["sign_ins_30d"]) == (1, 1)
    assert record["average_order_minor"] == {"EUR": 700}   # order totals before refunds / orders


def test_consent_is_the_latest_by_event_time_whatever_the_arrival_order():
    grant = event("consent_changed", payload={"channel": "email", "granted": True}, occurred_at=at(5))
    revoke = event("consent_changed", payload={"channel": "email", "granted": False}, occurred_at=at(3))
    sms = event("consent_changed", payload={"channel": "sms", "granted": True}, occurred_at=at(1))
    assert fold_all([sms, grant, revoke]).to_record()["marketing_consent"] == ["email", "sms"]
    assert fold_all([sms, revoke, grant]).to_record()["marketing_consent"] == ["email", "sms"]


def test_survey_trend_complaints_and_favourites():
    profile = fold_all([
        event("survey_answered", payload={"survey_id": "a", "kind": "nps", "score": 9}, occurred_at=at(1)),
        event("survey_answered", payload={"survey_id": "c", "kind": "nps", "score": 4}, occurred_at=at(3)),
        event("survey_answered", payload={"survey_id": "b", "kind": "nps", "score": 7}, occurred_at=at(2)),
        event("complaint_resolved", payload={"complaint_id": "k1"}, occurred_at=at(4)),  # before its filing arrives
        event("complaint_filed", payload={"complaint_id": "k1", "category": "delivery"}, occurred_at=at(2)),
        event("complaint_filed", payload={"complaint_id": "k2", "category": "staff"}, occurred_at=at(5)),
        event(payload={"order_id": "o1", "currency": "EUR", "lines": [
            {"sku": "a", "category": "toys", "quantity": 2, "unit_price": "1"},
            {"sku": "b", "category": "books", "quantity": 2, "unit_price": "1"},
            {"sku": "c", "category": "garden", "quantity": 5, "unit_price": "1"},
            {"sku": "d", "category": "wine", "quantity": 1, "unit_price": "1"}]}),
    ])
    record = profile.to_record()
    assert (record["nps_latest"], record["nps_trend"], record["csat_latest"]) == (4, -3, None)
    assert (record["complaint_count"], record["open_complaints"]) == (2, 1)
    assert record["favourite_categories"] == ["garden", "books", "toys"]
    assert (record["favourite_store"], record["favourite_channel"]) == ("store-1", "app")


def test_aliases_come_from_identifiers_and_identity_links():
    profile = fold_all([
        event("product_viewed", identifiers={"device_id": "dev-9"}),
        event("identity_linked", payload={"alias_type": "loyalty_card", "alias_value": "LC-1"}),
        event("customer_registered", payload={"name": "Ada", "phone": "+3612345678"}),
    ])
    assert profile.aliases == ("device_id:dev-9", "loyalty_card:LC-1")
    assert profile.contact == ("phone",)


def test_a_clock_tick_slides_the_trailing_windows_without_any_event_from_the_customer():
    store, seen = {}, {}
    records = [SourceRecord(b"c-5", encoded(event(customer_id="c-5", occurred_at=at(0))), 0, 0, 0)]
    for offset, day in enumerate((10, 31, 95, 400), start=1):
        tick = {"event_id": str(uuid.uuid4()), "type": "clock_ticked", "partition": 0, "occurred_at": at(day)}
        records.append(SourceRecord(b"clock", encoded(tick), 0, offset, 0))
    changes = []
    for r in records:
        for o in process(r, store, seen, RULES):
            if isinstance(o, ProfileChanged):
                figures = o.profile.to_record()
                changes.append((r.offset, o.profile.version, figures["spend_30d_minor"], figures["spend_90d_minor"],
                                figures["spend_365d_minor"]))
    # Day 10 changes nothing; day 31 drops the purchase from 30 days, 95 from 90 days, 400 from a year.
    assert changes == [
        (0, 1, {"EUR": 700}, {"EUR": 700}, {"EUR": 700}),
        (2, 2, {}, {"EUR": 700}, {"EUR": 700}),
        (3, 3, {}, {}, {"EUR": 700}),
        (4, 4, {}, {}, {}),
    ]


@given(st.permutations(range(8)))
def test_figures_do_not_depend_on_arrival_order(order):
    bodies = [
        event(occurred_at=at(0)), event("purchase_refunded", occurred_at=at(40)),
        event("daily_sign_in", occurred_at=at(70)), event("product_viewed", occurred_at=at(95)),
        event("survey_answered", payload={"survey_id": "a", "kind": "csat", "score": 2}, occurred_at=at(20)),
        event("survey_answered", payload={"survey_id": "b", "kind": "csat", "score": 5}, occurred_at=at(30)),
        event("consent_changed", payload={"channel": "push", "granted": True}, occurred_at=at(10)),
        event("consent_changed", payload={"channel": "push", "granted": False}, occurred_at=at(12)),
    ]
    assert fold_all([bodies[i] for i in order]).figures() == fold_all(bodies).figures()
