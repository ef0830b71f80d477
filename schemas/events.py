"""One payload model per event type, and the registry that maps (type, schema_version) to a model.

Versioning rule (also in docs/events.md): adding an optional field is an additive change and keeps
the schema_version; removing, renaming or changing the meaning or type of a field is a new
schema_version with its own model registered beside the old one, which stays readable forever
because the log keeps every event."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, create_model, field_validator, model_validator

from schemas.envelope import NAME_LENGTH, AliasType, Envelope, Model, NonEmpty, Personal, Sealed, is_personal

# Limits that keep every figure the folds sum from one customer's events far inside the projections'
# columns (Decimal(18, 2) for money, Int64 for points): ten million events of a customer at the
# limit before a sum could overflow.
MAX_AMOUNT = Decimal("999999999.99")
MAX_POINTS = 1_000_000_000

Money = Annotated[Decimal, Field(ge=0, le=MAX_AMOUNT, max_digits=18, decimal_places=2)]
PositiveMoney = Annotated[Decimal, Field(gt=0, le=MAX_AMOUNT, max_digits=18, decimal_places=2)]
Points = Annotated[int, Field(ge=-MAX_POINTS, le=MAX_POINTS)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, upper case")]


class Address(Model):
    line1: str | None = Field(default=None, max_length=NAME_LENGTH)
    line2: str | None = Field(default=None, max_length=NAME_LENGTH)
    city: str | None = Field(default=None, max_length=NAME_LENGTH)
    postal_code: str | None = Field(default=None, max_length=32)
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None


class PersonalDetails(Model):
    """As submitted to the platform. In the log each personal field is sealed (see `event_model`)."""
    name: str | None = Personal(max_length=200)
    email: str | None = Personal(max_length=320)
    phone: str | None = Personal(max_length=40)
    birthday: date | None = Personal()
    address: Address | None = Personal()
    # The month of the birthday, which the loyalty rules reward; set by the edge that seals the
    # birthday (privacy/fields.py), since the folds never see the sealed date. Not identifying alone.
    birth_month: Annotated[int, Field(ge=1, le=12)] | None = None


# --- identity and consent -------------------------------------------------------------------------

class CustomerRegistered(PersonalDetails):
    preferred_store_id: str | None = None
    locale: str | None = None


class ProfileUpdated(PersonalDetails):
    preferred_store_id: str | None = None
    locale: str | None = None


class IdentityLinked(Model):
    alias_type: AliasType
    alias_value: NonEmpty


class ConsentChannel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"
    PHONE = "phone"
    POST = "post"


class ConsentChanged(Model):
    channel: ConsentChannel
    granted: bool
    purpose: NonEmpty = "marketing"


class CustomerErasureRequested(Model):
    request_id: NonEmpty
    requested_by: NonEmpty


# --- commerce -------------------------------------------------------------------------------------

class LineItem(Model):
    sku: NonEmpty
    category: NonEmpty
    quantity: Annotated[int, Field(gt=0, le=100_000)]
    unit_price: Money


class PurchaseCompleted(Model):
    order_id: NonEmpty
    currency: Currency
    lines: Annotated[list[LineItem], Field(min_length=1, max_length=1000)]
    discount: Money = Decimal("0")
    store_id: str | None = Field(default=None, max_length=NAME_LENGTH)
    payment_method: str | None = None

    @model_validator(mode="after")
    def _sums_within_limits(self) -> PurchaseCompleted:
        subtotal = self.subtotal
        if subtotal > MAX_AMOUNT:
            raise ValueError(f"the lines sum to {subtotal}, more than the limit of {MAX_AMOUNT}")
        if self.discount > subtotal:
            raise ValueError("discount exceeds the sum of the lines")
        return self

    @property
    def subtotal(self) -> Decimal:
        return sum((line.unit_price * line.quantity for line in self.lines), Decimal("0"))

    @property
    def total(self) -> Decimal:
        return self.subtotal - self.discount


class PurchaseRefunded(Model):
    refund_id: NonEmpty
    order_id: NonEmpty = Field(description="order_id of the purchase_completed event refunded")
    currency: Currency
    amount: PositiveMoney
    full: bool = False
    lines: list[LineItem] = []
    reason: str | None = None


class CouponIssued(Model):
    coupon_id: NonEmpty
    campaign_id: str | None = None
    kind: Literal["percent", "amount", "free_item"] = "amount"
    value: Money
    expires_at: AwareDatetime | None = None


class CouponRedeemed(Model):
    coupon_id: NonEmpty
    order_id: str | None = None


class PointsRedemptionRequested(Model):
    request_id: NonEmpty
    reward_id: NonEmpty
    points: Annotated[int, Field(gt=0, le=MAX_POINTS)]


class PointsAdjusted(Model):
    adjustment_id: NonEmpty
    points: Points
    reason: NonEmpty
    operator: NonEmpty

    @field_validator("points")
    @classmethod
    def _non_zero(cls, points: int) -> int:
        if points == 0:
            raise ValueError("an adjustment of zero points is not an adjustment")
        return points


# --- engagement -----------------------------------------------------------------------------------

class ProductViewed(Model):
    sku: NonEmpty
    category: str | None = None
    price: Money | None = None


class PageViewed(Model):
    path: NonEmpty
    referrer: str | None = None


class SearchPerformed(Model):
    query: Annotated[str, Field(max_length=500)]
    results_count: Annotated[int, Field(ge=0)] | None = None


class AppSessionStarted(Model):
    session_id: NonEmpty
    app_version: str | None = None
    platform: Literal["ios", "android", "web", "other"] | None = None


class DailySignIn(Model):
    pass


class ContentShared(Model):
    content_type: NonEmpty
    content_id: NonEmpty
    network: str | None = None


class ReviewPosted(Model):
    review_id: NonEmpty
    sku: str | None = None
    rating: Annotated[int, Field(ge=1, le=5)]
    text: Annotated[str, Field(max_length=5000)] | None = None


# --- service and feedback -------------------------------------------------------------------------

class ComplaintFiled(Model):
    complaint_id: NonEmpty
    category: NonEmpty
    severity: Literal["low", "medium", "high"] = "medium"
    description: Annotated[str, Field(max_length=5000)] | None = None


class ComplaintResolved(Model):
    complaint_id: NonEmpty
    resolution: str | None = None
    customer_satisfied: bool | None = None


class SurveyAnswered(Model):
    survey_id: NonEmpty
    kind: Literal["nps", "csat"]
    score: int
    comment: Annotated[str, Field(max_length=5000)] | None = None

    @model_validator(mode="after")
    def _score_in_scale(self) -> SurveyAnswered:
        low, high = (0, 10) if self.kind == "nps" else (1, 5)
        if not low <= self.score <= high:
            raise ValueError(f"{self.kind} score must be between {low} and {high}")
        return self


# --- the registry ---------------------------------------------------------------------------------

PAYLOADS: dict[str, type[Model]] = {
    "customer_registered": CustomerRegistered,
    "profile_updated": ProfileUpdated,
    "identity_linked": IdentityLinked,
    "consent_changed": ConsentChanged,
    "customer_erasure_requested": CustomerErasureRequested,
    "purchase_completed": PurchaseCompleted,
    "purchase_refunded": PurchaseRefunded,
    "coupon_issued": CouponIssued,
    "coupon_redeemed": CouponRedeemed,
    "points_redemption_requested": PointsRedemptionRequested,
    "points_adjusted": PointsAdjusted,
    "product_viewed": ProductViewed,
    "page_viewed": PageViewed,
    "search_performed": SearchPerformed,
    "app_session_started": AppSessionStarted,
    "daily_sign_in": DailySignIn,
    "content_shared": ContentShared,
    "review_posted": ReviewPosted,
    "complaint_filed": ComplaintFiled,
    "complaint_resolved": ComplaintResolved,
    "survey_answered": SurveyAnswered,
}
EVENT_TYPES = frozenset(PAYLOADS)


def _event_class(type_name: str, payload: type[Model]) -> type[Envelope]:
    """An envelope subclass whose `type` is fixed and whose payload is the type's model.
    A payload with no required fields (daily_sign_in) may be left out."""
    required = any(field.is_required() for field in payload.model_fields.values())
    return create_model(
        payload.__name__ + "Event",
        __base__=Envelope,
        type=(Literal[type_name], ...),  # type: ignore[valid-type]
        payload=(payload, ... if required else payload()),
    )


def money_amount(payload: Model | None) -> tuple[Decimal, str] | None:
    """The amount of money an event moves and its currency: a purchase's total after discount or a
    refund's amount. None for events that move no money."""
    if isinstance(payload, PurchaseCompleted):
        return payload.total, payload.currency
    if isinstance(payload, PurchaseRefunded):
        return payload.amount, payload.currency
    return None


