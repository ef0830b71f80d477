"""The fold's fast paths against the plain code they replace: same values, same dict key order
(states and records are stored as bytes), same deadlines. Each reference below is the earlier,
reflective implementation, kept here as the specification."""

from __future__ import annotations

import dataclasses
import statistics
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from itertools import pairwise

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import decode_event
from streams import profile as profiles
from streams import trailing
from streams.churn import indicators
from streams.churn.state import ChurnState
from streams.config import settings as crm_settings
from streams.loyalty import ledger
from streams.loyalty.calendar import DAY_MS, to_ms
from streams.loyalty.ledger import Account, Lot, Order
from streams.pipeline import SourceRecord, load_customer, process
from streams.profile import SNAPSHOT_FIELDS, CustomerProfile
from streams.rulebooks import load_rulebooks
from streams.segments import membership, scoring
from streams.segments.rules import SegmentRules
from tests.factories import encoded, event

RULES = load_rulebooks(crm_settings())
T0 = datetime(2026, 3, 2, 10, tzinfo=UTC)
KINDS = (trailing.PURCHASE, trailing.REFUND, trailing.SESSION, trailing.SIGN_IN, trailing.COMPLAINT)

entry = st.tuples(st.integers(0, 400 * DAY_MS), st.sampled_from(KINDS), st.sampled_from(["EUR", "USD", ""]),
                  st.integers(1, 10_000))
entries = st.lists(entry, max_size=30).map(lambda items: tuple(sorted(items)))


# --- references: the implementations the fast paths replaced --------------------------------------

def reference_prune(items, as_of_ms):
    kept = tuple(e for e in items if e[0] > as_of_ms - trailing.KEEP_DAYS[e[1]] * DAY_MS)
    return items if len(kept) == len(items) else kept


def reference_figures(items, as_of_ms):
    spend = {days: {} for days in trailing.SPEND_WINDOWS_DAYS}
    activity = {trailing.SESSION: 0, trailing.SIGN_IN: 0, trailing.COMPLAINT: 0}
    for occurred, kind, currency, amount in items:
        if occurred > as_of_ms:
            continue
        age = as_of_ms - occurred
        if kind in activity:
            activity[kind] += age < trailing.ACTIVITY_WINDOW_DAYS * DAY_MS
            continue
        signed = amount if kind == trailing.PURCHASE else -amount
        for days in trailing.SPEND_WINDOWS_DAYS:
            if age < days * DAY_MS:
                spend[days][currency] = spend[days].get(currency, 0) + signed
    return {**{f"spend_{days}d_minor": totals for days, totals in spend.items()},
            "sessions_30d": activity[trailing.SESSION], "sign_ins_30d": activity[trailing.SIGN_IN],
            "complaints_30d": activity[trailing.COMPLAINT]}


def reference_next_change(items, after_ms):
    return min((occurred + days * DAY_MS for occurred, kind, _, _ in items for days in trailing.WINDOWS_DAYS[kind]
                if occurred + days * DAY_MS > after_ms), default=None)


def reference_profile_to_dict(profile):
    return {name: value for name, default in profiles._DEFAULTS.items()
            if (value := getattr(profile, name)) != default or name == "customer_key"}


def reference_account_to_dict(account):
    scalars = {name: spec.default for name, spec in Account.__dataclass_fields__.items()
               if name not in ("lots", "orders", "qualifying", "handled_ids")}
    data = {name: value for name, default in scalars.items()
            if (value := getattr(account, name)) != default or name == "customer_key"}
    data["lots"] = [[getattr(lot, name) for name in Lot.__dataclass_fields__] for lot in account.lots]
    data["orders"] = {order_id: [getattr(order, name) for name in Order.__dataclass_fields__]
                      for order_id, order in account.orders.items()}
    data["qualifying"] = [list(e) for e in account.qualifying]
    data["handled_ids"] = list(account.handled_ids)
    return data


# --- trailing windows -------------------------------------------------------------------------------

@given(entries, st.integers(0, 800 * DAY_MS))
def test_trailing_windows_match_the_reference(items, as_of_ms):
    assert trailing.prune(items, as_of_ms) == reference_prune(items, as_of_ms)
    assert (trailing.prune(items, as_of_ms) is items) == (reference_prune(items, as_of_ms) is items)
    figures = trailing.figures(items, as_of_ms)
    assert orjson.dumps(figures) == orjson.dumps(reference_figures(items, as_of_ms))
    assert trailing.next_change_ms(items, as_of_ms) == reference_next_change(items, as_of_ms)


# --- the profile ------------------------------------------------------------------------------------

