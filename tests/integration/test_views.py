"""The curated views (projections/views.py) run, give the figures known from the events this test
sends, and agree with direct queries on the base tables that count the other way round (alias
copies collapsed by event id rather than left out by customer; sizes from each customer's last
change rather than running sums)."""

from __future__ import annotations

import uuid
from decimal import Decimal

from tests.factories import encoded, event

DAYS = ("2023-03-04", "2023-03-05", "2023-03-06", "2023-05-10")


def _pos(store: str) -> dict:
    return {"channel": "pos", "store_id": store, "terminal_id": "t-1"}


def _purchase(customer: str | None, store: str, at: str, price: str = "3.50", quantity: int = 2) -> dict:
    body = event("purchase_completed", customer_id=customer or "x", occurred_at=at, source=_pos(store))
    body["payload"] = {"order_id": f"ord-{uuid.uuid4().hex[:12]}", "currency": "EUR",
                       "lines": [{"sku": "gro-0001", "category": "grocery", "quantity": quantity, "unit_price": price}]}
    return body


def _send_events(stack) -> tuple[str, dict[str, str]]:
    """Four customers in a store of their own, in March and May 2023 (no other test uses 2023).
    D's purchase comes with only a loyalty card, before the card is linked to D: it is in `events`
    twice (under the alias, and under D), and must count once."""
    tag = uuid.uuid4().hex[:8]
    store = f"views-store-{tag}"
    a, b, c, d = (f"views-{name}-{tag}" for name in "abcd")
    card = f"LC-views-{tag}"
    c_purchase = _purchase(c, store, "2023-03-05T15:00:00+00:00")
    refund = event("purchase_refunded", customer_id=c, occurred_at="2023-03-05T16:00:00+00:00", source=_pos(store))
    refund["payload"] = {"refund_id": f"ref-{tag}", "order_id": c_purchase["payload"]["order_id"], "currency": "EUR",
                         "amount": "2.00"}
    registered = event("customer_registered", customer_id=b, occurred_at="2023-03-04T09:00:00+00:00", source=_pos(store))
    by_customer = {
        a: [_purchase(a, store, "2023-03-04T10:00:00+00:00"),
            _purchase(a, store, "2023-03-04T11:00:00+00:00", price="10.00", quantity=1),
            event("product_viewed", customer_id=a, occurred_at="2023-03-04T12:00:00+00:00"),
            _purchase(a, store, "2023-05-10T10:00:00+00:00")],
        b: [registered, _purchase(b, store, "2023-03-05T10:00:00+00:00")],
        c: [c_purchase, refund],
    }
    for customer, bodies in by_customer.items():
        for body in bodies:
            stack.send(customer.encode(), encoded(body))
    anonymous = _purchase(None, store, "2023-03-06T10:00:00+00:00")
    del anonymous["customer_id"]
    anonymous["identifiers"] = {"loyalty_card": card}
    stack.send(f"loyalty_card:{card}".encode(), encoded(anonymous))
    stack.flush()
    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE customer_key = {k:String}",
                                       {"k": f"loyalty_card:{card}"})[0][0] == 1, what="the purchase under the alias")
    link = event("identity_linked", customer_id=d, occurred_at="2023-03-06T12:00:00+00:00",
                 payload={"alias_type": "loyalty_card", "alias_value": card})
    stack.send(d.encode(), encoded(link))
    stack.flush()
    stack.wait_for(lambda: stack.query(
        "SELECT count() FROM events FINAL WHERE customer_key = {d:String} AND attributed_from = {k:String}",
        {"d": d, "k": f"loyalty_card:{card}"})[0][0] == 1, what="the alias's purchase attributed to its customer")
    stack.wait_for(lambda: stack.query(
        "SELECT merged_into FROM customer_profiles FINAL WHERE customer_key = {k:String}",
        {"k": f"loyalty_card:{card}"}) == [(d,)], what="the alias's profile marked merged")
    return store, {"a": a, "b": b, "c": c, "d": d}


