"""Value tiers, RFM scores and segments, tags: pure functions of a profile, the rules and the
population boundaries, and through the pipeline: boundaries records in the log reach every customer
of the partition through the following ticks."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projections.boundaries import _quintile_cuts, _rank
from schemas.boundaries import RfmCuts, SegmentBoundaries, ValueCuts
from schemas.codec import decode_event
from streams.config import settings as crm_settings
from streams.loyalty.calendar import DAY_MS, to_ms
from streams.pipeline import (
    BoundariesApplied, DeadLetter, SegmentChanged, SourceRecord, load_customer, process, profile_after_event,
    profile_until,
)
from streams.profile import CustomerProfile
from streams.rulebooks import load_rulebooks
from streams.segments import scoring
from streams.segments.population import CHUNK, SWEEP_CHUNKS
from streams.segments.rules import SegmentRules
from tests.factories import encoded, event

RULES = load_rulebooks(crm_settings())
VERSION = RULES.segments.versions[0]
T0 = datetime(2026, 3, 2, 10, tzinfo=UTC)  # a Monday


def boundaries(partition=0, boundaries_id="b-1", recency=(10, 30, 60, 120), frequency=(1, 2, 4, 8),
               monetary=(1000, 5000, 10000, 50000), high=20000, mid=5000):
    return SegmentBoundaries(
        event_id=uuid.uuid4(), occurred_at=T0, partition=partition, boundaries_id=boundaries_id, currency="EUR",
        value=ValueCuts(high_min_minor=high, mid_min_minor=mid, population=100),
        rfm=RfmCuts(recency_days=list(recency), frequency=list(frequency), monetary_minor=list(monetary),
                    population=100))


def ev(type_, at, customer="c-1", **fields):
    decoded = decode_event(encoded(event(type_, customer_id=customer, occurred_at=at.isoformat(), **fields)))
    assert not hasattr(decoded, "reason"), decoded
    return decoded


def purchase(at, total="10.00", customer="c-1"):
    return ev("purchase_completed", at, customer, payload={
        "order_id": f"o-{uuid.uuid4().hex[:6]}", "currency": "EUR",
        "lines": [{"sku": "s", "category": "grocery", "quantity": 1, "unit_price": total}]})


def live(items, cuts=None):
    profile, changes = CustomerProfile("c-1"), []
    for offset, item in enumerate(items):
        if isinstance(item, tuple):
            profile, passed = profile_until(profile, to_ms(item[1]), RULES, cuts)
        else:
            profile, passed = profile_after_event(profile, item, offset, RULES, cuts)
        changes += passed
    return profile, changes


# --- pure scoring -------------------------------------------------------------------------------------

def test_value_tier_and_rfm_against_the_cuts():
    cuts = boundaries()
    profile, _ = live([purchase(T0 + timedelta(days=d), "60.00") for d in range(0, 50, 10)], cuts)
    # 5 purchases of 60 EUR, the last one now: R 5 (within 10 days), F 4 (5 is above 1, 2 and 4, not 8),
    # M 4 (30000 minor is above 1000, 5000 and 10000, not 50000): cell "54".
    assert profile.rfm == (5, 4, 4)
    assert profile.rfm_segment == "Champions"
    assert profile.value_tier == "high"  # 300 EUR over 365 days >= 200
    assert profile.boundaries_id == "b-1"


def test_without_boundaries_nobody_has_a_value_tier_or_rfm_scores():
    profile, changes = live([purchase(T0)])
    assert (profile.value_tier, profile.rfm, profile.rfm_segment) == ("", (0, 0, 0), "")
    assert {c.dimension for c in changes} <= {"lifecycle"} | {f"tag:{t}" for t in VERSION.tags}


def test_recency_falls_with_time_alone_at_the_exact_cut():
    cuts = boundaries()
    profile, changes = live([purchase(T0), ("advance", T0 + timedelta(days=200))], cuts)
    rfm = [c for c in changes if c.dimension == "rfm"]
    # R: 5 to day 10, 4 to day 30 (cell 41 and then 31 are both Promising), 2 from day 61, 1 from 121.
    assert [c.to_segment for c in rfm] == ["New", "Promising", "About to Sleep", "Lost"]
    assert [c.occurred_ms for c in rfm[1:]] == [to_ms(T0) + d * DAY_MS for d in (11, 61, 121)]
    assert profile.rfm == (1, 1, 1)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.integers(1, 40), st.integers(-5000, 200000),
       st.lists(st.integers(0, 300), min_size=4, max_size=4), st.lists(st.integers(1, 20), min_size=4, max_size=4),
       st.lists(st.integers(0, 100000), min_size=4, max_size=4))
def test_scores_are_one_to_five_monotone_and_every_cell_is_named(days, count, money, r_cuts, f_cuts, m_cuts):
    cuts = boundaries(recency=sorted(r_cuts), frequency=sorted(f_cuts), monetary=sorted(m_cuts))
    figures = {"days_since_last_purchase": days, "purchase_count": count, "monetary": money}
    r, f, m = scoring.rfm_scores(figures, cuts)
    assert all(1 <= score <= 5 for score in (r, f, m))
    more = scoring.rfm_scores({**figures, "purchase_count": count + 1, "monetary": money + 1}, cuts)
    later = scoring.rfm_scores({**figures, "days_since_last_purchase": days + 1}, cuts)
    assert more[1] >= f and more[2] >= m and later[0] <= r
    assert VERSION.rfm.segment_of(r, (f + m + 1) // 2) in VERSION.rfm.segments


def test_rules_must_name_every_rfm_cell_once_and_tags_only_known_figures():
    base = {"version": "x", "effective_from": T0}
    with pytest.raises(ValueError, match="missing"):
        SegmentRules.model_validate({"versions": [{**base, "rfm": {"segments": {"All": ["11"]}}}]})
    with pytest.raises(ValueError, match="unknown figures"):
        SegmentRules.model_validate({"versions": [{**base, "tags": {"x": {"shoe_size": {"min": 3}}}}]})
    with pytest.raises(ValueError, match="high_share"):
        SegmentRules.model_validate({"versions": [{**base, "value": {"high_share": 0.6, "mid_share": 0.5}}]})


def test_population_cuts_by_rank():
    assert _quintile_cuts(list(range(1, 11))) == [2, 4, 6, 8]
    assert _quintile_cuts([7]) == [7, 7, 7, 7]
    assert _rank((0.2,), 10) == 2 and _rank((0.2, 0.1), 10) == 3 and _rank((0.2,), 1) == 1


# --- tags ---------------------------------------------------------------------------------------------

def test_tags_enter_and_leave_with_behaviour_and_time():
    saturday = T0 + timedelta(days=5)
    items = [purchase(saturday + timedelta(days=7 * n)) for n in range(3)]
    items.append(ev("complaint_filed", saturday + timedelta(days=15), payload={
        "complaint_id": "k-1", "category": "service", "description": "slow"}))
    profile, changes = live([*items, ("advance", saturday + timedelta(days=200))])
    tags = [(c.dimension, c.from_segment, c.to_segment, c.occurred_ms) for c in changes if c.dimension.startswith("tag:")]
    assert ("tag:weekend_shopper", "", "weekend_shopper", to_ms(saturday + timedelta(days=14))) in tags
    # The complaint counts for 30 days; the lapsing-buyer tag holds from day 60 to day 120 after the last purchase.
    complaint = to_ms(saturday + timedelta(days=15))
    assert ("tag:recent_complaint", "recent_complaint", "", complaint + 30 * DAY_MS) in tags
    last = to_ms(saturday + timedelta(days=14))
    assert ("tag:lapsing_buyer", "", "lapsing_buyer", last + 60 * DAY_MS) in tags
    assert ("tag:lapsing_buyer", "lapsing_buyer", "", last + 121 * DAY_MS) in tags
    assert profile.tags == ("weekend_shopper",)


# --- through the pipeline -----------------------------------------------------------------------------

def record(body, offset, key=None, partition=0):
    raw = encoded(body if isinstance(body, dict) else body.model_dump(mode="json"))
    return SourceRecord(key if key is not None else body["customer_id"].encode(), raw, partition, offset, 0)


def tick(at, partition=0):
    return {"event_id": str(uuid.uuid4()), "type": "clock_ticked", "partition": partition,
            "occurred_at": at.isoformat()}


def test_boundaries_reach_every_customer_of_the_partition_through_the_ticks():
    store, seen = {}, {}
    customers = CHUNK * SWEEP_CHUNKS + 7  # more than one tick's sweep
    offset = 0
    for n in range(customers):
        body = event("purchase_completed", customer_id=f"c-{n}", occurred_at=T0.isoformat())
        process(record(body, offset), store, seen, RULES)
        offset += 1
    cuts = boundaries()
    out = process(SourceRecord(b"boundaries", encoded(cuts.model_dump(mode="json")), 0, offset, 0), store, seen, RULES)
    assert [type(o) for o in out] == [BoundariesApplied]
    offset += 1
    scored = lambda: sum(load_customer(store, f"c-{n}").profile.boundaries_id == "b-1" for n in range(customers))  # noqa: E731
    assert scored() == 0

    first_tick = SourceRecord(b"clock", encoded(tick(T0 + timedelta(hours=1))), 0, offset, 0)
    outputs = process(first_tick, store, seen, RULES)
    assert scored() == CHUNK * SWEEP_CHUNKS
    changes = [o.data for o in outputs if isinstance(o, SegmentChanged) and o.data["cause_type"] == "boundaries"]
    assert {c["dimension"] for c in changes} == {"value_tier", "rfm"} and all(c["cause_event_id"] == "b-1" for c in changes)
    # Redelivered, the tick re-sends what it changed and takes no further chunk.
    again = process(first_tick, store, seen, RULES)
    assert scored() == CHUNK * SWEEP_CHUNKS
    assert [o.data for o in again if isinstance(o, SegmentChanged)] == [o.data for o in outputs if isinstance(o, SegmentChanged)]

    process(SourceRecord(b"clock", encoded(tick(T0 + timedelta(hours=2))), 0, offset + 1, 0), store, seen, RULES)
    assert scored() == customers


def test_a_customers_own_event_applies_the_boundaries_at_once_and_misrouted_ones_are_dead_lettered():
    store, seen = {}, {}
    process(record(event("purchase_completed", customer_id="c-1", occurred_at=T0.isoformat()), 0), store, seen, RULES)
    process(SourceRecord(b"boundaries", encoded(boundaries().model_dump(mode="json")), 0, 1, 0), store, seen, RULES)
    later = event("purchase_completed", customer_id="c-1", occurred_at=(T0 + timedelta(days=1)).isoformat())
    outputs = process(record(later, 2), store, seen, RULES)
    assert load_customer(store, "c-1").profile.boundaries_id == "b-1"
    assert any(isinstance(o, SegmentChanged) and o.data["dimension"] == "rfm" for o in outputs)
    wrong = boundaries(partition=3)
    out = process(SourceRecord(b"boundaries", encoded(wrong.model_dump(mode="json")), 0, 3, 0), store, seen, RULES)
    assert [o.reason for o in out if isinstance(o, DeadLetter)] == ["misrouted_boundaries"]
