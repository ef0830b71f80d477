"""A realistic simulated workload: stores with POS terminals, an app, and customers with different
habits who buy and lapse the way real shoppers do (each with a purchase rate and a chance to leave
after each purchase: the BG/NBD story the churn model assumes, docs/churn-score.md). Deterministic
for a workload (seed, start, length), so two runs send the same events.

It also sends what real producers get wrong, a little of it: malformed bytes, unknown types,
invalid payloads, and resent duplicates, so the dead-letter path and de-duplication show up.

It writes to `crm.events` directly, so it seals personal fields itself, as every edge does
(services/ingest/sealing.py): `messages()` seals the registrations' name, e-mail, phone and birthday
under each customer's data key, one key store call per SEAL_BATCH events. Without a `sealer` it opens
the stack's key store (settings(): CRM_STATE_DIR, CRM_KAFKA_*); tests and benchmarks that need no
Kafka give `offline_sealer()`. `events()` stays plain: the submitted form, for the ingestion API."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Iterator

import orjson

from services.ingest.sealing import Sealer, offline_keys

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
    """A kind of shopper. Purchases follow the BG/NBD story (docs/churn-score.md): while with the
    shop a customer buys at a rate of their own, drawn from a gamma with the persona's mean and shape,
    and right after each repeat purchase leaves for good with a probability of their own, drawn from
    the persona's beta. Nobody announces leaving: they just stop buying, and stop using the app a few
    weeks later. Unlike the model's Poisson process, real shoppers keep a rhythm (the weekly shop):
    the gaps between their purchases and app sessions are Erlang with shape `regularity` (1 would be
    Poisson), so that a long gap means something, as it does in life."""
    name: str
    share: float
    purchases_per_month: float      # the mean purchase rate of the persona's customers while with the shop
    rate_shape: float               # gamma shape of that rate across customers: the lower, the more spread
    dropout: tuple[float, float]    # Beta(a, b) of the chance to leave right after each repeat purchase
    app_sessions_per_month: float
    basket_size: tuple[int, int]
    categories: tuple[str, ...]
    refund_rate: float = 0.02
    complains: float = 0.01         # chance of a complaint per month with the shop
    detractor_share: float = 0.2    # share of NPS answers from 0 to 6
    regularity: int = 3             # Erlang shape of the gaps between purchases, and between sessions


PERSONAS = (
    Persona("weekly_grocery", 0.30, 4.5, 3.0, (1.2, 30.0), 0.5, (3, 12), ("grocery", "bakery", "beverages", "household"),
            regularity=6),
    Persona("app_first", 0.20, 1.5, 2.0, (1.0, 12.0), 8.0, (1, 4), ("electronics", "clothing", "beauty")),
    Persona("occasional", 0.25, 0.7, 1.5, (1.0, 5.0), 0.5, (1, 5), tuple(CATEGORIES), regularity=2),
    Persona("bargain_refunder", 0.07, 2.5, 2.0, (1.0, 8.0), 4.0, (2, 6), ("clothing", "toys", "electronics"),
            refund_rate=0.25),
    Persona("drifting_away", 0.13, 3.0, 2.0, (2.0, 6.0), 4.0, (2, 8), ("grocery", "beauty", "clothing"),
            complains=0.08, detractor_share=0.8),
    Persona("big_basket", 0.05, 1.2, 3.0, (1.0, 20.0), 1.0, (4, 10), ("electronics", "household", "toys", "clothing")),
)
# Marketing consent per channel: the chance a customer grants it at registration (push: app users only).
CONSENT = {"email": 0.7, "push": 0.6, "sms": 0.15, "phone": 0.3, "post": 0.1}
# Most customers sign up in the first weeks (the programme's launch: existing shoppers join on
# their next visit), the others over the whole period.
LAUNCH_SHARE, LAUNCH_DAYS = 0.6, 21
# Browsing goes on for a while after the last purchase of a customer who left, as it does in life.
LINGER_DAYS = (0.0, 30.0)
# Events sealed per key store call.
SEAL_BATCH = 2000


def offline_sealer(secret: bytes = b"crm-simulator") -> Sealer:
    """A sealer without Kafka (keys derived from `secret`): for tests and benchmarks that fold the
    simulated records without a stack; nobody else can open what it seals."""
    return Sealer(offline_keys(secret), secret)


@dataclass
class Customer:
    customer_id: str
    persona: Persona
    home_store: str
    timezone: str
    loyalty_card: str
    app_user_id: str | None
    joined: datetime
    purchase_rate: float            # purchases per day while with the shop
    dropout: float                  # chance to leave right after each repeat purchase
    left_at: datetime | None = None  # set by the simulation: the last purchase of a customer who left
    orders: list[tuple[str, str, Decimal]] = field(default_factory=list)


@dataclass
class Workload:
    """What to simulate: `customers` over `days` of event time from `start`. The history ends at
    `start + days`; `Workload.ending(end, ...)` makes one that ends at a given moment (the demo:
    now). The same workload gives the same records."""
    customers: int = 2000
    days: int = 45
    seed: int = 7
    start: datetime = datetime(2026, 6, 1, tzinfo=UTC)
    bad_input_rate: float = 0.003
    duplicate_rate: float = 0.01
    customer_prefix: str = "cust"

    @classmethod
    def ending(cls, end: datetime, days: int, **options: Any) -> Workload:
        return cls(days=days, start=end - timedelta(days=days), **options)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes
    kind: str  # valid | duplicate | malformed | unknown_type | invalid | tick
    partition: int | None = None  # set for clock ticks; events go where their key hashes
    at: datetime | None = None  # the event time the record stands at: its event's, or its tick's


class Simulator:
    """Deterministic for its workload: the same (seed, start, days, ...) gives the same records, in
    the same order, with the same ids. One simulator simulates once: `events()` (which `messages()`
    calls) draws the population anew from where its random streams are, so a second call gives
    another one."""

    def __init__(self, workload: Workload, sealer: Sealer | None = None):
        self.w = workload
        self.sealer = sealer
        self.rng = random.Random(workload.seed)
        self.uuid_rng = random.Random(workload.seed * 7919 + 1)
        self.customers: list[Customer] = []  # filled by `events()`, each with whether and when they left

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
            launch = rng.random() < LAUNCH_SHARE
            # Nobody joins on the last day, so that everyone's sign-up and first purchase are in the history.
            joined = w.start + timedelta(days=rng.uniform(0, min(LAUNCH_DAYS, w.days - 1) if launch else w.days - 1))
            mean_rate = persona.purchases_per_month / 30
            customers.append(Customer(
                customer_id=f"{w.customer_prefix}-{n:06d}", persona=persona, home_store=store, timezone=tz,
                # Aliases unique to the workload, as customer ids are, so that two workloads in one
                # stack never claim each other's cards.
                loyalty_card=f"LC-{w.customer_prefix}-{1000000 + n}",
                app_user_id=f"app-{w.customer_prefix}-{n:06d}" if persona.app_sessions_per_month >= 1 else None,
                joined=self._opening_hours(joined),
                purchase_rate=rng.gammavariate(persona.rate_shape, mean_rate / persona.rate_shape),
                dropout=rng.betavariate(*persona.dropout),
            ))
        return customers

    def events(self) -> list[dict[str, Any]]:
        """Every valid event of the workload up to its end, in event-time order."""
        end = self.w.end
        self.customers = self._customers()
        events: list[dict[str, Any]] = []
        for customer in self.customers:
            events.extend(e for e in self._customer_events(customer, end) if e["occurred_at"] <= end)
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
        """The customer's life: signing up with a first purchase, buying until they leave (or the
        history ends), using the app a little longer, now and then a complaint. May run past `end`
        (a refund weeks after a purchase): `events()` keeps what happened by then."""
        rng, p = self.rng, c.persona
        browsed_first = bool(c.app_user_id) and rng.random() < 0.3
        channel = "app" if browsed_first or (c.app_user_id and rng.random() < 0.5) else "pos"
        yield from self._signing_up(c, channel, browsed_first)
        purchases = self._purchase_times(c, end)
        for at in purchases:
            yield from self._purchase(c, at, channel)
        until = min(end, c.left_at + timedelta(days=rng.uniform(*LINGER_DAYS)) if c.left_at else end)
        engaged_days = max((until - c.joined).total_seconds() / 86400, 0)
        if c.app_user_id:
            for at in self._moments(c.joined, engaged_days, p.app_sessions_per_month / 30, p.regularity):
                yield from self._app_session(c, at)
        if rng.random() < p.complains * max(engaged_days / 30, 1):
            yield from self._complaint(c, c.joined + timedelta(days=rng.uniform(0, max(engaged_days, 1))))

    def _signing_up(self, c: Customer, channel: str, browsed_first: bool) -> Iterator[dict[str, Any]]:
        """Registration and consents; before them, when `browsed_first`, a few views in the app from
        a device the app knows nothing else of yet (the customer then signs up in the app, on that
        device, which links it)."""
        rng, p = self.rng, c.persona
        if browsed_first:
            for _ in range(rng.randint(1, 3)):
                at = c.joined - timedelta(days=rng.uniform(0.1, 5))
                category = rng.choice(p.categories)
                view = self._envelope(c, "product_viewed", at, "app",
                                      {"sku": f"{category[:3]}-{rng.randint(1, 400):04d}", "category": category})
                yield self._anonymous(view, "device_id")
        consents = {name: rng.random() < share for name, share in CONSENT.items()
                    if name != "push" or c.app_user_id}
        yield self._envelope(c, "customer_registered", c.joined, channel, {
            "name": f"Customer {c.customer_id[-6:]}", "email": f"{c.customer_id}@example.com",
            **({"phone": f"+31 6 {rng.randint(10000000, 99999999)}"} if consents["phone"] else {}),
            "preferred_store_id": c.home_store,
            "birthday": f"{rng.randint(1950, 2006)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        })
        for n, (name, granted) in enumerate(consents.items(), 1):
            # E-mail is always asked (and sometimes refused); other channels are recorded when granted.
            if granted or name == "email":
                yield self._envelope(c, "consent_changed", c.joined + timedelta(seconds=n), channel,
                                     {"channel": name, "granted": granted})

    def _purchase_times(self, c: Customer, end: datetime) -> list[datetime]:
        """The first purchase right after signing up, then Poisson purchases at the customer's rate
        at opening hours; after each repeat purchase a coin with the customer's dropout chance says
        whether that was the last (then `c.left_at` is set). Stops at `end`."""
        times = [c.joined + timedelta(minutes=self.rng.uniform(2, 20))]
        moment = times[0]
        while True:
            moment += timedelta(days=self._gap(c.purchase_rate, c.persona.regularity))
            placed = max(self._opening_hours(moment), times[-1] + timedelta(minutes=30))
            if placed > end:
                return times
            times.append(placed)
            if self.rng.random() < c.dropout:
                c.left_at = times[-1]
                return times

    def _purchase(self, c: Customer, at: datetime, channel: str) -> Iterator[dict[str, Any]]:
        rng, p = self.rng, c.persona
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
            detractor = rng.random() < p.detractor_share
            yield self._envelope(c, "survey_answered", at + timedelta(hours=rng.uniform(2, 48)), "app",
                                 {"survey_id": "post-purchase", "kind": "nps",
                                  "score": rng.randint(0, 6) if detractor else rng.randint(7, 10)})

    def _app_session(self, c: Customer, at: datetime) -> Iterator[dict[str, Any]]:
        """A session in the app: sign-in, views, searches, shares, reviews."""
        rng, p = self.rng, c.persona
        yield self._envelope(c, "app_session_started", at, "app",
                             {"session_id": self._uuid()[:18], "platform": rng.choice(("ios", "android"))})
        if rng.random() < 0.6:
            yield self._envelope(c, "daily_sign_in", at + timedelta(seconds=5), "app", {})
        for i in range(rng.randint(1, 4)):
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

    def _complaint(self, c: Customer, at: datetime) -> Iterator[dict[str, Any]]:
        """A complaint, resolved (with a CSAT answer) six times in ten."""
        rng = self.rng
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

    def _moments(self, start: datetime, days: float, per_day: float, regularity: int) -> Iterator[datetime]:
        """Moments at `per_day` on average over `days` from `start`, at opening hours, with Erlang gaps."""
        if per_day <= 0:
            return
        t = 0.0
        while True:
            t += self._gap(per_day, regularity)
            if t >= days:
                return
            yield self._opening_hours(start + timedelta(days=t))

    def _gap(self, per_day: float, regularity: int) -> float:
        """Days to the next moment of a process at `per_day` on average: Erlang with shape `regularity`."""
        return self.rng.gammavariate(regularity, 1 / (per_day * regularity))

    def _opening_hours(self, moment: datetime) -> datetime:
        """The same day, at a random hour from 8:00 to 20:59 UTC."""
        return moment.replace(hour=self.rng.randint(8, 20))

    def messages(self, partitions: int = 0) -> Iterator[Message]:
        """The records to produce: valid events (keyed by customer) with a little bad input mixed in,
        and, when `partitions` is given, a clock tick to every partition at each UTC midnight of the
        history and one at its end, as the worker's leader would have written them while that
        history happened: time in the log follows the events and stops where they do."""
        rng, end = self.rng, self.w.end
        next_tick = _next_midnight(self.w.start)
        for event in self._sealed(self.events()):
            while partitions and event["occurred_at"] >= next_tick:
                yield from self._ticks(next_tick, partitions)
                next_tick += timedelta(days=1)
            at = event["occurred_at"]
            event = {**event, "occurred_at": at.isoformat()}
            alias_type, alias = next(iter(event["identifiers"].items()))
            key = (event.get("customer_id") or f"{alias_type}:{alias}").encode()
            value = orjson.dumps(event)
            yield Message(key, value, "valid", at=at)
            if rng.random() < self.w.duplicate_rate:
                yield Message(key, value, "duplicate", at=at)
            if rng.random() < self.w.bad_input_rate:
                yield self._bad(event, key, at)
        while partitions and next_tick < end:
            yield from self._ticks(next_tick, partitions)
            next_tick += timedelta(days=1)
        if partitions:
            yield from self._ticks(end, partitions)

    def _sealed(self, events: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The events in their log form, sealed SEAL_BATCH at a time (one key store call each)."""
        sealer, opened = self.sealer, None
        if sealer is None:
            from streams.config import settings

            sealer = opened = Sealer.open(settings())
        try:
            for start in range(0, len(events), SEAL_BATCH):
                yield from sealer.seal(events[start:start + SEAL_BATCH])
        finally:
            if opened is not None:
                opened.close()

    def _ticks(self, at: datetime, partitions: int) -> Iterator[Message]:
        for partition in range(partitions):
            tick = {"event_id": self._uuid(), "type": "clock_ticked", "occurred_at": at.isoformat(),
                    "partition": partition}
            yield Message(b"clock", orjson.dumps(tick), "tick", partition, at)

    def _bad(self, event: dict[str, Any], key: bytes, at: datetime) -> Message:
        kind = self.rng.choice(("malformed", "unknown_type", "invalid"))
        if kind == "malformed":
            return Message(key, orjson.dumps(event)[: self.rng.randint(5, 60)], kind, at=at)
        if kind == "unknown_type":
            return Message(key, orjson.dumps({**event, "event_id": self._uuid(), "type": "loyalty_teleported"}), kind,
                           at=at)
        broken = {**event, "event_id": self._uuid(), "occurred_at": "yesterday-ish"}
        return Message(key, orjson.dumps(broken), kind, at=at)


def _next_midnight(moment: datetime) -> datetime:
    """The first UTC midnight after `moment`."""
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def produce(messages: Iterator[Message], producer: Any, topic: str, on_sent: Any = None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in messages:
        producer.send(topic, key=message.key, value=message.value, partition=message.partition)
        counts[message.kind] = counts.get(message.kind, 0) + 1
        if on_sent is not None:
            on_sent(message)
    producer.flush()
    return counts
