"""Loyalty rules: how points are earned, redeemed, matured and expired, and how tiers are reached.

Versioned by event time (streams/versioned_rules.py): the ledger records the version's name on
every movement, so a replay after a rules change still reproduces history."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AwareDatetime, Field, field_validator, model_validator

from streams.versioned_rules import Rules, RulesVersionBase, VersionedRules, load_toml

PositiveDecimal = Annotated[Decimal, Field(gt=0)]
Points = Annotated[int, Field(ge=0)]


class Campaign(Rules):
    campaign_id: str
    starts_at: AwareDatetime
    ends_at: AwareDatetime
    # Either multiplies the points of eligible lines, or adds a fixed bonus to an eligible purchase.
    multiplier: PositiveDecimal | None = None
    bonus_points: Points | None = None
    # Empty means "any".
    stores: frozenset[str] = frozenset()
    channels: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()

    @model_validator(mode="after")
    def _one_effect(self) -> Campaign:
        if (self.multiplier is None) == (self.bonus_points is None):
            raise ValueError("a campaign has either a multiplier or bonus_points")
        if self.ends_at <= self.starts_at:
            raise ValueError("a campaign must end after it starts")
        return self

    def runs_at(self, moment: datetime) -> bool:
        return self.starts_at <= moment < self.ends_at

    def covers(self, store_id: str | None, channel: str) -> bool:
        return (not self.stores or store_id in self.stores) and (not self.channels or channel in self.channels)

    def covers_category(self, category: str) -> bool:
        return not self.categories or category in self.categories


class Earning(Rules):
    # Points per whole currency unit spent (after discount), per ISO currency. A currency not
    # listed earns nothing.
    points_per_unit: dict[str, Annotated[Decimal, Field(ge=0)]]
    category_multipliers: dict[str, PositiveDecimal] = {}
    sku_multipliers: dict[str, PositiveDecimal] = {}


class Bonuses(Rules):
    registration: Points = 0
    first_purchase: Points = 0
    daily_sign_in: Points = 0
    share: Points = 0
    shares_per_day: Points = 0
    review: Points = 0
    birthday_month: Points = 0


class Reward(Rules):
    # None: the member chooses how many points to spend (within minimum and step).
    points: Annotated[int, Field(gt=0)] | None = None


class Redemption(Rules):
    minimum: Points = 0
    step: Annotated[int, Field(gt=0)] = 1
    rewards: dict[str, Reward] = {}
    # What one point is worth to the business, for liability figures.
    point_value: Annotated[Decimal, Field(ge=0)] = Decimal("0.01")
    point_value_currency: str = "EUR"


class Expiry(Rules):
    policy: Literal["rolling", "end_of_period"] = "rolling"
    months: Annotated[int, Field(gt=0)] = 12
    # end_of_period: points expire at the end of the calendar period in which `months` ends.
    period: Literal["month", "quarter", "year"] = "year"
    reminder_days: Annotated[int, Field(ge=0)] = 30


class Tier(Rules):
    name: str
    threshold: Points
    multiplier: PositiveDecimal = Decimal("1")


class Tiers(Rules):
    basis: Literal["points", "spend"] = "points"
    # spend basis: spend counted in `spend_currency`, other currencies converted with `spend_rates`.
    spend_currency: str = "EUR"
    spend_rates: dict[str, PositiveDecimal] = {}
    window_months: Annotated[int, Field(gt=0)] = 12
    review: Literal["monthly", "quarterly", "yearly"] = "quarterly"
    levels: Annotated[list[Tier], Field(min_length=1)]

    @field_validator("levels")
    @classmethod
    def _ascending(cls, levels: list[Tier]) -> list[Tier]:
        if levels[0].threshold != 0:
            raise ValueError("the first tier is the entry tier and needs threshold 0")
        thresholds = [tier.threshold for tier in levels]
        if thresholds != sorted(set(thresholds)):
            raise ValueError("tier thresholds must be strictly ascending")
        if len({tier.name for tier in levels}) != len(levels):
            raise ValueError("tier names must be unique")
        return levels

    def index(self, name: str) -> int:
        for position, tier in enumerate(self.levels):
            if tier.name == name:
                return position
        return 0  # a tier renamed away in a later version: treat as entry tier

    def qualified(self, amount: int) -> int:
        return max(i for i, tier in enumerate(self.levels) if tier.threshold <= amount)


class RulesVersion(RulesVersionBase):
    # Calendar days (sign-in once per day, birthday month, reviews, end-of-period expiry) are taken
    # in the event source's timezone when it has one, otherwise in this one.
    timezone: str = "UTC"
    pending_days: Annotated[int, Field(ge=0)] = 14
    earning: Earning
    bonuses: Bonuses = Bonuses()
    campaigns: list[Campaign] = []
    redemption: Redemption = Redemption()
    expiry: Expiry = Expiry()
    tiers: Tiers

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {name!r}") from None
        return name

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class RulesBook(VersionedRules[RulesVersion]):
    """Every loyalty rules version, oldest first."""


def load_rules(path: Path) -> RulesBook:
    """The rules book in `path`; raises ValueError naming the file and every invalid field."""
    return load_toml(RulesBook, path, "loyalty rules")
