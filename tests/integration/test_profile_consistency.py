"""Every figure of `customer_profiles`, recomputed with SQL from the `events` table, over a simulated
population (1000 customers, 60 days, about 20,000 events): the worker's fold and an analyst's query
must tell the same story. Trailing figures and the lifecycle stage are as of each row's `as_of`;
points and tier come from `points_balances`; value tiers, RFM and tags from the figures, the
published boundaries and the rules file."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson

from projections import boundaries
from services.simulator import Simulator, Workload
from streams import topics
from streams.config import settings
from streams.rulebooks import load_rulebooks

DAY = 86_400_000
T = "toUnixTimestamp64Milli(occurred_at)"
PURCHASE, REFUND = "type = 'purchase_completed'", "type = 'purchase_refunded'"
NET = f"map(currency, if({PURCHASE}, amount, -amount))"
MONEY = f"{PURCHASE} OR {REFUND}"


def window(days: int) -> str:
    return f"{T} > as_of_ms - {days * DAY} AND {T} <= as_of_ms"


# Per customer, over `events` FINAL joined with the profile's as_of (`as_of_ms`).
AGGREGATES = {
    "first_seen": "min(occurred_at)",
    "last_seen": "max(occurred_at)",
    "purchase_count": f"countIf({PURCHASE})",
    "refund_count": f"countIf({REFUND})",
    "spend": f"sumMapIf({NET}, {MONEY})",
    "refunded": f"sumMapIf(map(currency, amount), {REFUND})",
    "average_order_value": f"mapApply((c, total) -> (c, round(toDecimal128(total, 6) / sumMapIf(map(currency, 1), {PURCHASE})[c], 2)), "
                           f"sumMapIf(map(currency, amount), {PURCHASE}))",
    "spend_30d": f"sumMapIf({NET}, ({MONEY}) AND {window(30)})",
    "spend_90d": f"sumMapIf({NET}, ({MONEY}) AND {window(90)})",
    "spend_365d": f"sumMapIf({NET}, ({MONEY}) AND {window(365)})",
    "last_purchase_at": f"if(countIf({PURCHASE}) > 0, maxIf(occurred_at, {PURCHASE}), NULL)",
    "channels": "arraySort(groupUniqArray(channel))",
    "stores": "arraySort(arrayFilter(s -> s != '', arrayDistinct(arrayConcat(groupArray(store_id), "
              f"groupArrayIf(JSONExtractString(payload, 'store_id'), {PURCHASE})))))",
    "session_count": "countIf(type = 'app_session_started')",
    "sign_in_count": "countIf(type = 'daily_sign_in')",
    "sessions_30d": f"countIf(type = 'app_session_started' AND {window(30)})",
    "sign_ins_30d": f"countIf(type = 'daily_sign_in' AND {window(30)})",
    "complaint_count": "countIf(type = 'complaint_filed')",
    "complaints_30d": f"countIf(type = 'complaint_filed' AND {window(30)})",
    "weekend_purchases": f"countIf({PURCHASE} AND toDayOfWeek(occurred_at, 0, 'UTC') >= 6)",
    "open_complaints": "length(arrayFilter(c -> NOT has(groupUniqArrayIf(JSONExtractString(payload, 'complaint_id'), "
                       "type = 'complaint_resolved'), c), groupUniqArrayIf(JSONExtractString(payload, 'complaint_id'), "
                       "type = 'complaint_filed')))",
    "aliases": "arraySort(arrayFilter(a -> a != '', arrayDistinct(arrayFlatten(groupArray(["
               "ifNull(concat('loyalty_card:', loyalty_card), ''), ifNull(concat('app_user_id:', app_user_id), ''), "
               "ifNull(concat('phone_hash:', phone_hash), ''), ifNull(concat('email_hash:', email_hash), ''), "
               "ifNull(concat('device_id:', device_id), ''), if(type = 'identity_linked', concat("
               "JSONExtractString(payload, 'alias_type'), ':', JSONExtractString(payload, 'alias_value')), '')])))))",
    "contact": "arrayFilter((field, given) -> given, ['address', 'birthday', 'email', 'phone'], [{}])".format(", ".join(
        f"countIf(type IN ('customer_registered', 'profile_updated') AND JSONType(payload, '{field}') != 'Null') > 0"
        for field in ("address", "birthday", "email", "phone"))),
    "lifecycle_stage": f"multiIf(any(as_of_ms) - min({T}) < 30 * {DAY}, 'new', "
                       f"countIf({PURCHASE}) > 0 AND any(as_of_ms) - maxIf({T}, {PURCHASE}) < 90 * {DAY}, 'active', "
                       f"any(as_of_ms) - max({T}) >= 180 * {DAY}, 'lost', 'dormant')",
}

# Figures that need a grouping of their own first; each gives (customer_key, value).
GROUPED = {
    "favourite_channel": """
        SELECT customer_key, argMin(channel, (-n, channel)) FROM (
            SELECT customer_key, channel, count() AS n FROM events FINAL WHERE startsWith(customer_key, {p:String})
            GROUP BY customer_key, channel) GROUP BY customer_key""",
    "favourite_store": """
        SELECT customer_key, argMin(store, (-n, store)) FROM (
            SELECT customer_key, if(JSONExtractString(payload, 'store_id') != '', JSONExtractString(payload, 'store_id'),
                                    store_id) AS store, count() AS n
            FROM events FINAL WHERE type = 'purchase_completed' AND startsWith(customer_key, {p:String}) AND store != ''
            GROUP BY customer_key, store) GROUP BY customer_key""",
    "favourite_categories": """
        SELECT customer_key, arraySlice(arrayMap(x -> x.2, arraySort(groupArray((-units, category)))), 1, 3) FROM (
            SELECT customer_key, line.category AS category, sum(line.quantity) AS units
            FROM events FINAL ARRAY JOIN JSONExtract(payload, 'lines', 'Array(Tuple(category String, quantity Int64))') AS line
            WHERE type = 'purchase_completed' AND startsWith(customer_key, {p:String})
            GROUP BY customer_key, category) GROUP BY customer_key""",
    "marketing_consent": """
        SELECT customer_key, arraySort(groupArrayIf(channel, granted)) FROM (
            SELECT customer_key, JSONExtractString(payload, 'channel') AS channel,
                   argMax(JSONExtractBool(payload, 'granted'), (occurred_at, source_offset)) AS granted
            FROM events FINAL WHERE type = 'consent_changed' AND startsWith(customer_key, {p:String})
              AND JSONExtractString(payload, 'purpose') = 'marketing'
            GROUP BY customer_key, channel) GROUP BY customer_key""",
    **{f"{kind}_{figure}": f"""
        SELECT customer_key, {expression} FROM (
            SELECT customer_key, arrayMap(x -> x.3, arraySort(groupArray(
                       (occurred_at, source_offset, JSONExtractInt(payload, 'score'))))) AS scores
            FROM events FINAL WHERE type = 'survey_answered' AND JSONExtractString(payload, 'kind') = '{kind}'
              AND startsWith(customer_key, {{p:String}})
            GROUP BY customer_key)"""
       for kind in ("nps", "csat")
       for figure, expression in (("latest", "scores[-1]"),
                                  ("trend", "if(length(scores) > 1, scores[-1] - scores[-2], NULL)"))},
    **{column: f"""
        SELECT customer_key, {column} FROM points_balances FINAL WHERE startsWith(customer_key, {{p:String}})"""
       for column in ("tier",)},
    "points_available": """
        SELECT customer_key, available FROM points_balances FINAL WHERE startsWith(customer_key, {p:String})""",
    "points_pending": """
        SELECT customer_key, pending FROM points_balances FINAL WHERE startsWith(customer_key, {p:String})""",
}
# What a profile shows for a customer the grouped query has no row for.
EMPTY = {"favourite_channel": "", "favourite_store": "", "favourite_categories": [], "marketing_consent": [],
         "nps_latest": None, "nps_trend": None, "csat_latest": None, "csat_trend": None,
         "tier": "", "points_available": 0, "points_pending": 0}


def normal(value):
    """Maps without zero entries (a currency whose purchases were all refunded), datetimes in UTC."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v != 0}
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def recomputed(stack, prefix: str) -> dict[str, dict[str, object]]:
    names = list(AGGREGATES)
    rows = stack.query(
        f"SELECT customer_key, {', '.join(f'{AGGREGATES[n]} AS {n}' for n in names)} "
        "FROM events AS e FINAL INNER JOIN ("
        "  SELECT customer_key, toUnixTimestamp64Milli(as_of) AS as_of_ms FROM customer_profiles FINAL"
        "  WHERE startsWith(customer_key, {p:String})) AS p USING (customer_key) "
        "WHERE startsWith(customer_key, {p:String}) GROUP BY customer_key", {"p": prefix})
    figures = {name: {row[0]: normal(row[1 + i]) for row in rows} for i, name in enumerate(names)}
    customers = set(figures["first_seen"])
    for name, sql in GROUPED.items():
        found = dict(stack.query(sql, {"p": prefix}))
        figures[name] = {key: normal(found.get(key, EMPTY[name])) for key in customers}
    return figures


