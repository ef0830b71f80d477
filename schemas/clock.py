"""The clock tick: how the passing of time enters the log.

Points expire and customers go dormant without sending anything, yet every projection must be a
function of the log. So the worker's leader appends a tick to every partition of the events topic
at a fixed interval, stamped with the wall clock at that moment; from then on that moment is data.
A replay sees the same ticks at the same positions and does the same things. Ticks name no
customer: they carry the partition they were written to, and wake every customer of that
partition with something due by then."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal
from uuid import UUID

import orjson

from pydantic import AwareDatetime, Field

from schemas.envelope import Model

CLOCK_TICK_TYPE = "clock_ticked"


class ClockTick(Model):
    event_id: UUID
    type: Literal["clock_ticked"] = CLOCK_TICK_TYPE
    occurred_at: AwareDatetime
    partition: int = Field(ge=0, description="the events-topic partition this tick was written to")


def clock_tick(partition: int, now: datetime) -> bytes:
    """The record value of a tick for `partition` at `now`."""
    return orjson.dumps(ClockTick(event_id=uuid.uuid4(), occurred_at=now, partition=partition).model_dump(mode="json"))
