"""Segment rules: the thresholds behind each segment, versioned by event time like the loyalty
rules (streams/loyalty/rules.py), validated at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from streams.versioned_rules import Rules, RulesVersionBase, VersionedRules, load_toml

Days = Annotated[int, Field(gt=0)]
Share = Annotated[float, Field(gt=0, lt=1)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]

# The figures a tag rule may test (streams/segments/scoring.py computes them; docs/segments.md).
TAG_FIELDS = frozenset({
    "purchase_count", "refund_count", "refund_rate", "spend_365d", "session_count", "sign_in_count",
    "sessions_30d", "sign_ins_30d", "complaint_count", "complaints_30d", "open_complaints", "nps_latest",
    "csat_latest", "points_available", "weekend_purchase_share", "app_share", "days_since_last_purchase",
    "days_since_last_seen",
})


class Lifecycle(Rules):
    new_days: Days = 30
    active_days: Days = 90
    lost_days: Days = 180

    @model_validator(mode="after")
    def _lost_after_active(self) -> Lifecycle:
        if self.lost_days <= self.active_days:
            raise ValueError("lost_days must be longer than active_days")
        return self


class ValueTiers(Rules):
    """High: the top `high_share` of the customers who spent in the last 365 days (net, in
    `currency`); mid: the next `mid_share`; low: everyone else."""
    high_share: Share = 0.2
    mid_share: Share = 0.3

    @model_validator(mode="after")
    def _shares_fit(self) -> ValueTiers:
        if self.high_share + self.mid_share >= 1:
            raise ValueError("high_share + mid_share must be below 1")
        return self


class Rfm(Rules):
    """Named segments by cell "RF": R is the recency score, F the rounded mean of the frequency and
    monetary scores (each 1-5). Every one of the 25 cells must belong to exactly one segment."""
    segments: dict[str, list[str]] = Field(default_factory=lambda: {
        "Champions": ["44", "45", "54", "55"],
        "Loyal": ["34", "35", "43"],
        "Potential Loyalist": ["42", "52", "53"],
        "New": ["51"],
        "Promising": ["31", "41"],
        "Need Attention": ["32", "33"],
        "About to Sleep": ["21", "22"],
        "At Risk": ["13", "23", "24"],
        "Cannot Lose Them": ["14", "15", "25"],
        "Hibernating": ["12"],
        "Lost": ["11"],
    })

    @field_validator("segments")
    @classmethod
    def _every_cell_once(cls, segments: dict[str, list[str]]) -> dict[str, list[str]]:
        cells = [cell for members in segments.values() for cell in members]
        expected = {f"{r}{fm}" for r in range(1, 6) for fm in range(1, 6)}
        if sorted(cells) != sorted(expected):
            missing = sorted(expected - set(cells))
            repeated = sorted({c for c in cells if cells.count(c) > 1})
            unknown = sorted(set(cells) - expected)
            raise ValueError(f"every cell 11..55 must be in exactly one segment (missing {missing}, "
                             f"repeated {repeated}, unknown {unknown})")
        return segments

    def segment_of(self, recency: int, frequency_monetary: int) -> str:
        cell = f"{recency}{frequency_monetary}"
        return next(name for name, members in self.segments.items() if cell in members)


class Bounds(Rules):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> Bounds:
        if self.min is None and self.max is None:
            raise ValueError("a condition needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is above max")
        return self

    def holds(self, value: float | None) -> bool:
        return value is not None and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


TagName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,49}$")]


class SegmentRulesVersion(RulesVersionBase):
    # Money figures (value tier, RFM monetary, spend_365d in tags) count spend in this currency only.
    currency: Currency = "EUR"
    # Weekdays for tags (weekend_purchase_share) are counted in this zone.
    timezone: str = "UTC"
    lifecycle: Lifecycle = Lifecycle()
    value: ValueTiers = ValueTiers()
    rfm: Rfm = Rfm()
    # tag name -> {figure: {min, max}}: the customer has the tag while every condition holds.
    tags: dict[TagName, dict[str, Bounds]] = Field(default_factory=dict)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {zone!r}") from exc
        return zone

    @field_validator("tags")
    @classmethod
    def _known_figures(cls, tags: dict[str, dict[str, Bounds]]) -> dict[str, dict[str, Bounds]]:
        for name, conditions in tags.items():
            if not conditions:
                raise ValueError(f"tag {name!r} has no condition")
            unknown = sorted(set(conditions) - TAG_FIELDS)
            if unknown:
                raise ValueError(f"tag {name!r} tests unknown figures {unknown}; known: {sorted(TAG_FIELDS)}")
        return tags


class SegmentRules(VersionedRules[SegmentRulesVersion]):
    """Every segment rules version, oldest first."""


def load_segment_rules(path: Path) -> SegmentRules:
    """The segment rules in `path`; raises ValueError naming the file and every invalid field."""
    return load_toml(SegmentRules, path, "segment rules")
