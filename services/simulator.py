"""A realistic simulated workload: stores with POS terminals, an app, and customers with different
habits, some of whom go quiet. Deterministic for a seed, so two runs send the same events.

It also sends what real producers get wrong, a little of it: malformed bytes, unknown types,
invalid payloads, and resent duplicates, so the dead-letter path and de-duplication show up."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Iterator

import orjson

CATEGORIES = {
    "grocery": (1.5, 12.0), "bakery": (1.0, 6.0), "beverages": (1.0, 9.0), "household": (2.5, 25.0),
    "beauty": (4.0, 45.0), "electronics": (15.0, 300.0), "clothing": (9.0, 90.0), "toys": (5.0, 60.0),
}
STORES = [
    ("store-ams-01", "Europe/Amsterdam"), ("store-ams-02", "Europe/Amsterdam"), ("store-rtm-01", "Europe/Amsterdam"),
    ("store-ber-01", "Europe/Berlin"), ("store-muc-01", "Europe/Berlin"), ("store-par-01", "Europe/Paris"),
]
TERMINALS_PER_STORE = 3


@dataclass(frozen=True)
class Persona:
    name: str
    share: float
    purchases_per_month: float
    app_sessions_per_month: float
    basket_size: tuple[int, int]
    categories: tuple[str, ...]
    refund_rate: float = 0.02
    goes_quiet: bool = False
    complains: float = 0.01


PERSONAS = (
    Persona("weekly_grocery", 0.30, 4.5, 2.0, (3, 12), ("grocery", "bakery", "beverages", "household")),
    Persona("app_first", 0.20, 1.5, 8.0, (1, 4), ("electronics", "clothing", "beauty")),
    Persona("occasional", 0.25, 0.6, 0.5, (1, 5), tuple(CATEGORIES)),
    Persona("bargain_refunder", 0.07, 2.5, 4.0, (2, 6), ("clothing", "toys", "electronics"), refund_rate=0.25),
    Persona("drifting_away", 0.13, 3.0, 4.0, (2, 8), ("grocery", "beauty", "clothing"), goes_quiet=True, complains=0.08),
    Persona("new_joiner", 0.05, 2.0, 6.0, (1, 6), tuple(CATEGORIES)),
)


@dataclass
class Customer:
    customer_id: str
    persona: Persona
    home_store: str
    timezone: str
    loyalty_card: str
    app_user_id: str | None
    joined: datetime
    quiet_from: datetime | None
    orders: list[tuple[str, str, Decimal]] = field(default_factory=list)


@dataclass
class Workload:
    customers: int = 2000
    days: int = 45
    seed: int = 7
    start: datetime = datetime(2026, 6, 1, tzinfo=UTC)
    bad_input_rate: float = 0.003
    duplicate_rate: float = 0.01
    customer_prefix: str = "cust"


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes
    kind: str  # valid | duplicate | malformed | unknown_type | invalid | tick
    partition: int | None = None  # set for clock ticks; events go where their key hashes


class Simulator:
    def __init__(self, workload: Workload):
        self.w = workload
        self.rng = random.Random(workload.seed)
        self.uuid_rng = random.Random(workload.seed * 7919 + 1)

    def _uuid(self) -> str:
        # A version-4 layout from a seeded generator: reproducible ids, so a re-run resends the same events.
        h = f"{self.uuid_rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"

    def _customers(self) -> list[Customer]:
        rng, w = self.rng, self.w
        weights = [p.share for p in PERSONAS]
        customers = []
        for n in range(w.customers):
            persona = rng.choices(PERSONAS, weights)[0]
            store, tz = rng.choice(STORES)
            if persona.name == "new_joiner":
                joined = w.start + timedelta(days=rng.uniform(w.days * 0.6, w.days * 0.95))
            else:
                joined = w.start + timedelta(days=rng.uniform(0, w.days * 0.3))
            quiet_from = joined + timedelta(days=rng.uniform(10, 30)) if persona.goes_quiet else None
            customers.append(Customer(
                customer_id=f"{w.customer_prefix}-{n:06d}", persona=persona, home_store=store, timezone=tz,
                # Aliases unique to the workload, as customer ids are, so that two workloads in one
                # stack never claim each other's cards.
                loyalty_card=f"LC-{w.customer_prefix}-{1000000 + n}",
                app_user_id=f"app-{w.customer_prefix}-{n:06d}" if persona.app_sessions_per_month >= 1 else None,
                joined=joined, quiet_from=quiet_from,
            ))
        return customers

    def events(self) -> list[dict[str, Any]]:
        """Every valid event of the workload, in event-time order."""
        end = self.w.start + timedelta(days=self.w.days)
        events: list[dict[str, Any]] = []
        for customer in self._customers():
            events.extend(self._customer_events(customer, end))
        events.sort(key=lambda e: e["occurred_at"])
        return events

    def _envelope(self, customer: Customer, type_: str, at: datetime, channel: str, payload: dict[str, Any],
                  store: str | None = None) -> dict[str, Any]:
        source: dict[str, Any] = {"channel": channel, "timezone": customer.timezone}
        if channel == "pos":
            source["store_id"] = store or customer.home_store
            source["terminal_id"] = f"{source['store_id']}-t{self.rng.randint(1, TERMINALS_PER_STORE)}"
        elif channel == "app":
            source["device_id"] = f"dev-{customer.customer_id}"
        identifiers = {"loyalty_card": customer.loyalty_card}
        if customer.app_user_id:
            identifiers["app_user_id"] = customer.app_user_id
        if channel == "app":
            identifiers["device_id"] = source["device_id"]
        return {
            "event_id": self._uuid(), "type": type_, "schema_version": 1, "customer_id": customer.customer_id,
            "identifiers": identifiers, "occurred_at": at, "source": source, "payload": payload,
        }

    def _anonymous(self, event: dict[str, Any], alias_type: str) -> dict[str, Any]:
        """The event as a producer sends it when it knows only one alias of the customer."""
        alias = event["identifiers"][alias_type]
        return {**{k: v for k, v in event.items() if k != "customer_id"}, "identifiers": {alias_type: alias}}

    def _customer_events(self, c: Customer, end: datetime) -> Iterator[dict[str, Any]]:
        rng, p = self.rng, c.persona
        channel = "app" if c.app_user_id and rng.random() < 0.5 else "pos"
        if c.app_user_id and rng.random() < 0.3:
            # Browsing the app before signing up: the device is all the app knows yet.
            for _ in range(rng.randint(1, 3)):
                at = c.joined - timedelta(days=rng.uniform(0.1, 5))
                category = rng.choice(p.categories)
                view = self._envelope(c, "product_viewed", at, "app",
                                      {"sku": f"{category[:3]}-{rng.randint(1, 400):04d}", "category": category})
                yield self._anonymous(view, "device_id")
        yield self._envelope(c, "customer_registered", c.joined, channel, {
            "name": f"Customer {c.customer_id[-6:]}", "email": f"{c.customer_id}@example.com",
            "preferred_store_id": c.home_store,
            "birthday": f"{rng.randint(1950, 2006)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        })
        yield self._envelope(c, "consent_changed", c.joined + timedelta(minutes=1), channel,
                             {"channel": "email", "granted": rng.random() < 0.7})
        active_until = min(end, c.quiet_from or end)
        days = max((active_until - c.joined).total_seconds() / 86400, 0)
        # Purchases: a Poisson process at the persona's rate, at opening hours.
        for at in self._moments(c.joined, days, p.purchases_per_month / 30):
            store = c.home_store if rng.random() < 0.85 else rng.choice(STORES)[0]
            order_id = f"ord-{self._uuid()[:13]}"
            lines = []
            for _ in range(rng.randint(*p.basket_size)):
                category = rng.choice(p.categories)
                low, high = CATEGORIES[category]
                lines.append({"sku": f"{category[:3]}-{rng.randint(1, 400):04d}", "category": category,
                              "quantity": rng.choice((1, 1, 1, 2, 3)),
                              "unit_price": str(Decimal(str(round(rng.uniform(low, high), 2))))})
            total = sum(Decimal(line["unit_price"]) * line["quantity"] for line in lines)
            pos = rng.random() < (0.3 if p.name == "app_first" else 0.9)
            purchase = self._envelope(c, "purchase_completed", at, "pos" if pos else "app",
                                      {"order_id": order_id, "currency": "EUR", "lines": lines,
                                       **({"store_id": store} if pos else {})}, store=store)
            # Some terminals only scan the loyalty card.
            yield self._anonymous(purchase, "loyalty_card") if pos and rng.random() < 0.1 else purchase
            c.orders.append((order_id, "EUR", total))
            if rng.random() < p.refund_rate:
                full = rng.random() < 0.5
                amount = total if full else (total * Decimal(rng.uniform(0.1, 0.6))).quantize(Decimal("0.01"))
                if amount > 0:
                    yield self._envelope(c, "purchase_refunded", at + timedelta(days=rng.uniform(1, 20)), "pos",
                                         {"refund_id": f"ref-{order_id[4:]}", "order_id": order_id,
                                          "currency": "EUR", "amount": str(amount), "full": full}, store=store)
            if rng.random() < 0.15:
                # Members spend points now and then; some ask for more than they have.
                reward, points = rng.choice((("coffee", 150), ("tote-bag", 400), ("voucher", 500), ("voucher", 120)))
                yield self._envelope(c, "points_redemption_requested", at + timedelta(minutes=2), channel,
                                     {"request_id": f"red-{self._uuid()[:12]}", "reward_id": reward,
                                      "points": points}, store=store)
            if rng.random() < 0.1:
                yield self._envelope(c, "survey_answered", at + timedelta(hours=rng.uniform(2, 48)), "app",
                                     {"survey_id": "post-purchase", "kind": "nps",
                                      "score": rng.randint(0, 6) if p.goes_quiet else rng.randint(5, 10)})
        # App engagement: sessions, sign-ins, views, searches, shares, reviews. Browsing continues a
        # little after a customer stops buying, as it does in life.
        engaged_until = min(end, (c.quiet_from + timedelta(days=15)) if c.quiet_from else end)
        engaged_days = max((engaged_until - c.joined).total_seconds() / 86400, 0)
        if c.app_user_id:
            for at in self._moments(c.joined, engaged_days, p.app_sessions_per_month / 30):
                yield self._envelope(c, "app_session_started", at, "app",
                                     {"session_id": self._uuid()[:18], "platform": rng.choice(("ios", "android"))})
                if rng.random() < 0.6:
                    yield self._envelope(c, "daily_sign_in", at + timedelta(seconds=5), "app", {})
                for i in range(rng.randint(0, 2)):
                    category = rng.choice(p.categories)
                    yield self._envelope(c, "product_viewed", at + timedelta(seconds=30 * (i + 1)), "app",
                                         {"sku": f"{category[:3]}-{rng.randint(1, 400):04d}", "category": category})
                if rng.random() < 0.2:
                    yield self._envelope(c, "search_performed", at + timedelta(minutes=3), "app",
                                         {"query": rng.choice(p.categories), "results_count": rng.randint(0, 80)})
                if rng.random() < 0.05:
                    yield self._envelope(c, "content_shared", at + timedelta(minutes=4), "app",
                                         {"content_type": "product", "content_id": "p-1", "network": "whatsapp"})
                if rng.random() < 0.03:
                    yield self._envelope(c, "review_posted", at + timedelta(minutes=5), "app",
                                         {"review_id": self._uuid()[:12], "rating": rng.randint(1, 5)})
        if rng.random() < p.complains * max(days / 30, 1):
            at = c.joined + timedelta(days=rng.uniform(0, max(days, 1)))
            complaint = f"cmp-{self._uuid()[:12]}"
            yield self._envelope(c, "complaint_filed", at, "service",
                                 {"complaint_id": complaint, "category": rng.choice(("delivery", "quality", "staff"))})
            if rng.random() < 0.6:
                resolved = at + timedelta(hours=rng.uniform(4, 120))
                satisfied = rng.random() < 0.6
                yield self._envelope(c, "complaint_resolved", resolved, "service",
                                     {"complaint_id": complaint, "customer_satisfied": satisfied})
                yield self._envelope(c, "survey_answered", resolved + timedelta(hours=1), "service",
                                     {"survey_id": "after-complaint", "kind": "csat",
                                      "score": rng.randint(3, 5) if satisfied else rng.randint(1, 3)})

    def _moments(self, start: datetime, days: float, per_day: float) -> Iterator[datetime]:
        if per_day <= 0:
            return
        t = 0.0
        while True:
            t += self.rng.expovariate(per_day)
            if t >= days:
                return
            moment = start + timedelta(days=t)
            yield moment.replace(hour=self.rng.randint(8, 20))

    def messages(self, partitions: int = 0) -> Iterator[Message]:
        """The records to produce: valid events (keyed by customer) with a little bad input mixed in,
        and, when `partitions` is given, a clock tick to every partition at each simulated midnight,
        as the worker's leader would have written them while that history happened."""
        rng = self.rng
        next_tick = self.w.start + timedelta(days=1)
        for event in self.events():
            while partitions and event["occurred_at"] >= next_tick:
                yield from self._ticks(next_tick, partitions)
                next_tick += timedelta(days=1)
            event = {**event, "occurred_at": event["occurred_at"].isoformat()}
            alias_type, alias = next(iter(event["identifiers"].items()))
            key = (event.get("customer_id") or f"{alias_type}:{alias}").encode()
            value = orjson.dumps(event)
            yield Message(key, value, "valid")
            if rng.random() < self.w.duplicate_rate:
                yield Message(key, value, "duplicate")
            if rng.random() < self.w.bad_input_rate:
                yield self._bad(event, key)

    def _ticks(self, at: datetime, partitions: int) -> Iterator[Message]:
        for partition in range(partitions):
            tick = {"event_id": self._uuid(), "type": "clock_ticked", "occurred_at": at.isoformat(),
                    "partition": partition}
            yield Message(b"clock", orjson.dumps(tick), "tick", partition)

    def _bad(self, event: dict[str, Any], key: bytes) -> Message:
        kind = self.rng.choice(("malformed", "unknown_type", "invalid"))
        if kind == "malformed":
            return Message(key, orjson.dumps(event)[: self.rng.randint(5, 60)], kind)
        if kind == "unknown_type":
            return Message(key, orjson.dumps({**event, "event_id": self._uuid(), "type": "loyalty_teleported"}), kind)
        broken = {**event, "event_id": self._uuid(), "occurred_at": "yesterday-ish"}
        return Message(key, orjson.dumps(broken), kind)


def produce(messages: Iterator[Message], producer: Any, topic: str, on_sent: Any = None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in messages:
        producer.send(topic, key=message.key, value=message.value, partition=message.partition)
        counts[message.kind] = counts.get(message.kind, 0) + 1
        if on_sent is not None:
            on_sent(message)
    producer.flush()
    return counts
