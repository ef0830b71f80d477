"""Churn alerts, as they leave the platform, and the churn model, as it enters the log.

`AlertChange` is one record of the alerts topic (`crm.alerts`, keyed by customer): one state change
of one alert, immutable. An alert is opened, may be updated (its reasons or severity changed),
and ends resolved (the customer came back: an event of theirs cleared every reason) or expired (time
alone ended it). `change_id` is the same on every re-send of a change, so a receiver de-duplicates
on it; `alert_id` names the alert across its changes. The JSON Schema is exported with the event
catalog (`crm schemas export`, schemas/jsonschema/alert_change.v1.json).

`ChurnModelPublished` carries the BG/NBD parameters fitted over the purchase history. Like segment
boundaries (schemas/boundaries.py), the projection writer fits them and appends them to every events
partition, so every score is a function of the log and a replay meets the same model at the same
place."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, Field

from schemas.envelope import Model

ALERT_CHANGE_TYPE = "alert_change"
CHURN_MODEL_TYPE = "churn_model_published"


class AlertType(StrEnum):
    CHURN_RISK = "churn_risk"            # buying or activity falling away, silence, low P(alive)
    BAD_EXPERIENCE = "bad_experience"    # complaints, low scores, refunds
    POINTS_EXPIRING = "points_expiring"  # a valuable customer's points about to expire unused
    TIER_AT_RISK = "tier_at_risk"        # the tier will be lost at the coming review


class AlertStatus(StrEnum):
    OPENED = "opened"
    UPDATED = "updated"
    RESOLVED = "resolved"
    EXPIRED = "expired"
    ERASED = "erased"    # the customer was erased (docs/privacy.md): every open alert closes with this


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


SEVERITY_ORDER = tuple(Severity)


class Reason(Model):
    code: str = Field(description="indicator, e.g. purchase_gap, complaint_unresolved (docs/alerts.md)")
    evidence: dict[str, Any] = Field(default_factory=dict, description="the numbers behind it")


class Action(Model):
    kind: str = Field(description="coupon, bonus_points, personal_call, or none")
    channel: str | None = Field(default=None, description="a channel the customer consented to; none if no action")
    note: str = Field(default="", description="why this action (or why none)")


class Cause(Model):
    type: Literal["event", "time", "model"]
    event_id: str = ""
    event_type: str = ""


class AlertChange(Model):
    type: Literal["alert_change"] = ALERT_CHANGE_TYPE
    change_id: UUID = Field(description="unique per change, stable across re-sends: de-duplicate on it")
    alert_id: UUID
    version: int = Field(ge=1, description="1 for opened, then one more per change of this alert")
    status: AlertStatus
    alert_type: AlertType
    customer_key: str
    customer_id: str | None = None
    severity: Severity
    severity_score: float = Field(ge=0, description="reason weights times the customer's value weight")
    reasons: list[Reason]
    action: Action
    value_tier: str = ""
    segments: list[str] = Field(default_factory=list,
                                description="the customer's segments as dimension:segment, e.g. value_tier:high")
    store_id: str = Field(default="", description="the customer's favourite store, if any")
    p_alive: float | None = Field(default=None, description="BG/NBD probability the customer is still active")
    expected_purchases_90d: float | None = None
    model_id: str = ""
    opened_at: AwareDatetime
    occurred_at: AwareDatetime = Field(description="event time of this change")
    cause: Cause
    rules_version: str


# The BG/NBD parameters the writer's fit can publish: it keeps them within exp(+-20) and publishes
# only fits inside (streams/churn/bgnbd.py _LOG_BOUND); the scores are computed for those.
Parameter = Annotated[float, Field(ge=math.exp(-20), le=math.exp(20), allow_inf_nan=False)]


class ChurnModelPublished(Model):
    event_id: UUID
    type: Literal["churn_model_published"] = CHURN_MODEL_TYPE
    occurred_at: AwareDatetime = Field(description="the event time the purchase history was fitted up to")
    partition: int = Field(ge=0, description="the events-topic partition this record was written to")
    model_id: str = Field(min_length=1, max_length=100, description="the same in every partition")
    r: Parameter
    alpha: Parameter
    a: Parameter
    b: Parameter
    time_unit_days: float = Field(default=1.0, ge=1 / 24, le=366, description="the parameters' unit of time, in days")
    customers: int = Field(ge=0, le=2**64 - 1, description="customers with a purchase that the fit saw")
    log_likelihood: float = Field(allow_inf_nan=False)
