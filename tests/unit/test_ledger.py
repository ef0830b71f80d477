"""The points ledger as a pure function: scenarios for each rule, and properties over generated
sequences of events and passing time."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import decode_event
from streams.config import settings as crm_settings
from streams.loyalty import ledger
from streams.loyalty.calendar import DAY_MS, to_ms
from streams.loyalty.rules import RulesBook, load_rules
from tests.factories import encoded, event

BOOK = load_rules(crm_settings().loyalty_rules)
T0 = datetime(2026, 3, 2, 10, tzinfo=UTC)  # a Monday, outside every default campaign


def ev(type_, at, payload, channel="pos", **envelope):
    body = event(type_, customer_id="m-1", occurred_at=at.isoformat(), payload=payload, **envelope)
    body["source"] = {"channel": channel, "store_id": "store-ams-01", **body.get("source_extra", {})}
    body.pop("source_extra", None)
    decoded = decode_event(encoded(body))
    assert not hasattr(decoded, "reason"), decoded
    return decoded


def purchase(at, order_id="o-1", amount="100.00", category="grocery", **payload):
    return ev("purchase_completed", at, {"order_id": order_id, "currency": "EUR", "lines": [
        {"sku": "sku-1", "category": category, "quantity": 1, "unit_price": amount}], **payload})


def refund(at, order_id="o-1", amount="10.00", refund_id="r-1", full=False):
    return ev("purchase_refunded", at, {"refund_id": refund_id, "order_id": order_id, "currency": "EUR",
                                        "amount": amount, "full": full})


def redeem(at, points, reward="voucher", request_id="q-1"):
    return ev("points_redemption_requested", at, {"request_id": request_id, "reward_id": reward, "points": points})


def adjust(at, points, adjustment_id="a-1"):
    return ev("points_adjusted", at, {"adjustment_id": adjustment_id, "points": points, "reason": "goodwill",
                                      "operator": "ops@shop"})


def fold(events_and_times, book=BOOK):
    """Apply events (and `("advance", datetime)` steps) in order; return the account and all outputs."""
    account, outputs = None, []
    for item in events_and_times:
        if isinstance(item, tuple):
            if account is None:
                continue  # time passing for a member the ledger has never heard of
            account, out = ledger.advance(account, to_ms(item[1]), book)
        else:
            account, out = ledger.apply(account, item, book)
        outputs.extend(out)
    return account, outputs


def movements(outputs, kind=None):
    return [o for o in outputs if isinstance(o, ledger.Movement) and (kind is None or o.kind == kind)]


def last_balance(outputs):
    return [o for o in outputs if isinstance(o, ledger.Balance)][-1]


# --- scenarios -------------------------------------------------------------------------------------

def test_purchase_points_are_pending_for_the_return_window_then_available():
    account, out = fold([purchase(T0)])
    # 100 EUR at 1 point per EUR, plus the first-purchase bonus of 200.
    assert (account.pending, account.available) == (300, 0)
    account, out = fold([purchase(T0), ("advance", T0 + timedelta(days=13, hours=23))])
    assert account.pending == 300
    account, out = fold([purchase(T0), ("advance", T0 + timedelta(days=14))])
    [made] = movements(out, "made_available")
    assert (made.occurred_ms, made.available_delta, made.pending_delta) == (to_ms(T0) + 14 * DAY_MS, 300, -300)
    assert (account.pending, account.available) == (0, 300)


def test_refund_inside_the_window_cancels_pending_points_in_proportion():
    account, out = fold([purchase(T0), refund(T0 + timedelta(days=3), amount="25.00")])
    [cancelled] = movements(out, "cancelled")
    assert cancelled.pending_delta == -75  # a quarter of 300
    assert account.pending == 225


def test_refund_after_the_window_claws_back_and_partial_refunds_add_up_exactly():
    later = T0 + timedelta(days=20)
    account, out = fold([purchase(T0, amount="30.00"),
                         refund(later, amount="10.00", refund_id="r-1"),
                         refund(later, amount="10.00", refund_id="r-2"),
                         refund(later, amount="10.00", refund_id="r-3")])
    clawed = movements(out, "clawed_back")
    assert [m.available_delta for m in clawed] == [-76, -77, -77]  # floor(230/3), floor(460/3) - 76, rest
    assert account.available == 0


def test_claw_back_beyond_available_becomes_debt_settled_by_later_earnings():
    at = T0 + timedelta(days=20)
    account, out = fold([
        purchase(T0), redeem(at, 250),                                 # 300 available, 250 spent
        refund(at + timedelta(days=1), full=True, amount="100.00"),    # 300 to take back, 50 there
        ev("daily_sign_in", at + timedelta(days=2), {}, channel="app"),  # 5 points pay off debt
    ])
    [clawed] = movements(out, "clawed_back")
    assert (clawed.available_delta, clawed.debt_delta, clawed.available_after) == (-50, 250, 0)
    [settled] = movements(out, "debt_settled")
    assert (settled.available_delta, settled.debt_delta) == (-5, -5)
    assert (account.available, account.debt) == (0, 245)


def test_redemptions_are_checked_and_refused_with_a_reason():
    at = T0 + timedelta(days=15)
    base = [purchase(T0)]  # 300 available at `at`
    cases = {
        "unknown reward": redeem(at, 100, reward="yacht"),
        "coffee costs 150": redeem(at, 100, reward="coffee"),
        "below the minimum": redeem(at, 50),
        "multiple of 50": redeem(at, 120),
        "insufficient points": redeem(at, 350),
    }
    for expected, request in cases.items():
        account, out = fold([*base, request])
        [refused] = movements(out, "redemption_refused")
        assert expected in refused.reason or expected.split()[0] in refused.reason, refused.reason
        assert account.available == 300
    account, out = fold([*base, redeem(at, 150, reward="coffee")])
    assert movements(out, "redeemed")[0].available_delta == -150
    assert account.redeemed == 150


def test_redemption_takes_the_points_that_expire_first():
    account, _ = fold([
        ev("customer_registered", T0, {"name": "M"}),          # 100 now, expire T0 + 12 months
        purchase(T0 + timedelta(days=30)),                      # 300 available at day 44
        redeem(T0 + timedelta(days=50), 150, reward="coffee"),
    ])
    assert sorted((lot.expires_ms, lot.points) for lot in account.lots)[0][1] == 250
    assert len(account.lots) == 1


def test_points_expire_at_event_time_without_any_event_from_the_member():
    account, out = fold([ev("customer_registered", T0, {"name": "M"}),
                         ("advance", T0 + timedelta(days=400))])
    [expired] = movements(out, "expired")
    assert expired.occurred_ms == to_ms(datetime(2027, 3, 2, 10, tzinfo=UTC))
    assert account.available == 0 and account.expired == 100


def test_points_expiring_soon_are_known_when_they_enter_the_reminder_window():
    account, _ = fold([ev("customer_registered", T0, {"name": "M"})])
    due = ledger.next_due_ms(account, BOOK)
    assert due == to_ms(datetime(2027, 3, 2, 10, tzinfo=UTC)) - 30 * DAY_MS
    account, out = ledger.advance(account, due, BOOK)
    assert last_balance(out).expiring_soon == 100


def test_tier_goes_up_at_once_and_down_only_at_the_review():
    big = purchase(T0, amount="1200.00")
    account, out = fold([big])
    [up] = [o for o in out if isinstance(o, ledger.TierChanged)]
    assert (up.from_tier, up.to_tier, up.direction) == ("Bronze", "Silver", "up")
    # Qualifying points leave the 12-month window on 2027-03-02; the next quarterly review after
    # that (2027-04-01, Amsterdam time) demotes, not the day the window passes.
    assert account.tier_review_ms == to_ms(datetime(2027, 3, 31, 22, tzinfo=UTC))
    account, out = ledger.advance(account, to_ms(datetime(2027, 3, 20, tzinfo=UTC)), BOOK)
    assert account.tier == "Silver"
    account, out = ledger.advance(account, to_ms(datetime(2027, 4, 2, tzinfo=UTC)), BOOK)
    [down] = [o for o in out if isinstance(o, ledger.TierChanged)]
    assert (down.to_tier, down.cause, down.occurred_ms) == ("Bronze", "review", account.tier_since_ms)


def test_tier_multiplier_applies_from_the_change_on():
    account, out = fold([purchase(T0, order_id="o-1", amount="1200.00"),
                         purchase(T0 + timedelta(days=1), order_id="o-2", amount="100.00")])
    earned = [m.pending_delta for m in movements(out, "earned_pending")]
    assert earned == [1200 + 200, 125]  # Silver earns 1.25x


def test_daily_sign_in_counts_once_per_local_calendar_day():
    amsterdam = {"source_extra": {"timezone": "Europe/Amsterdam"}}
    day = datetime(2026, 3, 2, 22, 30, tzinfo=UTC)  # 23:30 in Amsterdam
    account, out = fold([
        ev("daily_sign_in", day, {}, channel="app", **amsterdam),
        ev("daily_sign_in", day + timedelta(minutes=20), {}, channel="app", **amsterdam),  # 23:50 same day
        ev("daily_sign_in", day + timedelta(minutes=40), {}, channel="app", **amsterdam),  # 00:10 next day
    ])
    assert len(movements(out, "daily_sign_in")) == 2


def test_share_bonus_is_capped_per_day():
    shares = [ev("content_shared", T0 + timedelta(minutes=i), {"content_type": "product", "content_id": f"p{i}"},
                 channel="app") for i in range(5)]
    account, out = fold(shares)
    assert len(movements(out, "share")) == 3 and account.available == 30


def test_manual_adjustment_carries_reason_and_operator_and_never_overdraws():
    account, out = fold([adjust(T0, 40), adjust(T0, -100, adjustment_id="a-2"), adjust(T0, -15, adjustment_id="a-3")])
    assert [(m.kind, m.available_delta) for m in movements(out)] == [
        ("adjusted", 40), ("adjustment_refused", 0), ("adjusted", -15)]
    assert movements(out)[0].operator == "ops@shop" and movements(out)[0].reason == "goodwill"
    assert account.available == 25


def test_campaign_multiplier_applies_inside_its_dates_and_channels_only():
    in_campaign = datetime(2026, 7, 3, 10, tzinfo=UTC)
    _, out = fold([purchase(in_campaign, amount="100.00")])
    assert movements(out, "earned_pending")[0].pending_delta == 200 + 200
    _, out = fold([ev("purchase_completed", in_campaign, {"order_id": "o-9", "currency": "EUR", "lines": [
        {"sku": "s", "category": "grocery", "quantity": 1, "unit_price": "100.00"}]}, channel="app")])
    assert movements(out, "earned_pending")[0].pending_delta == 100 + 200


def test_the_rules_version_in_force_at_the_event_time_is_used_and_recorded():
    data = BOOK.model_dump()
    newer = {**data["versions"][0], "version": "2026-06", "effective_from": datetime(2026, 6, 1, tzinfo=UTC)}
    newer["earning"] = {**newer["earning"], "points_per_unit": {"EUR": 3}}
    book = RulesBook.model_validate({"versions": [data["versions"][0], newer]})
    _, out = fold([purchase(T0, order_id="o-1"), purchase(datetime(2026, 6, 2, tzinfo=UTC), order_id="o-2")], book)
    earned = movements(out, "earned_pending")
    assert [(m.pending_delta, m.rules_version) for m in earned] == [(300, "2026-01"), (300, "2026-06")]


def test_a_balance_is_output_only_when_a_figure_changed():
    browse = ev("product_viewed", T0 + timedelta(hours=1), {"sku": "sku-1", "category": "grocery"})
    account, out = fold([purchase(T0)])
    first = last_balance(out)
    account, out = ledger.apply(account, browse, BOOK)
    assert out == []  # only the account's clock moved
    account, out = ledger.apply(account, purchase(T0 + timedelta(hours=2), order_id="o-2"), BOOK)
    assert last_balance(out).version == first.version + 1
    assert last_balance(out).pending == first.pending + 100


def test_rules_files_are_validated():
    data = BOOK.model_dump()
    bad = {**data["versions"][0]}
    bad["tiers"] = {**bad["tiers"], "levels": [{"name": "A", "threshold": 10}]}
    with pytest.raises(ValueError, match="entry tier"):
        RulesBook.model_validate({"versions": [bad]})


def test_the_same_order_under_another_event_id_earns_once():
    account, out = fold([purchase(T0), purchase(T0)])
    assert len(movements(out, "earned_pending")) == 1


# --- properties ------------------------------------------------------------------------------------

steps = st.lists(st.one_of(
    st.tuples(st.just("purchase"), st.integers(1, 60), st.integers(1, 900)),
    st.tuples(st.just("refund"), st.integers(1, 60), st.integers(1, 500), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("redeem"), st.integers(1, 60), st.sampled_from([100, 150, 200, 400, 1000])),
    st.tuples(st.just("sign_in"), st.integers(1, 60)),
    st.tuples(st.just("adjust"), st.integers(1, 60), st.integers(-300, 300).filter(bool)),
    st.tuples(st.just("wait"), st.integers(1, 400)),
), min_size=1, max_size=30)


def build(plan):
    """Events in time order (each step moves time forward by days), with time advances."""
    items, now, orders = [], T0, []
    for n, step in enumerate(plan):
        now += timedelta(days=step[1]) if step[0] != "wait" else timedelta(days=step[1])
        if step[0] == "purchase":
            orders.append(f"o-{n}")
            items.append(purchase(now, order_id=f"o-{n}", amount=f"{step[2]}.00"))
        elif step[0] == "refund" and orders:
            items.append(refund(now, order_id=orders[step[3] % len(orders)], amount=f"{step[2]}.00",
                                refund_id=f"r-{n}", full=step[4]))
        elif step[0] == "redeem":
            items.append(redeem(now, step[2], request_id=f"q-{n}"))
        elif step[0] == "sign_in":
            items.append(ev("daily_sign_in", now, {}, channel="app"))
        elif step[0] == "adjust":
            items.append(adjust(now, step[2], adjustment_id=f"a-{n}"))
        elif step[0] == "wait":
            items.append(("advance", now))
    return items


@settings(max_examples=120, deadline=None)
@given(steps)
def test_ledger_invariants_hold_for_any_sequence(plan):
    account, out = fold(build(plan))
    moves = movements(out)
    assert [m.seq for m in moves] == list(range(len(moves)))
    available = pending = debt = 0
    for move in moves:
        if move.kind == "redeemed":
            assert -move.available_delta <= available  # never more than was available
        available += move.available_delta
        pending += move.pending_delta
        debt += move.debt_delta
        assert (move.available_after, move.pending_after, move.debt_after) == (available, pending, debt)
        assert available >= 0 and pending >= 0 and debt >= 0
    if account is None:
        return
    final = last_balance(out)
    assert (final.available, final.pending, final.debt) == (available, pending, debt)
    assert sum(lot.points for lot in account.lots if not lot.pending) == available
    assert sum(lot.points for lot in account.lots if lot.pending) == pending


@settings(max_examples=80, deadline=None)
@given(steps)
def test_expiry_takes_the_oldest_points_first(plan):
    account, out = fold(build(plan))
    expiries = [m.occurred_ms for m in movements(out, "expired")]
    assert expiries == sorted(expiries)
    # Nothing still held expired before the last expiry.
    if expiries:
        assert all(lot.expires_ms is None or lot.expires_ms > expiries[-1] for lot in account.lots)


@settings(max_examples=60, deadline=None)
@given(steps, st.integers(0, 30))
def test_advancing_in_one_step_or_many_gives_the_same_ledger(plan, extra_days):
    items = build(plan)
    end = ("advance", T0 + timedelta(days=2000 + extra_days))
    one, out_one = fold([*items, end])
    stepped = [*items] + [("advance", T0 + timedelta(days=d)) for d in range(100, 2000, 97)] + [end]
    many, out_many = fold(sorted_time(stepped))
    assert [m.to_dict() for m in movements(out_one)] == [m.to_dict() for m in movements(out_many)]
    if one is not None:
        # Only the clock, the snapshot count and housekeeping (dropping orders and qualifying
        # entries no rule can use any more) may differ: a step with nothing due leaves them. So may
        # the last balance's time and the rolling qualifying amount it was computed with.
        def held(account):
            data = {k: v for k, v in account.to_dict().items()
                    if k not in ("clock_ms", "version", "orders", "qualifying", "last_balance")}
            data["last_balance"] = {k: v for k, v in (account.last_balance or {}).items()
                                    if k not in ("version", "as_of_ms", "qualifying")}
            return data
        assert held(one) == held(many)


def sorted_time(items):
    def moment(item):
        return to_ms(item[1]) if isinstance(item, tuple) else to_ms(item.occurred_at)
    return sorted(items, key=moment)