def projected(stack, prefix: str, names) -> dict[str, dict[str, object]]:
    rows = stack.query(f"SELECT customer_key, {', '.join(names)} FROM customer_profiles FINAL "
                       "WHERE startsWith(customer_key, {p:String})", {"p": prefix})
    return {name: {row[0]: normal(row[1 + i]) for row in rows} for i, name in enumerate(names)}


def differences(stack, prefix: str) -> list[str]:
    want = recomputed(stack, prefix)
    got = projected(stack, prefix, list(want))
    out = []
    for name in want:
        wrong = [(key, got[name].get(key), want[name][key]) for key in sorted(want[name])
                 if got[name].get(key) != want[name][key]]
        if wrong or set(got[name]) != set(want[name]):
            out.append(f"{name}: {len(wrong)} differ, e.g. (customer, profile, SQL) {wrong[:2]}")
    return out


# Not profile columns: what the segment expectations below need besides the columns.
SEGMENT_INPUTS = {"app_events": "countIf(channel = 'app')", "all_events": "count()"}


def expected_segments(stack, prefix: str, boundaries_id: str) -> dict[str, dict[str, object]]:
    """Value tier, RFM and tags of every customer, from figures recomputed with SQL (as of each
    profile's as_of), the published boundaries row and the rules file, by the definitions in
    docs/segments.md."""
    want = recomputed(stack, prefix)
    extra = stack.query(
        f"SELECT customer_key, {', '.join(SEGMENT_INPUTS.values())} FROM events FINAL "
        "WHERE startsWith(customer_key, {p:String}) GROUP BY customer_key", {"p": prefix})
    app_events = {row[0]: row[1] for row in extra}
    all_events = {row[0]: row[2] for row in extra}
    as_of = dict(stack.query("SELECT customer_key, toUnixTimestamp64Milli(as_of) FROM customer_profiles FINAL "
                             "WHERE startsWith(customer_key, {p:String})", {"p": prefix}))
    (high, mid, r_cuts, f_cuts, m_cuts), = stack.query(
        "SELECT value_high_min, value_mid_min, recency_days_cuts, frequency_cuts, monetary_cuts "
        "FROM segment_boundaries FINAL WHERE boundaries_id = {b:String}", {"b": boundaries_id})
    version = load_rulebooks(settings()).segments.at_ms(max(as_of.values()))
    out: dict[str, dict[str, object]] = {"value_tier": {}, "rfm_recency": {}, "rfm_frequency": {}, "rfm_monetary": {},
                                         "rfm_segment": {}, "tags": {}}
    for key in want["first_seen"]:
        purchases = want["purchase_count"][key]
        spend_365d = want["spend_365d"][key].get("EUR", 0)
        monetary = want["spend"][key].get("EUR", 0)
        last_purchase = want["last_purchase_at"][key]
        days = None if last_purchase is None else (as_of[key] - int(last_purchase.timestamp() * 1000)) // DAY
        out["value_tier"][key] = "high" if spend_365d >= high else "mid" if spend_365d >= mid else "low"
        if days is None:
            r = f = m = 0
            out["rfm_segment"][key] = ""
        else:
            r = 5 - sum(days > cut for cut in r_cuts)
            f = 1 + sum(purchases > cut for cut in f_cuts)
            m = 1 + sum(monetary > cut for cut in m_cuts)
            cell = f"{r}{(f + m + 1) // 2}"
            out["rfm_segment"][key] = next(name for name, cells in version.rfm.segments.items() if cell in cells)
        out["rfm_recency"][key], out["rfm_frequency"][key], out["rfm_monetary"][key] = r, f, m
        figures = {
            "purchase_count": purchases, "refund_count": want["refund_count"][key],
            "refund_rate": want["refund_count"][key] / purchases if purchases else None,
            "spend_365d": float(spend_365d), "session_count": want["session_count"][key],
            "sign_in_count": want["sign_in_count"][key], "sessions_30d": want["sessions_30d"][key],
            "sign_ins_30d": want["sign_ins_30d"][key], "complaint_count": want["complaint_count"][key],
            "complaints_30d": want["complaints_30d"][key], "open_complaints": want["open_complaints"][key],
            "nps_latest": want["nps_latest"][key], "csat_latest": want["csat_latest"][key],
            "points_available": want["points_available"][key],
            "weekend_purchase_share": want["weekend_purchases"][key] / purchases if purchases else None,
            "app_share": app_events[key] / all_events[key], "days_since_last_purchase": days,
            "days_since_last_seen": (as_of[key] - int(want["last_seen"][key].timestamp() * 1000)) // DAY,
        }
        out["tags"][key] = sorted(name for name, conditions in version.tags.items()
                                  if all(bounds.holds(figures[field]) for field, bounds in conditions.items()))
    return out


