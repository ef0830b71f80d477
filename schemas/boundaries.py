"""Segment boundaries: the population figures that value tiers and RFM scores are cut by.

A customer's value tier and RFM scores compare the customer with everyone else, which no per-customer
fold can see. So the projection writer, which holds the whole population in ClickHouse, computes the
boundaries periodically (projections/boundaries.py) and appends them, like a clock tick, to every
partition of the events topic; from then on they are data. The worker applies them to each customer
of the partition, and a replay meets the same boundaries at the same positions."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from pydantic import AwareDatetime, Field

from schemas.envelope import Model

SEGMENT_BOUNDARIES_TYPE = "segment_boundaries_published"

# What the segment_boundaries columns hold: UInt32 day and purchase counts, Decimal(18, 2) amounts
# (in minor units, below 10**18 either way: lifetime net spend is negative after large refunds),
# UInt64 populations.
Count = Annotated[int, Field(ge=0, le=2**32 - 1)]
Minor = Annotated[int, Field(ge=-(10**18 - 1), le=10**18 - 1)]
Population = Annotated[int, Field(ge=0, le=2**64 - 1)]
Cuts = Annotated[list[Count], Field(min_length=4, max_length=4)]


class ValueCuts(Model):
    """Net spend over 365 days, in minor units of the rules' currency: at or above `high_min` is high,
    at or above `mid_min` is mid (both above zero)."""
    high_min_minor: Minor = Field(gt=0)
    mid_min_minor: Minor = Field(gt=0)
    population: Population = Field(description="customers with spend in the last 365 days")


class RfmCuts(Model):
    """The 20th, 40th, 60th and 80th percentiles of each figure over every customer who ever bought."""
    recency_days: Cuts
    frequency: Cuts
    monetary_minor: Annotated[list[Minor], Field(min_length=4, max_length=4)]
    population: Population


class SegmentBoundaries(Model):
    event_id: UUID
    type: Literal["segment_boundaries_published"] = SEGMENT_BOUNDARIES_TYPE
    occurred_at: AwareDatetime = Field(description="the event time the population figures are as of")
    partition: int = Field(ge=0, description="the events-topic partition this record was written to")
    boundaries_id: str = Field(min_length=1, max_length=100, description="the same in every partition")
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    value: ValueCuts | None = None
    rfm: RfmCuts | None = None
