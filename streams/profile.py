"""The customer profile: a pure fold over one customer's accepted events.

Every figure is order-insensitive where it can be (first/last seen are min/max of event time) so
that a late event lands where it belongs, and the fold never reads a clock: time is the events'."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from schemas.envelope import Envelope
from schemas.events import PurchaseCompleted, PurchaseRefunded


def to_millis(moment: Any) -> int:
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class CustomerProfile:
    customer_key: str
    customer_id: str | None = None
    # Changes folded into this profile (events, and segment changes that time caused): the row version.
    version: int = 0
    # Offset (in the customer's events partition) of the last event applied: redelivery guard.
    last_offset: int = -1
    first_seen_ms: int | None = None
    last_seen_ms: int | None = None
    purchase_count: int = 0
    refund_count: int = 0
    # Net spend (purchases minus refunds) per currency, in minor units so sums stay exact.
    spend_minor: dict[str, int] = field(default_factory=dict)
    last_purchase_ms: int | None = None
    channels: tuple[str, ...] = ()
    stores: tuple[str, ...] = ()
    # Segments (streams/segments): the event time the customer has been brought up to, the current
    # lifecycle stage and since when, and how many segment changes there have been.
    clock_ms: int = 0
    lifecycle_stage: str = ""
    lifecycle_since_ms: int | None = None
    segment_seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CustomerProfile:
        return cls(**{**data, "channels": tuple(data["channels"]), "stores": tuple(data["stores"])})


def to_minor(amount: Any) -> int:
    # Catalog money has at most two decimals, so this is exact.
    return int(amount * 100)


def _with(values: tuple[str, ...], value: str | None) -> tuple[str, ...]:
    if value is None or value in values:
        return values
    return tuple(sorted((*values, value)))


def fold_profile(profile: CustomerProfile | None, event: Envelope, offset: int) -> CustomerProfile:
    """The profile after `event`, read from position `offset` of its partition."""
    if profile is None:
        profile = CustomerProfile(customer_key=event.customer_key)
    occurred = to_millis(event.occurred_at)
    payload = getattr(event, "payload", None)
    changes: dict[str, Any] = {
        "version": profile.version + 1,
        "last_offset": offset,
        "customer_id": profile.customer_id or event.customer_id,
        "first_seen_ms": occurred if profile.first_seen_ms is None else min(profile.first_seen_ms, occurred),
        "last_seen_ms": occurred if profile.last_seen_ms is None else max(profile.last_seen_ms, occurred),
        "channels": _with(profile.channels, event.source.channel.value),
        "stores": _with(profile.stores, event.source.store_id),
    }
    if isinstance(payload, PurchaseCompleted):
        changes["purchase_count"] = profile.purchase_count + 1
        changes["spend_minor"] = _add(profile.spend_minor, payload.currency, to_minor(payload.total))
        changes["last_purchase_ms"] = max(profile.last_purchase_ms or occurred, occurred)
        changes["stores"] = _with(changes["stores"], payload.store_id)
    elif isinstance(payload, PurchaseRefunded):
        changes["refund_count"] = profile.refund_count + 1
        changes["spend_minor"] = _add(profile.spend_minor, payload.currency, -to_minor(payload.amount))
    return replace(profile, **changes)


def _add(totals: dict[str, int], currency: str, amount: int) -> dict[str, int]:
    return {**totals, currency: totals.get(currency, 0) + amount}