def simulated_profiles():
    """Profiles as the pipeline leaves them, from a short simulated history of several customers."""
    log, store, seen = [], {}, {}
    for n in range(120):
        customer = f"c-{n % 3 if n < 90 else 3 + n % 2}"
        at = T0 + timedelta(days=n * 2, hours=n)
        type_ = ("purchase_completed", "product_viewed", "app_session_started", "survey_answered",
                 "purchase_refunded", "daily_sign_in", "complaint_filed", "consent_changed")[n % 8]
        fields = {"payload": {"survey_id": "s", "kind": "nps", "score": n % 10}} if type_ == "survey_answered" else {}
        if type_ == "consent_changed":
            fields = {"payload": {"channel": "email", "granted": True}}
        if type_ == "app_session_started":
            fields = {"payload": {"session_id": f"s-{n}"}}
        if type_ == "complaint_filed":
            fields = {"payload": {"complaint_id": f"k-{n}", "category": "delivery"}}
        body = event(type_, customer, occurred_at=at.isoformat(), **fields)
        record = SourceRecord(customer.encode(), encoded(body), 0, len(log), int(at.timestamp() * 1000))
        log.append(record)
        process(record, store, seen, RULES)
    return [load_customer(store, f"c-{n}").profile for n in range(5)]


PROFILES = simulated_profiles()


def test_profile_state_dict_matches_the_reference_key_for_key_in_order():
    for profile in [*PROFILES, CustomerProfile("empty")]:
        data = profile.to_dict()
        assert list(data.items()) == list(reference_profile_to_dict(profile).items())
        back = CustomerProfile.from_dict(orjson.loads(orjson.dumps(data)))
        assert back == profile
        assert orjson.dumps(back.to_dict()) == orjson.dumps(data)


def test_profile_from_dict_fills_fresh_defaults_and_refuses_unknown_fields():
    first, second = CustomerProfile.from_dict({"customer_key": "a"}), CustomerProfile.from_dict({"customer_key": "b"})
    assert first == dataclasses.replace(CustomerProfile("a"))
    assert first.consent is not second.consent  # default_factory: never one dict for two profiles
    try:
        CustomerProfile.from_dict({"customer_key": "a", "no_such_field": 1})
    except TypeError:
        pass
    else:
        raise AssertionError("an unknown field must not be dropped silently")


def test_evolve_is_dataclasses_replace():
    for profile in PROFILES:
        changes = {"version": profile.version + 1, "clock_ms": profile.clock_ms + 5, "tags": ("x",)}
        assert profiles.evolve(profile, **changes) == dataclasses.replace(profile, **changes)
        assert profiles.evolve(profile) == profile


def test_figures_are_the_record_without_the_snapshot_fields_in_the_same_order():
    for profile in PROFILES:
        record = profile.to_record()
        assert list(profile.figures().items()) == [(k, v) for k, v in record.items() if k not in SNAPSHOT_FIELDS]


@given(st.integers(-10**20, 10**20), st.integers(1, 10**6))
def test_average_order_rounding_is_decimal_round_half_up(minor, count):
    expected = int((Decimal(minor) / count).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert profiles._divide(minor, count) == expected


@given(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 3)))
def test_favourite_is_the_top_one(counts):
    assert profiles._first(counts) == next(iter(profiles._top(counts, 1)), "")


# --- segments ---------------------------------------------------------------------------------------

def test_due_moments_are_the_same_with_and_without_the_memo():
    for profile in PROFILES:
        for after in range(profile.clock_ms, profile.clock_ms + 400 * DAY_MS, 7 * DAY_MS):
            remembered = membership._next_due_ms(profile, after, RULES.segments, None)
            membership._LastDue.last = None
            fresh = membership._next_due_ms(profile, after, RULES.segments, None)
            assert remembered == fresh


def test_advancing_in_one_go_or_in_steps_gives_the_same_profile_and_changes():
    """advance visits due moments without copying the profile at each; stepping through every
    day (a copy each time) must come out the same."""
    for profile in PROFILES:
        until = profile.clock_ms + 200 * DAY_MS
        whole, whole_changes = membership.advance(profile, until, RULES.segments, None)
        stepped, stepped_changes = profile, []
        for moment in range(profile.clock_ms + DAY_MS, until + 1, DAY_MS):
            stepped, made = membership.advance(stepped, moment, RULES.segments, None)
            stepped_changes += made
        assert whole == stepped
        assert [c.to_dict() for c in whole_changes] == [c.to_dict() for c in stepped_changes]


def test_versions_in_force_match_a_linear_scan():
    base = RULES.segments.versions[0].model_dump()
    versions = [{**base, "version": f"v{n}", "effective_from": datetime(2024 + n, 1, 1, tzinfo=UTC)} for n in range(4)]
    rules = SegmentRules.model_validate({"versions": versions})

    @given(st.integers(to_ms(datetime(2022, 1, 1, tzinfo=UTC)), to_ms(datetime(2029, 1, 1, tzinfo=UTC))))
    @settings(max_examples=200)
    def check(millis):
        expected = rules.versions[0]
        for version in rules.versions[1:]:
            if to_ms(version.effective_from) <= millis:
                expected = version
        assert rules.at_ms(millis) is expected

    check()
    assert rules.at_ms(to_ms(datetime(2025, 1, 1, tzinfo=UTC))).version == "v1"


def test_tags_match_the_rules_bounds():
    for profile in PROFILES:
        version = RULES.segments.at_ms(profile.clock_ms)
        figures = scoring.facts(profile, profile.clock_ms, version)
        expected = tuple(sorted(name for name, conditions in version.tags.items()
                                if all(bounds.holds(figures[field]) for field, bounds in conditions.items())))
        assert scoring.standing(profile, profile.clock_ms, version, None).tags == expected


