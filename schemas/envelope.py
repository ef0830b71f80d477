"""The envelope shared by every event: identity of the event, of the customer, of the source, and time."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

from zoneinfo import available_timezones

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

# Personal data is marked in the JSON Schema (`x-personal: true`) so that encryption and erasure
# can find every such field from the models alone instead of from a hand-kept list.
PERSONAL = {"x-personal": True}
_ZONES = frozenset(available_timezones()) | {"UTC"}
# The longest id or name the catalog takes (customer ids, aliases, stores, orders, skus, ...).
NAME_LENGTH = 200


def Personal(**kwargs: Any) -> Any:  # noqa: N802 - reads as a field type marker at the use site
    return Field(default=None, json_schema_extra=PERSONAL, **kwargs)


# How a personal value lies in the log: `pii1.<key id>.<AES-GCM-SIV nonce and ciphertext>`, sealed
# under the customer's data key (privacy/seal.py). The plain value exists only at the edge that seals
# it and in the hands of a reader who holds the key.
SEALED_PREFIX = "pii1."
SEALED_PATTERN = r"^pii1\.[0-9a-f]{32}\.[A-Za-z0-9_-]{38,}$"
Sealed = Annotated[str, Field(pattern=SEALED_PATTERN, max_length=4096)]


class Model(BaseModel):
    """Base for every catalog model: immutable, and strict about unknown fields so typos surface."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class Channel(StrEnum):
    POS = "pos"
    APP = "app"
    WEB = "web"
    SERVICE = "service"
    SYSTEM = "system"


class Source(Model):
    channel: Channel
    # Names, kept in profiles (stores) and grouped by in ClickHouse (LowCardinality): no longer than
    # any other name of the catalog.
    store_id: str | None = Field(default=None, max_length=NAME_LENGTH)
    terminal_id: str | None = Field(default=None, max_length=NAME_LENGTH)
    device_id: str | None = Field(default=None, max_length=NAME_LENGTH)
    # IANA zone of the store or app; rules such as "once per calendar day" use it.
    timezone: str | None = Field(default=None, max_length=64)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str | None) -> str | None:
        # Checked here, so that no fold meets a zone it cannot load (it would stop the worker).
        if zone is not None and zone not in _ZONES:
            raise ValueError(f"unknown IANA timezone {zone[:64]!r}")
        return zone


class AliasType(StrEnum):
    LOYALTY_CARD = "loyalty_card"
    APP_USER_ID = "app_user_id"
    PHONE_HASH = "phone_hash"
    EMAIL_HASH = "email_hash"
    DEVICE_ID = "device_id"


NonEmpty = Annotated[str, Field(min_length=1, max_length=NAME_LENGTH)]

# `alias_type:value`: the customer key of an event that names its customer only by an alias.
AliasKey = Annotated[str, Field(min_length=1, max_length=max(len(alias.value) for alias in AliasType) + 1 + NAME_LENGTH)]

# Event times the projections can store, with room to spare: ClickHouse's DateTime64 holds
# 1900-01-01 to 2299-12-31, and the folds date what an event sets going (points expiring, tier
# reviews, segment and churn deadlines) months or years after it. The worker refuses a record
# with an `occurred_at` or `received_at` outside (schemas/codec.py), instead of stopping the
# projection writer at the row; the ingestion API's clock rules are narrower still.
EARLIEST_EVENT_TIME = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_EVENT_TIME = datetime(2199, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)


class Identifiers(Model):
    """Aliases a producer may know instead of (or besides) the platform's customer_id.
    Phone and e-mail are only ever carried hashed."""

    loyalty_card: NonEmpty | None = None
    app_user_id: NonEmpty | None = None
    phone_hash: NonEmpty | None = None
    email_hash: NonEmpty | None = None
    device_id: NonEmpty | None = None

    def first_alias(self) -> tuple[AliasType, str] | None:
        """The alias that names the customer when no customer_id is given, by fixed precedence."""
        for alias in AliasType:
            value = getattr(self, alias.value)
            if value:
                return alias, value
        return None


class Envelope(Model):
    event_id: UUID
    type: str
    schema_version: int = Field(default=1, ge=1)
    customer_id: NonEmpty | None = None
    identifiers: Identifiers = Identifiers()
    occurred_at: AwareDatetime
    # Set by the ingestion edge; when a producer wrote straight to Kafka, the worker fills it
    # from the Kafka record timestamp so that it is still a value taken from the log.
    received_at: AwareDatetime | None = None
    source: Source

    @model_validator(mode="after")
    def _names_a_customer(self) -> Envelope:
        if not self.customer_id and self.identifiers.first_alias() is None:
            raise ValueError("an event needs customer_id or at least one identifier")
        return self

    @property
    def customer_key(self) -> str:
        """The Kafka message key and the key of per-customer state: customer_id when known,
        otherwise `alias_type:value` of the first alias."""
        if self.customer_id:
            return self.customer_id
        alias, value = self.identifiers.first_alias()  # type: ignore[misc]
        return f"{alias.value}:{value}"


def is_personal(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("x-personal"))


def personal_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every field marked personal in `model` and the models nested in it."""
    found: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if is_personal(field):
            found.append(path)
        for nested in _model_types(field.annotation):
            found.extend(personal_fields(nested, prefix=f"{path}."))
    return found


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _model_types(arg)]