def test_the_views_give_the_known_figures_and_agree_with_the_base_tables(stack):
    store, _ = _send_events(stack)

    # --- daily_store_channel: the figures of this store, known from what was sent ------------------
    daily = ("SELECT toString(day), channel, active_customers, buyers, new_customers, registrations, orders, "
             "revenue['EUR'], refunds['EUR'], average_order_value['EUR'] "
             "FROM daily_store_channel WHERE store_id = {s:String} ORDER BY day")
    money = Decimal
    expected = [
        ("2023-03-04", "pos", 2, 1, 1, 1, 2, money("17.00"), money(0), money("8.50")),  # A bought twice, B registered
        ("2023-03-05", "pos", 2, 2, 2, 0, 2, money("14.00"), money("2.00"), money("7.00")),  # B, C bought; C refunded
        ("2023-03-06", "pos", 1, 1, 1, 0, 1, money("7.00"), money(0), money("7.00")),  # D, through the alias, once
        ("2023-05-10", "pos", 1, 1, 0, 0, 1, money("7.00"), money(0), money("7.00")),  # A again: not new
    ]
    stack.wait_for(lambda: stack.query(daily, {"s": store}) == expected, timeout=180, what="the store's daily figures")

    # The same from the events directly, collapsing the alias copy by event id instead.
    direct = stack.query("""
        SELECT toString(day), uniqExact(customer), countIf(type = 'purchase_completed'),
               sumIf(amount, type = 'purchase_completed'), sumIf(amount, type = 'purchase_refunded')
        FROM (SELECT event_id, argMax(customer_key, attributed_from != '') AS customer, any(type) AS type,
                     any(toDate(occurred_at)) AS day, any(amount) AS amount
              FROM events FINAL WHERE store_id = {s:String} GROUP BY event_id)
        GROUP BY day ORDER BY day""", {"s": store})
    assert direct == [(day, active, orders, revenue, refunds)
                      for day, _, active, _, _, _, orders, revenue, refunds, _ in expected]
    # And over everything in the database (other tests' events included).
    stack.wait_for(lambda: stack.query(
        "SELECT sum(orders), sumMap(revenue)['EUR'], sum(new_customers) FROM daily_store_channel") == stack.query("""
        SELECT count(), sumIf(amount, currency = 'EUR'), uniqExact(customer)
        FROM (SELECT event_id, argMax(customer_key, attributed_from != '') AS customer, any(amount) AS amount,
                     any(currency) AS currency
              FROM events FINAL WHERE type = 'purchase_completed' GROUP BY event_id)"""), timeout=120,
        what="orders, revenue and new customers of the whole database equal to the events'")

    # --- retention_cohorts: the four customers' cohort ---------------------------------------------
    cohorts = stack.query("SELECT months_since_first_purchase, cohort_customers, active_customers, retention_rate, "
                          "orders, revenue['EUR'] FROM retention_cohorts "
                          "WHERE cohort_month = '2023-03-01' ORDER BY months_since_first_purchase")
    assert cohorts == [(0, 4, 4, 1.0, 5, Decimal("38.00")), (2, 4, 1, 0.25, 1, Decimal("7.00"))]
    assert stack.query("""
        WITH purchases AS (
                 SELECT event_id, argMax(customer_key, attributed_from != '') AS customer,
                        any(toStartOfMonth(occurred_at)) AS month, any(amount) AS amount
                 FROM events FINAL WHERE type = 'purchase_completed' GROUP BY event_id),
             firsts AS (SELECT customer, min(month) AS cohort FROM purchases GROUP BY customer)
        SELECT toUInt32(dateDiff('month', firsts.cohort, purchases.month)) AS k, uniqExact(purchases.customer),
               count(), sum(purchases.amount)
        FROM purchases INNER JOIN firsts ON firsts.customer = purchases.customer
        WHERE firsts.cohort = '2023-03-01' GROUP BY k ORDER BY k""") == [(k, active, orders, revenue)
                                                                         for k, _, active, _, orders, revenue in cohorts]

    # --- points_liability_daily: running sums of the ledger, ending at the balances ---------------
    liability = "SELECT available_points, pending_points, debt_points, issued FROM points_liability_daily WHERE day = {d:Date}"
    ledger = """SELECT sum(available_delta), sum(pending_delta), sum(debt_delta),
                       sumIf(pending_delta, kind = 'earned_pending' AND toDate(occurred_at) = {d:Date})
                       + sumIf(available_delta, kind IN ('registration', 'daily_sign_in', 'share', 'review', 'birthday_month')
                               AND toDate(occurred_at) = {d:Date})
                FROM points_ledger FINAL WHERE toDate(occurred_at) <= {d:Date}"""
    for day in DAYS:
        stack.wait_for(lambda: stack.query(liability, {"d": day}) == stack.query(ledger, {"d": day}), timeout=120,
                       what=f"points liability on {day} equal to the ledger's running sums")
        assert stack.query(liability, {"d": day})[0][3] > 0, f"points were issued on {day}"
    stack.wait_for(lambda: stack.query(
        "SELECT available_points, pending_points, debt_points FROM points_liability_daily ORDER BY day DESC LIMIT 1")
        == stack.query("SELECT sum(available), sum(pending), sum(debt) FROM points_balances FINAL"), timeout=120,
        what="the last day's liability equal to the balances")
    assert stack.query("SELECT count() = dateDiff('day', min(day), max(day)) + 1 FROM points_liability_daily") == [(1,)]

    # --- segment_sizes_daily: running sums equal each customer's last change by then -------------
    sizes = ("SELECT dimension, segment, customers FROM segment_sizes_daily "
             "WHERE day = {d:Date} AND customers != 0 ORDER BY dimension, segment")
    last_changes = """
        SELECT dimension, segment, toInt64(count()) FROM (
            SELECT customer_key, dimension, argMax(to_segment, seq) AS segment FROM segment_changes FINAL
            WHERE toDate(occurred_at) <= {d:Date}
              AND customer_key NOT IN (SELECT customer_key FROM customer_profiles FINAL WHERE merged_into != '')
            GROUP BY customer_key, dimension)
        WHERE segment != '' GROUP BY dimension, segment ORDER BY dimension, segment"""
    for day in DAYS:
        stack.wait_for(lambda: stack.query(sizes, {"d": day}) == stack.query(last_changes, {"d": day}), timeout=120,
                       what=f"segment sizes on {day} equal to the customers' last changes")
    on_the_sixth = {(dimension, segment): n for dimension, segment, n in stack.query(sizes, {"d": "2023-03-06"})}
    assert on_the_sixth[("lifecycle", "new")] >= 4  # our four customers at least
    stack.wait_for(lambda: stack.query(
        "SELECT segment, customers FROM segment_sizes_daily WHERE dimension = 'lifecycle' AND customers != 0 "
        "AND day = (SELECT max(day) FROM segment_sizes_daily) ORDER BY segment")
        == stack.query("SELECT lifecycle_stage, toInt64(count()) FROM customer_profiles FINAL "
                       "WHERE merged_into = '' AND lifecycle_stage != '' GROUP BY lifecycle_stage ORDER BY lifecycle_stage"),
        timeout=120, what="the last day's lifecycle sizes equal to the profiles")