# --- loyalty ----------------------------------------------------------------------------------------

def member_account():
    account = None
    for n in range(12):
        body = event("purchase_completed", occurred_at=(T0 + timedelta(days=3 * n)).isoformat(),
                     payload={"order_id": f"o-{n}", "currency": "EUR",
                              "lines": [{"sku": "s", "category": "grocery", "quantity": 1, "unit_price": "30.00"}]})
        account, _ = ledger.apply(account, decode_event(encoded(body)), RULES.loyalty)
    return account


def test_account_copy_and_state_dict_match_the_reference():
    account = member_account()
    assert list(account.to_dict().items()) == list(reference_account_to_dict(account).items())
    copy = account.copy()
    assert copy == Account.from_dict(account.to_dict())
    assert all(a is not b for a, b in zip(copy.lots, account.lots))
    assert all(copy.orders[k] is not account.orders[k] for k in account.orders)
    assert orjson.dumps(Account.from_dict(orjson.loads(orjson.dumps(account.to_dict()))).to_dict()) == \
        orjson.dumps(account.to_dict())


def test_balance_dict_is_the_balance_in_field_order():
    account = member_account()
    rules = RULES.loyalty.at_ms(account.clock_ms)
    qualifying = ledger.qualifying_at(account, account.clock_ms, rules)
    assert list(ledger._balance_dict(account, rules, qualifying).items()) == \
        list(ledger.balance(account, rules, qualifying).to_dict().items())
    assert account.last_balance is not None
    assert list(account.last_balance) == list(ledger.Balance.__dataclass_fields__)


def test_advance_with_nothing_due_leaves_the_account_as_it_was():
    account = member_account()
    due = ledger.next_due_ms(account, RULES.loyalty)
    assert due is not None
    same, outputs = ledger.advance(account, due - 1, RULES.loyalty)
    assert same is account and outputs == []
    moved, outputs = ledger.advance(account, due, RULES.loyalty)
    assert moved is not account and outputs


# --- churn ------------------------------------------------------------------------------------------

@given(st.lists(st.integers(0, 400), min_size=2, max_size=25, unique=True))
def test_median_gap_is_statistics_median(days):
    churn = ChurnState(purchase_days=sorted(day * DAY_MS for day in days))
    assert indicators._median_gap(churn) == statistics.median(b - a for a, b in pairwise(churn.purchase_days))


def reference_indicator_change(profile, churn, account, rules, now_ms):
    ind = rules.indicators
    moments = []
    gap = indicators._gap_deadline(churn, rules)
    if gap is not None:
        moments.append(gap)
    for falling, kinds in ((ind.frequency_falling, (trailing.PURCHASE,)),
                           (ind.activity_falling, (trailing.SESSION, trailing.SIGN_IN))):
        for occurred, kind, _, _ in profile.recent:
            if kind in kinds:
                moments += [occurred + falling.recent_days * DAY_MS,
                            occurred + (falling.recent_days + falling.prior_days) * DAY_MS]
    if churn.purchase_day_count and profile.last_seen_ms is not None:
        moments += [profile.last_seen_ms + days * DAY_MS for days in ind.dormant.days]
    moments += [filed + ind.complaint_unresolved.hours * indicators.HOUR_MS
                for filed in profile.open_complaints.values()]
    for kind, low in (("nps", ind.nps_detractor), ("csat", ind.csat_low)):
        answers = profile.surveys.get(kind)
        if answers:
            moments.append(answers[-1][0] + low.within_days * DAY_MS)
    moments += [occurred + ind.repeated_refunds.within_days * DAY_MS
                for occurred, kind, _, _ in profile.recent if kind == trailing.REFUND]
    if account.tier_review_ms is not None:
        moments.append(account.tier_review_ms - ind.tier_at_risk.within_days * DAY_MS)
    return min((moment for moment in moments if moment > now_ms), default=None)


@given(entries, st.lists(st.integers(0, 300), min_size=0, max_size=6, unique=True), st.integers(0, 500 * DAY_MS))
def test_indicator_deadlines_match_the_reference(items, purchase_days, now_ms):
    days = sorted(day * DAY_MS for day in purchase_days)
    churn = ChurnState(purchase_days=days, first_purchase_ms=days[0] if days else None,
                       last_purchase_ms=days[-1] if days else None, purchase_day_count=len(days))
    profile = CustomerProfile("c", first_seen_ms=0, last_seen_ms=items[-1][0] if items else 0, recent=items,
                              open_complaints={"k": 3 * DAY_MS}, surveys={"nps": [[5 * DAY_MS, 1, 3]]})
    account = Account("c", tier_review_ms=200 * DAY_MS)
    version = RULES.churn.at_ms(now_ms)
    assert indicators.next_change_ms(profile, churn, account, version, now_ms) == \
        reference_indicator_change(profile, churn, account, version, now_ms)


def test_alert_kinds_follow_the_rules_mapping():
    from streams.churn.rules import ALERT_OF
    assert {code: kind.value for code, kind in ALERT_OF.items()} == indicators.ALERT_KIND_OF
