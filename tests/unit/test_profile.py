from schemas import decode_event
from streams.profile import fold_profile
from tests.factories import encoded, event


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
