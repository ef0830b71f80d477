"""Lifecycle segments as pure functions of a customer's events and event time, and through the
pipeline: changes that time alone causes come from clock ticks in the log, dated at the boundary."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import decode_event
from streams.config import settings as crm_settings
from streams.loyalty.calendar import to_ms
from streams.pipeline import (
    ProfileChanged, SegmentChanged, SourceRecord, load_customer, process, profile_after_event, profile_until,
)
from streams.profile import CustomerProfile
from streams.rulebooks import load_rulebooks
from streams.segments.rules import SegmentRules
from tests.factories import encoded, event

RULES = load_rulebooks(crm_settings())
SEGMENTS = RULES.segments
T0 = datetime(2026, 3, 2, 10, tzinfo=UTC)


def ev(type_, at, **fields):
    decoded = decode_event(encoded(event(type_, customer_id="c-1", occurred_at=at.isoformat(), **fields)))
    assert not hasattr(decoded, "reason"), decoded
    return decoded


def live(items):
    """Fold events and `("advance", datetime)` steps as the worker does; return profile and changes."""
    profile, changes = CustomerProfile("c-1"), []
    for offset, item in enumerate(items):
        if isinstance(item, tuple):
            profile, passed = profile_until(profile, to_ms(item[1]), RULES)
        else:
            profile, passed = profile_after_event(profile, item, offset, RULES)
        changes += passed
    return profile, changes


def path(changes, dimension="lifecycle"):
    return [(c.from_segment, c.to_segment, c.cause_type) for c in changes if c.dimension == dimension]


def test_a_customer_is_new_then_active_while_buying_then_dormant_then_lost():
    first = ev("customer_registered", T0)
    buy = ev("purchase_completed", T0 + timedelta(days=10))
    profile, changes = live([first, buy, ("advance", T0 + timedelta(days=400))])
    assert path(changes) == [("", "new", "event"), ("new", "active", "time"), ("active", "dormant", "time"),
                             ("dormant", "lost", "time")]
    # Each change that time caused is dated at its boundary, not at the tick that found it.
    stages = [c for c in changes if c.dimension == "lifecycle"]
    assert [c.occurred_ms for c in stages[1:]] == [
        to_ms(T0 + timedelta(days=30)), to_ms(T0 + timedelta(days=100)), to_ms(T0 + timedelta(days=190))]
    assert stages[0].cause_event_id == str(first.event_id)
    assert [c.seq for c in changes] == list(range(len(changes)))
    assert (profile.lifecycle_stage, profile.lifecycle_since_ms) == ("lost", to_ms(T0 + timedelta(days=190)))


def test_browsing_keeps_a_customer_from_lost_but_not_from_dormant():
    items = [ev("customer_registered", T0)]
    items += [ev("product_viewed", T0 + timedelta(days=d)) for d in range(20, 400, 60)]
    profile, changes = live([*items, ("advance", T0 + timedelta(days=400))])
    assert path(changes) == [("", "new", "event"), ("new", "dormant", "time")]


def test_a_purchase_brings_a_dormant_or_lost_customer_back_to_active():
    profile, changes = live([ev("customer_registered", T0), ev("purchase_completed", T0 + timedelta(days=300))])
    assert path(changes)[-2:] == [("dormant", "lost", "time"), ("lost", "active", "event")]
    assert profile.lifecycle_stage == "active"


def test_a_late_event_never_moves_the_clock_back():
    profile, changes = live([ev("customer_registered", T0), ("advance", T0 + timedelta(days=50)),
                             ev("product_viewed", T0 + timedelta(days=5))])
    assert profile.clock_ms == to_ms(T0 + timedelta(days=50))
    assert profile.lifecycle_stage == "dormant"


def test_segment_rules_are_validated():
    with pytest.raises(ValueError, match="lost_days"):
        SegmentRules.model_validate({"versions": [{"version": "x", "effective_from": T0,
                                                   "lifecycle": {"active_days": 90, "lost_days": 60}}]})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 500), st.sampled_from(["purchase_completed", "product_viewed"])),
                min_size=1, max_size=12),
       st.lists(st.integers(1, 600), max_size=8))
def test_ticks_in_one_step_or_many_give_the_same_changes(activity, tick_days):
    items = [ev("customer_registered", T0)] + [ev(kind, T0 + timedelta(days=d)) for d, kind in sorted(activity)]
    end = ("advance", T0 + timedelta(days=700))
    steps = [("advance", T0 + timedelta(days=d, hours=1)) for d in tick_days]

    def at(item):
        return item[1] if isinstance(item, tuple) else item.occurred_at

    _, once = live([*items, end])
    _, many = live(sorted([*items, *steps], key=at) + [end])
    assert [c.to_dict() | {"cause_event_id": ""} for c in once] == [c.to_dict() | {"cause_event_id": ""} for c in many]
    # Stages follow each other as the definitions allow, never repeating.
    stages = [c for c in once if c.dimension == "lifecycle"]
    assert all(a.to_segment != b.to_segment for a, b in zip(stages, stages[1:]))


def test_a_clock_tick_moves_quiet_customers_through_the_pipeline():
    store, seen = {}, {}
    register = event("customer_registered", customer_id="c-9", occurred_at=T0.isoformat())
    records = [SourceRecord(b"c-9", encoded(register), 0, 0, 0)]
    tick = {"event_id": str(uuid.uuid4()), "type": "clock_ticked", "partition": 0,
            "occurred_at": (T0 + timedelta(days=200)).isoformat()}
    records.append(SourceRecord(b"clock", encoded(tick), 0, 1, 0))
    outputs = [o for r in records for o in process(r, store, seen, RULES)]
    changed = [o.data for o in outputs if isinstance(o, SegmentChanged)]
    assert [(c["from_segment"], c["to_segment"], c["cause_type"]) for c in changed if c["dimension"] == "lifecycle"] == [
        ("", "new", "event"), ("new", "dormant", "time"), ("dormant", "lost", "time")]
    profiles = [o.profile for o in outputs if isinstance(o, ProfileChanged)]
    assert profiles[-1].lifecycle_stage == "lost" and profiles[-1].version == 2
    assert load_customer(store, "c-9").profile.lifecycle_stage == "lost"
    # The same tick delivered again changes nothing new: the same changes, re-sent.
    again = process(records[1], store, seen, RULES)
    assert [o.data for o in again if isinstance(o, SegmentChanged)] == [c for c in changed if c["cause_type"] == "time"]