def segment_differences(stack, prefix: str, boundaries_id: str) -> list[str]:
    want = expected_segments(stack, prefix, boundaries_id)
    got = projected(stack, prefix, list(want))
    return [f"{name}: {len(wrong)} differ, e.g. (customer, profile, expected) {wrong[:2]}"
            for name in want
            if (wrong := [(key, got[name].get(key), want[name][key]) for key in sorted(want[name])
                          if got[name].get(key) != want[name][key]])]


def test_every_profile_figure_equals_sql_over_the_events_table(stack):
    prefix = f"cons{uuid.uuid4().hex[:6]}"
    workload = Workload(customers=1000, days=60, seed=23, customer_prefix=prefix, bad_input_rate=0.0)
    messages = list(Simulator(workload).messages(topics.EVENT_PARTITIONS))
    for message in messages:
        stack.send(message.key, message.value, partition=message.partition)
    stack.flush()
    valid = sum(m.kind == "valid" for m in messages)
    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE startsWith(customer_key, {p:String})",
                                       {"p": prefix})[0][0] == valid, timeout=600, what=f"{valid} event rows")

    deadline, found = time.monotonic() + 120, ["not compared yet"]
    while found and time.monotonic() < deadline:
        found = differences(stack, prefix)
        if found:
            time.sleep(2)
    assert not found, "\n".join(found)
    # The comparison covered every kind of figure, not empty columns.
    counts = stack.query("SELECT countIf(nps_latest IS NOT NULL), countIf(csat_latest IS NOT NULL), "
                       "countIf(open_complaints > 0), countIf(sessions_30d > 0), countIf(length(marketing_consent) > 0), "
                       "countIf(points_available > 0), uniq(lifecycle_stage) FROM customer_profiles FINAL "
                       "WHERE startsWith(customer_key, {p:String})", {"p": prefix})[0]
    assert all(n > 0 for n in counts[:6]) and counts[6] > 1, counts
    # Some events came with only an alias (before or after the link) and were attributed; every
    # profile kept under such an alias was merged into its customer's.
    attributed = stack.query("SELECT count() FROM events FINAL WHERE startsWith(customer_key, {p:String}) "
                             "AND attributed_from != ''", {"p": prefix})[0][0]
    aliases = stack.query("SELECT count(), countIf(merged_into != '') FROM customer_profiles FINAL "
                          "WHERE position(customer_key, {p:String}) > 0 AND NOT startsWith(customer_key, {p:String})",
                          {"p": prefix})[0]
    assert attributed > 0 and aliases[0] > 0 and aliases[0] == aliases[1], (attributed, aliases)

    # Segments against the population: publish boundaries, let ticks carry them to every customer.
    rules = load_rulebooks(settings())
    boundaries_id = boundaries.publish(stack.client, stack.settings.clickhouse_database, rules.segments, stack.producer)
    assert boundaries_id
    # After every time the stack has seen, so that the tick moves every partition's clock; except the
    # edge-of-the-catalog times of test_producer_fuzz.py, where a tick a day later would be refused.
    latest = stack.query("SELECT greatest((SELECT max(as_of) FROM customer_profiles WHERE as_of < '2100-01-01'), "
                         "(SELECT max(occurred_at) FROM events WHERE occurred_at < '2100-01-01'))")[0][0]
    tick_at = normal(latest) + timedelta(days=1)
    for n, partition in enumerate([*range(topics.EVENT_PARTITIONS)] * 2):
        tick = {"event_id": str(uuid.uuid4()), "type": "clock_ticked", "partition": partition,
                "occurred_at": (tick_at + timedelta(minutes=n // topics.EVENT_PARTITIONS)).isoformat()}
        stack.send(b"clock", orjson.dumps(tick), partition=partition)
    stack.flush()
    stack.wait_for(lambda: stack.query(
        "SELECT countIf(boundaries_id != {b:String}) = 0 FROM customer_profiles FINAL WHERE startsWith(customer_key, {p:String})",
        {"b": boundaries_id, "p": prefix})[0][0], timeout=300, what="every customer scored with the new boundaries")
    deadline, found = time.monotonic() + 120, ["not compared yet"]
    while found and time.monotonic() < deadline:
        found = differences(stack, prefix) + segment_differences(stack, prefix, boundaries_id)
        if found:
            time.sleep(2)
    assert not found, "\n".join(found)
    spread = stack.query("SELECT uniq(value_tier), uniq(rfm_segment), countIf(length(tags) > 0) FROM customer_profiles FINAL "
                         "WHERE startsWith(customer_key, {p:String})", {"p": prefix})[0]
    assert spread[0] == 3 and spread[1] >= 4 and spread[2] > 0, spread


def test_the_profile_and_identity_sql_in_the_docs_runs(stack):
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    for name, minimum in (("profiles.md", 2), ("identity.md", 2)):
        statements = [s.strip() for block in re.findall(r"```sql\n(.*?)```", (docs / name).read_text(), flags=re.S)
                      for s in block.split(";") if s.strip()]
        assert len(statements) >= minimum, name
        results = [stack.query(statement) for statement in statements]
        assert results[0], f"{name}: the first query finds rows (the test before this one filled the tables)"
