"""The points ledger of one member: a pure fold over the member's ordered events and the passing of
event time. No Kafka, Faust or ClickHouse here; `streams/pipeline.py` feeds it.

    apply(account, event, book)   -> (account, outputs)   one accepted event
    advance(account, until, book) -> (account, outputs)   time passed (a clock tick in the log)

Points live in lots. A purchase's lot is pending for the return window, then available until it
expires; bonuses and positive adjustments are available at once. Everything that takes points
(redemption, expiry, claw-back, negative adjustment, settling debt) takes them from the available lot
that expires first. `available` never goes negative: a claw-back larger than what is available
takes what there is and records the rest as `debt`, which later earnings settle before they can be
spent (docs/loyalty.md). Every change to available, pending or debt is a Movement carrying the
deltas, so a balance always equals the sum of its movements."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import MISSING, dataclass, field
from decimal import Decimal
from functools import lru_cache
from itertools import repeat
from operator import attrgetter, call, itemgetter
from typing import Any, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.envelope import Envelope
from schemas.events import (
    ContentShared, CustomerRegistered, DailySignIn, PointsAdjusted, PointsRedemptionRequested, ProfileUpdated,
    PurchaseCompleted, PurchaseRefunded, ReviewPosted,
)
from streams.loyalty.calendar import (
    DAY_MS, add_months, day_start, from_ms, local_day, month_start, period_start_after, to_ms,
)
from streams.loyalty.rules import RulesBook, RulesVersion

# Remembered request/refund/adjustment ids, so that a producer retry under a new event_id is still
# recognised. Bounded: ids older than this many are forgotten.
REMEMBERED_IDS = 256
# Orders are kept for refunds this long after the purchase.
ORDER_RETENTION_MS = 400 * DAY_MS


@dataclass(slots=True)
class Lot:
    lot_id: str
    points: int
    pending: bool
    available_ms: int          # when it became (or will become) available
    expires_ms: int | None     # set when it becomes available
    order_id: str | None = None


@dataclass(slots=True)
class Order:
    lot_id: str | None
    occurred_ms: int
    total_minor: int
    earned: int                # points the purchase earned, bonuses included
    qualifying: int            # tier-qualifying amount it contributed
    qualifying_day_ms: int
    refunded_minor: int = 0
    reversed_points: int = 0
    reversed_qualifying: int = 0


@dataclass(slots=True)
class Account:
    customer_key: str
    version: int = 0           # bumped with every balance output: the balance row's version
    seq: int = 0               # movements so far: the next movement's number
    clock_ms: int = 0          # event time this account has been brought up to
    available: int = 0
    pending: int = 0
    debt: int = 0
    earned: int = 0
    redeemed: int = 0
    expired: int = 0
    reversed: int = 0          # cancelled while pending plus clawed back
    adjusted: int = 0
    tier: str = ""
    tier_since_ms: int = 0
    tier_review_ms: int | None = None
    tier_after_review: str | None = None
    registered: bool = False
    purchased: bool = False
    birth_month: int | None = None
    birthday_awarded_year: int | None = None
    last_sign_in_day: str | None = None
    shares_day: str | None = None
    shares_rewarded: int = 0
    rules_version: str = ""
    last_balance: dict[str, Any] | None = None   # the last balance output, to compare and re-send
    lots: list[Lot] = field(default_factory=list)
    orders: dict[str, Order] = field(default_factory=dict)
    qualifying: list[list[int]] = field(default_factory=list)   # [[local day start ms, amount]]
    handled_ids: list[str] = field(default_factory=list)

    # Lots and orders are stored as lists in field order: the account is read and written on every
    # event, and this is several times faster than dataclasses.asdict and keyword construction.
    # Scalars at their default are left out, as in the profile: most accounts are mostly empty.
    # customer_key comes first and always: the stored bytes must not depend on how the dict was built.
    def to_dict(self) -> dict[str, Any]:
        data = {"customer_key": self.customer_key}
        for name, value, default in zip(_STORED_SCALARS, _stored_scalar_values(self), _STORED_DEFAULTS):
            if value != default:
                data[name] = value
        data["lots"] = [list(_lot_values(lot)) for lot in self.lots]
        data["orders"] = {order_id: list(_order_values(order)) for order_id, order in self.orders.items()}
        data["qualifying"] = [list(entry) for entry in self.qualifying]
        data["handled_ids"] = list(self.handled_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Account:
        account = _new_account([data[name] if name in data else default for name, default in _SCALAR_DEFAULTS])
        account.lots = [Lot(*values) for values in data["lots"]]
        account.orders = {order_id: Order(*values) for order_id, values in data["orders"].items()}
        account.qualifying = [list(entry) for entry in data["qualifying"]]
        account.handled_ids = list(data["handled_ids"])
        return account

    def copy(self) -> Account:
        """A working copy that shares nothing a fold changes in place: what
        `Account.from_dict(self.to_dict())` gives, without the round trip. (`last_balance` is
        shared, as that round trip shares it: folds replace it, never change it.)"""
        account = _new_account(list(_scalar_values(self)))
        account.lots = [Lot(*_lot_values(lot)) for lot in self.lots]
        account.orders = {order_id: Order(*_order_values(order)) for order_id, order in self.orders.items()}
        account.qualifying = [list(entry) for entry in self.qualifying]
        account.handled_ids = list(self.handled_ids)
        return account


_LOT_FIELDS = tuple(Lot.__dataclass_fields__)
_ORDER_FIELDS = tuple(Order.__dataclass_fields__)
_lot_values = attrgetter(*_LOT_FIELDS)
_order_values = attrgetter(*_ORDER_FIELDS)
_ACCOUNT_SCALARS = {name: spec.default for name, spec in Account.__dataclass_fields__.items()
                    if name not in ("lots", "orders", "qualifying", "handled_ids")}
_SCALAR_NAMES = tuple(_ACCOUNT_SCALARS)
assert _SCALAR_NAMES[0] == "customer_key"
assert tuple(Account.__dataclass_fields__)[len(_SCALAR_NAMES):] == ("lots", "orders", "qualifying", "handled_ids")
_SCALAR_DEFAULTS = tuple(_ACCOUNT_SCALARS.items())
_scalar_values = attrgetter(*_SCALAR_NAMES)
_STORED_SCALARS = _SCALAR_NAMES[1:]
_STORED_DEFAULTS = tuple(_ACCOUNT_SCALARS[name] for name in _STORED_SCALARS)
_stored_scalar_values = attrgetter(*_STORED_SCALARS)


def _new_account(scalars: list[Any]) -> Account:
    """An account with these scalars (in field order) and lists still to be set by the caller."""
    if scalars[0] is MISSING:
        raise TypeError("Account needs a customer_key")
    account = object.__new__(Account)
    deque(map(call, _SCALAR_SETTERS, repeat(account), scalars), maxlen=0)
    return account


_SCALAR_SETTERS = tuple(Account.__dict__[name].__set__ for name in _SCALAR_NAMES)  # the slots themselves


# --- outputs --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Movement:
    """One line of the ledger. Kinds: earned_pending, made_available, earned, redeemed, expired,
    cancelled (pending points of a refund inside the window), clawed_back, debt_settled, adjusted;
    and, with zero deltas, redemption_refused, adjustment_refused, refund_unmatched."""
    customer_key: str
    seq: int
    kind: str
    occurred_ms: int
    available_delta: int
    pending_delta: int
    debt_delta: int
    available_after: int
    pending_after: int
    debt_after: int
    cause_event_id: str
    cause_type: str
    rules_version: str
    lot_id: str = ""
    store_id: str = ""
    channel: str = ""
    reason: str = ""
    operator: str = ""
    reference: str = ""        # order, refund, reward or adjustment id the movement is about

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(_MOVEMENT_FIELDS, _movement_values(self)))


@dataclass(frozen=True, slots=True)
class TierChanged:
    customer_key: str
    version: int
    occurred_ms: int
    from_tier: str
    to_tier: str
    direction: str             # up | down
    qualifying: int
    cause: str                 # qualified | review
    rules_version: str

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(_TIER_CHANGED_FIELDS, _tier_changed_values(self)))


@dataclass(frozen=True, slots=True)
class Balance:
    customer_key: str
    version: int
    as_of_ms: int
    available: int
    pending: int
    debt: int
    earned: int
    redeemed: int
    expired: int
    reversed: int
    adjusted: int
    expiring_soon: int
    expiring_soon_days: int
    next_expiry_ms: int | None
    tier: str
    tier_since_ms: int
    qualifying: int
    tier_review_ms: int | None
    tier_after_review: str | None
    rules_version: str
    point_value: str
    point_value_currency: str

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(_BALANCE_FIELDS, _balance_values(self)))

    def same_figures(self, other: dict[str, Any] | None) -> bool:
        """Whether `other` (an earlier balance's dict) says the same, version and as-of aside."""
        return other is not None and all(getattr(self, name) == other[name] for name in _BALANCE_FIGURES)


_BALANCE_FIGURES = tuple(name for name in Balance.__dataclass_fields__ if name not in ("version", "as_of_ms"))
_MOVEMENT_FIELDS = tuple(Movement.__dataclass_fields__)
_movement_values = attrgetter(*_MOVEMENT_FIELDS)
_TIER_CHANGED_FIELDS = tuple(TierChanged.__dataclass_fields__)
_tier_changed_values = attrgetter(*_TIER_CHANGED_FIELDS)
_BALANCE_FIELDS = tuple(Balance.__dataclass_fields__)
_balance_figures = itemgetter(*_BALANCE_FIGURES)
_balance_values = attrgetter(*_BALANCE_FIELDS)
LoyaltyOutput = Union[Movement, TierChanged, Balance]


@dataclass(slots=True)
class _Cause:
    event_id: str
    type: str
    store_id: str = ""
    channel: str = ""


TIME = _Cause("", "time")


# --- the fold ---------------------------------------------------------------------------------------

def apply(account: Account | None, event: Envelope, book: RulesBook) -> tuple[Account, list[LoyaltyOutput]]:
    """The account after one accepted event of its member, and what changed."""
    fold = _Fold(account, event.customer_key, book)
    moment = max(to_ms(event.occurred_at), fold.account.clock_ms)
    fold.run_due(moment)
    fold.on_event(event, moment)
    fold.run_due(moment)  # a late event may create something already due (a lot past its window)
    return fold.finish()


def advance(account: Account, until_ms: int, book: RulesBook) -> tuple[Account, list[LoyaltyOutput]]:
    """The account once event time has reached `until_ms` with no event from the member."""
    if until_ms <= account.clock_ms:
        return account, []
    rules = book.at_ms(account.clock_ms)
    # A lot entering the reminder window changes no points, only the "expiring soon" figure.
    reminded = any(account.clock_ms < moment <= until_ms for moment in _reminders(account, rules))
    if not reminded and not any(moment <= until_ms for moment, _, _ in _actions(account, rules)):
        # Nothing due (run_due's first look, which reads nothing the working copy would change):
        # the usual tick for a member, answered without copying the account.
        return account, []
    fold = _Fold(account, account.customer_key, book)
    acted = fold.run_due(until_ms)
    fold.account.clock_ms = until_ms
    if not (acted or reminded):
        return account, []
    return fold.finish()


def forfeit(account: Account | None, event: Envelope, book: RulesBook) -> tuple[Account, list[LoyaltyOutput], int]:
    """The account after its member was erased (docs/privacy.md): first whatever time made due up to
    the request, then one `forfeited` movement (reason `erasure`) that writes off every available and
    pending point and any debt, so the liability drops and the balance still equals the sum of its
    movements. The lots, orders and birth month go; the counters stay, so a member who comes back
    continues the numbering of movements and balances. Returns the points written off as well."""
    fold = _Fold(account, event.customer_key, book)
    moment = max(to_ms(event.occurred_at), fold.account.clock_ms)
    fold.run_due(moment)
    current = fold.account
    current.clock_ms = moment
    points = current.available + current.pending
    if points or current.debt:
        cause = _Cause(str(event.event_id), event.type, event.source.store_id or "", event.source.channel.value)
        current.lots = []
        fold._move("forfeited", moment, cause, fold.rules(moment), available=-current.available,
                   pending=-current.pending, debt=-current.debt, reason="erasure")
    current.lots, current.orders, current.qualifying, current.handled_ids = [], {}, [], []
    current.birth_month = current.birthday_awarded_year = None
    current.tier_review_ms = current.tier_after_review = None
    account, outputs = fold.finish()
    return account, outputs, points


def new_life(account: Account) -> Account:
    """A fresh account for a member who comes back after an erasure: empty, but numbering its
    movements and balances on from the old one, whose rows stay keyed by (customer, seq/version)."""
    return Account(customer_key=account.customer_key, version=account.version, seq=account.seq)


def next_due_ms(account: Account, book: RulesBook) -> int | None:
    """The next event time at which time alone changes this account: a lot maturing, expiring or
    entering the reminder window, a tier review that demotes, a birthday month."""
    rules = book.at_ms(account.clock_ms)
    moments = [moment for moment, _, _ in _actions(account, rules)]
    moments += [moment for moment in _reminders(account, rules) if moment > account.clock_ms]
    return min(moments, default=None)


def _actions(account: Account, rules: RulesVersion) -> list[tuple[int, str, str]]:
    """What time will do to the account: (event time, action, lot id)."""
    actions = []
    for lot in account.lots:
        if lot.pending:
            actions.append((lot.available_ms, "mature", lot.lot_id))
        elif lot.expires_ms is not None:
            actions.append((lot.expires_ms, "expire", lot.lot_id))
    if account.tier_review_ms is not None:
        actions.append((account.tier_review_ms, "review", ""))
    birthday = _birthday_due(account, rules)
    if birthday is not None:
        actions.append((birthday, "birthday", ""))
    return actions


def _reminders(account: Account, rules: RulesVersion) -> list[int]:
    reminder_ms = rules.expiry.reminder_days * DAY_MS
    return [lot.expires_ms - reminder_ms for lot in account.lots if not lot.pending and lot.expires_ms is not None]


def _birthday_due(account: Account, rules: RulesVersion) -> int | None:
    """Start of the next birthday month not yet rewarded (now, if the member is in it)."""
    if account.birth_month is None or not rules.bonuses.birthday_month:
        return None
    local_year, local_month = _year_month(account.clock_ms, rules.zone)
    year = local_year + (1 if local_month > account.birth_month else 0)
    if account.birthday_awarded_year is not None and account.birthday_awarded_year >= year:
        year = account.birthday_awarded_year + 1
    return max(month_start(year, account.birth_month, rules.zone), account.clock_ms)


@lru_cache(maxsize=256)
def _year_month(millis: int, zone: ZoneInfo) -> tuple[int, int]:
    """The local year and month at `millis`: asked again for the same clock while one event or tick
    is folded (every look at what is due), so remembered for the last few."""
    local = from_ms(millis, zone)
    return local.year, local.month


class _Fold:
    """A working copy of one account while one event or one stretch of time is applied."""

    def __init__(self, account: Account | None, customer_key: str, book: RulesBook):
        self.account = account.copy() if account is not None else Account(customer_key=customer_key)
        self.book = book
        self.outputs: list[LoyaltyOutput] = []
        if not self.account.tier:
            first = book.versions[0].tiers.levels[0]
            self.account.tier = first.name

    def rules(self, moment: int) -> RulesVersion:
        return self.book.at_ms(moment)

    # --- time ---

    def run_due(self, until: int) -> bool:
        """Apply everything due at or before `until`, in event-time order. True if anything was."""
        touched = False
        while True:
            account = self.account
            due = [action for action in _actions(account, self.rules(account.clock_ms)) if action[0] <= until]
            if not due:
                return touched
            moment, action, lot_id = min(due)
            at = max(moment, account.clock_ms)
            account.clock_ms = at
            self._run_action(action, lot_id, at)
            touched = True

    def _run_action(self, action: str, lot_id: str, at: int) -> None:
        account = self.account
        rules = self.rules(at)
        lot = next((lot for lot in account.lots if lot.lot_id == lot_id), None)
        if action == "mature" and lot is not None:
            lot.pending = False
            lot.available_ms = at
            lot.expires_ms = _expiry(at, rules)
            self._move("made_available", at, TIME, rules, available=lot.points, pending=-lot.points,
                       lot_id=lot.lot_id, reference=lot.order_id or "")
            self._settle_debt(at, TIME, rules)
        elif action == "expire" and lot is not None:
            points, lot.points = lot.points, 0
            self._move("expired", at, TIME, rules, available=-points, lot_id=lot.lot_id)
        elif action == "review":
            self._review_tier(at, rules)
        elif action == "birthday":
            year = from_ms(at, rules.zone).year
            account.birthday_awarded_year = year
            self._earn_available("birthday_month", rules.bonuses.birthday_month, at, TIME, rules,
                                 lot_id=f"birthday:{year}")
        self._drop_empty_lots()

    # --- events ---

    def on_event(self, event: Envelope, at: int) -> None:
        account = self.account
        rules = self.rules(at)
        payload = getattr(event, "payload", None)
        cause = _Cause(str(event.event_id), event.type, event.source.store_id or "", event.source.channel.value)
        zone = _zone(event, rules)
        account.clock_ms = at
        if isinstance(payload, (CustomerRegistered, ProfileUpdated)) and payload.birth_month is not None:
            account.birth_month = payload.birth_month  # the birthday itself is sealed (docs/privacy.md)
        if isinstance(payload, CustomerRegistered) and not account.registered:
            account.registered = True
            self._earn_available("registration", rules.bonuses.registration, at, cause, rules, lot_id=cause.event_id)
        elif isinstance(payload, PurchaseCompleted):
            self._purchase(payload, event, at, cause, rules)
        elif isinstance(payload, PurchaseRefunded):
            self._refund(payload, at, cause, rules)
        elif isinstance(payload, PointsRedemptionRequested):
            self._redeem(payload, at, cause, rules)
        elif isinstance(payload, PointsAdjusted):
            self._adjust(payload, at, cause, rules)
        elif isinstance(payload, DailySignIn):
            day = local_day(to_ms(event.occurred_at), zone)
            if account.last_sign_in_day is None or day > account.last_sign_in_day:
                account.last_sign_in_day = day
                self._earn_available("daily_sign_in", rules.bonuses.daily_sign_in, at, cause, rules,
                                     lot_id=cause.event_id)
        elif isinstance(payload, ContentShared):
            day = local_day(to_ms(event.occurred_at), zone)
            if account.shares_day != day:
                account.shares_day, account.shares_rewarded = day, 0
            if account.shares_rewarded < rules.bonuses.shares_per_day:
                account.shares_rewarded += 1
                self._earn_available("share", rules.bonuses.share, at, cause, rules, lot_id=cause.event_id)
        elif isinstance(payload, ReviewPosted):
            if self._first_time(f"review:{payload.review_id}"):
                self._earn_available("review", rules.bonuses.review, at, cause, rules, lot_id=cause.event_id)

    def _purchase(self, purchase: PurchaseCompleted, event: Envelope, at: int, cause: _Cause,
                  rules: RulesVersion) -> None:
        account = self.account
        if purchase.order_id in account.orders:
            return  # the same order sent again under another event_id earns nothing more
        occurred = to_ms(event.occurred_at)
        tier = rules.tiers.levels[rules.tiers.index(account.tier)]
        points, qualifying_points, bonus = _purchase_points(purchase, event, occurred, rules, tier.multiplier)
        if not account.purchased:
            account.purchased = True
            bonus += rules.bonuses.first_purchase
        earned = points + bonus
        spend = _tier_spend(purchase, rules)
        qualifying = qualifying_points if rules.tiers.basis == "points" else spend
        day = day_start(occurred, rules.zone)
        lot_id = cause.event_id if earned else None
        account.orders[purchase.order_id] = Order(
            lot_id=lot_id, occurred_ms=occurred, total_minor=_minor(purchase.total), earned=earned,
            qualifying=qualifying, qualifying_day_ms=day,
        )
        if earned:
            account.lots.append(Lot(lot_id, earned, True, occurred + rules.pending_days * DAY_MS, None,
                                    purchase.order_id))
            self._move("earned_pending", at, cause, rules, pending=earned, lot_id=lot_id,
                       reference=purchase.order_id, store_id=purchase.store_id)
            account.earned += earned
        self._add_qualifying(day, qualifying)
        self._check_upgrade(at, rules)

    def _refund(self, refund: PurchaseRefunded, at: int, cause: _Cause, rules: RulesVersion) -> None:
        account = self.account
        if not self._first_time(f"refund:{refund.refund_id}"):
            return
        order = account.orders.get(refund.order_id)
        if order is not None and order.occurred_ms < at - ORDER_RETENTION_MS:
            order = None  # past retention, whether or not housekeeping has dropped it yet
        if order is None:
            self._move("refund_unmatched", at, cause, rules, reference=refund.order_id,
                       reason="no purchase with this order_id in the member's ledger")
            return
        order.refunded_minor = order.total_minor if refund.full else min(
            order.total_minor, order.refunded_minor + _minor(refund.amount))
        share = Decimal(order.refunded_minor) / order.total_minor if order.total_minor else Decimal(1)
        # Cumulative targets, floored: several partial refunds reverse exactly what one refund of
        # their sum would.
        points = math.floor(order.earned * share) - order.reversed_points
        qualifying = math.floor(order.qualifying * share) - order.reversed_qualifying
        order.reversed_points += points
        order.reversed_qualifying += qualifying
        self._add_qualifying(order.qualifying_day_ms, -qualifying)
        lot = next((lot for lot in account.lots if lot.lot_id == order.lot_id), None)
        if points > 0 and lot is not None and lot.pending:
            lot.points -= points
            self._move("cancelled", at, cause, rules, pending=-points, lot_id=lot.lot_id, reference=refund.order_id)
        elif points > 0:
            taken = self._take(points, first=lot)
            self._move("clawed_back", at, cause, rules, available=-taken, debt=points - taken,
                       lot_id=order.lot_id or "", reference=refund.order_id,
                       reason="" if taken == points else f"{points - taken} points owed: more than available")
        account.reversed += max(points, 0)
        self._drop_empty_lots()
        self._update_review(at, rules)

    def _redeem(self, request: PointsRedemptionRequested, at: int, cause: _Cause, rules: RulesVersion) -> None:
        if not self._first_time(f"redemption:{request.request_id}"):
            return
        refusal = _redemption_refusal(request, self.account.available, rules)
        if refusal:
            self._move("redemption_refused", at, cause, rules, reason=refusal, reference=request.reward_id)
            return
        self._take(request.points)
        self.account.redeemed += request.points
        self._drop_empty_lots()
        self._move("redeemed", at, cause, rules, available=-request.points, reference=request.reward_id)

    def _adjust(self, adjustment: PointsAdjusted, at: int, cause: _Cause, rules: RulesVersion) -> None:
        if not self._first_time(f"adjustment:{adjustment.adjustment_id}"):
            return
        details = {"reason": adjustment.reason, "operator": adjustment.operator,
                   "reference": adjustment.adjustment_id}
        if adjustment.points > 0:
            self.account.adjusted += adjustment.points
            self._earn_available("adjusted", adjustment.points, at, cause, rules, lot_id=cause.event_id, **details)
        elif -adjustment.points > self.account.available:
            self._move("adjustment_refused", at, cause, rules, operator=adjustment.operator,
                       reference=adjustment.adjustment_id,
                       reason=f"takes {-adjustment.points} points, {self.account.available} available")
        else:
            self._take(-adjustment.points)
            self.account.adjusted += adjustment.points
            self._drop_empty_lots()
            self._move("adjusted", at, cause, rules, available=adjustment.points, **details)

    # --- building blocks ---

    def _earn_available(self, kind: str, points: int, at: int, cause: _Cause, rules: RulesVersion,
                        lot_id: str, **details: str) -> None:
        if points <= 0:
            return
        self.account.lots.append(Lot(lot_id, points, False, at, _expiry(at, rules)))
        if kind != "adjusted":
            self.account.earned += points
        self._move(kind, at, cause, rules, available=points, lot_id=lot_id, **details)
        self._settle_debt(at, cause, rules)

    def _settle_debt(self, at: int, cause: _Cause, rules: RulesVersion) -> None:
        owed = min(self.account.debt, self.account.available)
        if owed > 0:
            self._take(owed)
            self._drop_empty_lots()
            self._move("debt_settled", at, cause, rules, available=-owed, debt=-owed)

    def _take(self, points: int, first: Lot | None = None) -> int:
        """Remove up to `points` from available lots, `first` then the soonest to expire."""
        remaining = points
        lots = sorted((lot for lot in self.account.lots if not lot.pending), key=_lot_order)
        if first is not None and not first.pending:
            lots.remove(first)
            lots.insert(0, first)
        for lot in lots:
            if remaining == 0:
                break
            taken = min(lot.points, remaining)
            lot.points -= taken
            remaining -= taken
        return points - remaining

    def _drop_empty_lots(self) -> None:
        self.account.lots = [lot for lot in self.account.lots if lot.points > 0]

    def _move(self, kind: str, at: int, cause: _Cause, rules: RulesVersion, *, available: int = 0,
              pending: int = 0, debt: int = 0, lot_id: str = "", reference: str = "", reason: str = "",
              operator: str = "", store_id: str | None = None) -> None:
        account = self.account
        account.available += available
        account.pending += pending
        account.debt += debt
        if kind == "expired":
            account.expired -= available
        assert account.available >= 0 and account.pending >= 0 and account.debt >= 0, (kind, account)
        self.outputs.append(Movement(
            customer_key=account.customer_key, seq=account.seq, kind=kind, occurred_ms=at,
            available_delta=available, pending_delta=pending, debt_delta=debt,
            available_after=account.available, pending_after=account.pending, debt_after=account.debt,
            cause_event_id=cause.event_id, cause_type=cause.type, rules_version=rules.version,
            lot_id=lot_id, store_id=store_id or cause.store_id, channel=cause.channel, reason=reason,
            operator=operator, reference=reference,
        ))
        account.seq += 1
        account.rules_version = rules.version

    def _first_time(self, request_id: str) -> bool:
        if request_id in self.account.handled_ids:
            return False
        self.account.handled_ids = [*self.account.handled_ids[-(REMEMBERED_IDS - 1):], request_id]
        return True

    # --- tiers ---

    def _add_qualifying(self, day: int, amount: int) -> None:
        if amount == 0:
            return
        for entry in self.account.qualifying:
            if entry[0] == day:
                entry[1] += amount
                return
        self.account.qualifying.append([day, amount])
        self.account.qualifying.sort()

    def _qualifying_at(self, at: int, rules: RulesVersion) -> int:
        return qualifying_at(self.account, at, rules)

    def _check_upgrade(self, at: int, rules: RulesVersion) -> None:
        tiers = rules.tiers
        current = tiers.index(self.account.tier)
        qualified = tiers.qualified(self._qualifying_at(at, rules))
        if qualified > current:
            self._change_tier(tiers.levels[qualified].name, at, rules, "qualified")
        self._update_review(at, rules)

    def _review_tier(self, at: int, rules: RulesVersion) -> None:
        tiers = rules.tiers
        qualified = tiers.qualified(self._qualifying_at(at, rules))
        if qualified < tiers.index(self.account.tier):
            self._change_tier(tiers.levels[qualified].name, at, rules, "review")
        self._update_review(at, rules)

    def _change_tier(self, tier: str, at: int, rules: RulesVersion, cause: str) -> None:
        account = self.account
        tiers = rules.tiers
        up = tiers.index(tier) > tiers.index(account.tier)
        self.outputs.append(TierChanged(
            customer_key=account.customer_key, version=account.version + 1, occurred_ms=at,
            from_tier=account.tier, to_tier=tier, direction="up" if up else "down",
            qualifying=self._qualifying_at(at, rules), cause=cause, rules_version=rules.version,
        ))
        account.tier, account.tier_since_ms = tier, at

    def _update_review(self, at: int, rules: RulesVersion) -> None:
        """The first coming review at which, with no further activity, the member drops a tier."""
        account = self.account
        tiers = rules.tiers
        account.tier_review_ms = account.tier_after_review = None
        current = tiers.index(account.tier)
        if current == 0:
            return
        review = at
        # With no new activity the qualifying amount reaches zero after one window, so a drop is
        # found within window/period + 1 reviews.
        for _ in range(tiers.window_months + 2):
            review = period_start_after(review, tiers.review, rules.zone)
            qualified = tiers.qualified(self._qualifying_at(review, rules))
            if qualified < current:
                account.tier_review_ms = review
                account.tier_after_review = tiers.levels[qualified].name
                return

    # --- the result ---

    def finish(self) -> tuple[Account, list[LoyaltyOutput]]:
        """The account and its outputs, with a balance when anything in it changed: most events
        (views, sessions) move only the account's clock, and a balance that says the same again
        would only load the balance topic and table."""
        account = self.account
        rules = self.rules(account.clock_ms)
        self._prune(rules)
        # The balance's figures as a dict first: compared with the last one and, only if they
        # differ, made into the output with its new version (one construction, not two).
        current = _balance_dict(account, rules, self._qualifying_at(account.clock_ms, rules))
        if self.outputs or not _same_figures(current, account.last_balance):
            account.version += 1
            current["version"] = account.version
            self.outputs.append(Balance(**current))
            account.last_balance = current
        return account, self.outputs

    def _prune(self, rules: RulesVersion) -> None:
        account = self.account
        horizon = add_months(account.clock_ms, -rules.tiers.window_months, rules.zone)
        account.qualifying = [entry for entry in account.qualifying if entry[0] > horizon]
        oldest_order = account.clock_ms - ORDER_RETENTION_MS
        account.orders = {order_id: order for order_id, order in account.orders.items()
                          if order.occurred_ms >= oldest_order}


def qualifying_at(account: Account, at: int, rules: RulesVersion) -> int:
    """The tier-qualifying amount over the rolling window that ends at `at`."""
    since = add_months(at, -rules.tiers.window_months, rules.zone)
    return max(0, sum(amount for day, amount in account.qualifying if since < day <= at))


def balance(account: Account, rules: RulesVersion, qualifying: int) -> Balance:
    return Balance(**_balance_dict(account, rules, qualifying))


def _balance_dict(account: Account, rules: RulesVersion, qualifying: int) -> dict[str, Any]:
    """`balance(...).to_dict()`: the same keys in the same (field) order, as it is stored."""
    reminder_until = account.clock_ms + rules.expiry.reminder_days * DAY_MS
    expiring_soon = 0
    next_expiry = None
    for lot in account.lots:
        expires = lot.expires_ms
        if lot.pending or expires is None:
            continue
        if expires <= reminder_until:
            expiring_soon += lot.points
        if next_expiry is None or expires < next_expiry:
            next_expiry = expires
    redemption = rules.redemption
    return {
        "customer_key": account.customer_key, "version": account.version, "as_of_ms": account.clock_ms,
        "available": account.available, "pending": account.pending, "debt": account.debt, "earned": account.earned,
        "redeemed": account.redeemed, "expired": account.expired, "reversed": account.reversed,
        "adjusted": account.adjusted, "expiring_soon": expiring_soon,
        "expiring_soon_days": rules.expiry.reminder_days, "next_expiry_ms": next_expiry,
        "tier": account.tier, "tier_since_ms": account.tier_since_ms, "qualifying": qualifying,
        "tier_review_ms": account.tier_review_ms, "tier_after_review": account.tier_after_review,
        "rules_version": rules.version, "point_value": str(redemption.point_value),
        "point_value_currency": redemption.point_value_currency,
    }


def _same_figures(current: dict[str, Any], other: dict[str, Any] | None) -> bool:
    """`Balance.same_figures` over a balance dict (its figures are ints, strings and None: equal
    tuples are equal figures)."""
    if other is None:
        return False
    try:
        return _balance_figures(current) == _balance_figures(other)
    except KeyError:
        # A balance stored before a figure existed: compared in order, as Balance.same_figures does.
        return all(current[name] == other[name] for name in _BALANCE_FIGURES)


# --- pure helpers -----------------------------------------------------------------------------------

def _lot_order(lot: Lot) -> tuple[int, int, str]:
    return (lot.expires_ms if lot.expires_ms is not None else 2**62, lot.available_ms, lot.lot_id)


def _expiry(available_ms: int, rules: RulesVersion) -> int:
    expiry = rules.expiry
    ends = add_months(available_ms, expiry.months, rules.zone)
    if expiry.policy == "end_of_period":
        return period_start_after(ends - 1, expiry.period, rules.zone)
    return ends


def _zone(event: Envelope, rules: RulesVersion) -> ZoneInfo:
    if event.source.timezone:
        try:
            return ZoneInfo(event.source.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass  # the catalog refuses unknown zones; states written before that fall back here
    return rules.zone


def _minor(amount: Decimal) -> int:
    return int(amount * 100)


def _purchase_points(purchase: PurchaseCompleted, event: Envelope, occurred: int, rules: RulesVersion,
                     tier_multiplier: Decimal) -> tuple[int, int, int]:
    """(points with campaign and tier multipliers, tier-qualifying base points, fixed campaign bonus)."""
    rate = rules.earning.points_per_unit.get(purchase.currency)
    if rate is None or purchase.subtotal == 0:
        return 0, 0, 0
    moment = from_ms(occurred)
    store = purchase.store_id or event.source.store_id
    campaigns = [c for c in rules.campaigns if c.runs_at(moment) and c.covers(store, event.source.channel.value)]
    after_discount = purchase.total / purchase.subtotal
    base_total = Decimal(0)
    boosted_total = Decimal(0)
    for line in purchase.lines:
        base = (line.unit_price * line.quantity * after_discount * rate
                * rules.earning.category_multipliers.get(line.category, Decimal(1))
                * rules.earning.sku_multipliers.get(line.sku, Decimal(1)))
        boost = Decimal(1)
        for campaign in campaigns:
            if campaign.multiplier is not None and campaign.covers_category(line.category):
                boost *= campaign.multiplier
        base_total += base
        boosted_total += base * boost
    bonus = sum(c.bonus_points or 0 for c in campaigns
                if c.bonus_points and any(c.covers_category(line.category) for line in purchase.lines))
    return math.floor(boosted_total * tier_multiplier), math.floor(base_total), bonus


def _tier_spend(purchase: PurchaseCompleted, rules: RulesVersion) -> int:
    tiers = rules.tiers
    if purchase.currency == tiers.spend_currency:
        return _minor(purchase.total)
    rate = tiers.spend_rates.get(purchase.currency)
    return math.floor(purchase.total * rate * 100) if rate else 0


def _redemption_refusal(request: PointsRedemptionRequested, available: int, rules: RulesVersion) -> str:
    redemption = rules.redemption
    reward = redemption.rewards.get(request.reward_id)
    if reward is None:
        return f"unknown reward {request.reward_id!r}"
    if reward.points is not None and request.points != reward.points:
        return f"{request.reward_id} costs {reward.points} points, the request offers {request.points}"
    if reward.points is None:
        if request.points < redemption.minimum:
            return f"below the minimum redemption of {redemption.minimum} points"
        if request.points % redemption.step:
            return f"points must be a multiple of {redemption.step}"
    if request.points > available:
        return f"insufficient points: {request.points} requested, {available} available"
    return ""
