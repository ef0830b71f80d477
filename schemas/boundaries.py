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

Cuts = Annotated[list[int], Field(min_length=4, max_length=4)]


class ValueCuts(Model):
    """Net spend over 365 days, in minor units of the rules' currency: at or above `high_min` is high,
    at or above `mid_min` is mid (both above zero)."""
    high_min_minor: int = Field(gt=0)
    mid_min_minor: int = Field(gt=0)
    population: int = Field(ge=0, description="customers with spend in the last 365 days")


class RfmCuts(Model):
    """The 20th, 40th, 60th and 80th percentiles of each figure over every customer who ever bought."""
    recency_days: Cuts
    frequency: Cuts
    monetary_minor: Cuts
    population: int = Field(ge=0)


class SegmentBoundaries(Model):
    event_id: UUID
    type: Literal["segment_boundaries_published"] = SEGMENT_BOUNDARIES_TYPE
    occurred_at: AwareDatetime = Field(description="the event time the population figures are as of")
    partition: int = Field(ge=0, description="the events-topic partition this record was written to")
    boundaries_id: str = Field(min_length=1, max_length=100, description="the same in every partition")
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    value: ValueCuts | None = None
    rfm: RfmCuts | None = None