def _sealed(payload: type[Model]) -> type[Model]:
    """The payload as it lies in the log: every field marked personal holds a sealed token instead
    of the plain value. A subclass, so that the folds' isinstance checks hold for both forms."""
    personal = {name: (Sealed | None, Personal()) for name, field in payload.model_fields.items() if is_personal(field)}
    if not personal:
        return payload
    return create_model(payload.__name__, __base__=payload, __module__=payload.__module__, **personal)  # type: ignore[call-overload]


# (type, schema_version) -> event model, as submitted by producers (the ingestion API, the intake
# topic, imports: plain personal values) and as it lies in the log (personal values sealed).
# Version 1 is the only one so far.
_SUBMITTED: dict[tuple[str, int], type[Envelope]] = {
    (name, 1): _event_class(name, payload) for name, payload in PAYLOADS.items()
}
_MODELS: dict[tuple[str, int], type[Envelope]] = {
    (name, 1): _event_class(name, _sealed(payload)) for name, payload in PAYLOADS.items()
}

# Every event is an Envelope subclass with a typed `payload`.
Event = Envelope


def event_model(type_name: str, schema_version: int = 1) -> type[Envelope] | None:
    """The model of an event as it lies in `crm.events`: personal fields sealed."""
    return _MODELS.get((type_name, schema_version))


def submitted_model(type_name: str, schema_version: int = 1) -> type[Envelope] | None:
    """The model of an event as a producer submits it to an edge that seals it: personal fields plain."""
    return _SUBMITTED.get((type_name, schema_version))


_PERSONAL_FIELDS: dict[str, tuple[str, ...]] = {
    type_name: tuple(name for name, field in payload.model_fields.items() if is_personal(field))
    for type_name, payload in PAYLOADS.items()
}


def personal_payload_fields(type_name: str) -> tuple[str, ...]:
    """The payload fields of a type that are personal (sealed in the log); empty for most types.
    Looked up, not derived: every edge asks it for every event."""
    return _PERSONAL_FIELDS.get(type_name, ())


def registered_versions() -> list[tuple[str, int]]:
    return sorted(_MODELS)
