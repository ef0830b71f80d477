"""Churn rules: which indicators raise which alert, their thresholds and weights, how severity is
graded, when an open alert expires, and which retention action each value tier gets. Versioned by
event time like the other rules files (streams/versioned_rules.py); deploy/churn-rules.toml."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from schemas.alerts import AlertType
from schemas.events import ConsentChannel
from streams import trailing
from streams.versioned_rules import Rules, RulesVersionBase, VersionedRules, load_toml

Days = Annotated[int, Field(gt=0)]
Weight = Annotated[float, Field(ge=0)]
Ratio = Annotated[float, Field(gt=0, lt=1)]


class PurchaseGap(Rules):
    """The time since the last purchase is longer than `factor` times the customer's median gap."""
    factor: float = Field(default=2.0, gt=1)
    min_purchases: int = Field(default=3, ge=3)
    weight: Weight = 30


class Falling(Rules):
    """The rate per day in the last `recent_days` is at most `max_ratio` of the rate in the
    `prior_days` before them, which had at least `min_prior` occurrences; and, when set, the last
    `recent_days` had at most `max_recent` occurrences (0: the activity stopped, not a quiet fortnight)
    and the customer has not bought for `min_days_since_purchase` days (someone who still buys is not
    leaving, whatever their app use). Unset (None), they hold regardless, as before version 2026-12."""
    recent_days: Days
    prior_days: Days
    max_ratio: Ratio = 0.5
    min_prior: int = Field(default=2, ge=1)
    max_recent: int | None = Field(default=None, ge=0)
    min_days_since_purchase: Days | None = None
    weight: Weight = 20


class Dormancy(Rules):
    """Nothing from the customer for `days` (each level a heavier weight)."""
    days: list[Days] = Field(default_factory=lambda: [60, 120], min_length=1)
    weights: list[Weight] = Field(default_factory=lambda: [20.0, 35.0], min_length=1)

    @model_validator(mode="after")
    def _levels(self) -> Dormancy:
        if len(self.days) != len(self.weights) or self.days != sorted(set(self.days)):
            raise ValueError("dormancy needs increasing days and one weight per level")
        return self


class Unresolved(Rules):
    hours: int = Field(default=48, gt=0)
    weight: Weight = 35


class LowScore(Rules):
    """The latest answer is at most `max_score` and younger than `within_days`."""
    max_score: int
    within_days: Days = 90
    weight: Weight = 25


class Refunds(Rules):
    count: int = Field(default=2, ge=2)
    within_days: Days = 90
    weight: Weight = 20


class PointsExpiring(Rules):
    """A customer in one of `value_tiers` has at least `min_points` expiring within the loyalty
    rules' reminder window."""
    value_tiers: list[str] = Field(default_factory=lambda: ["high", "mid"])
    min_points: int = Field(default=200, gt=0)
    weight: Weight = 20


class TierAtRisk(Rules):
    """The next tier review, at most `within_days` away, demotes the customer."""
    within_days: Days = 30
    weight: Weight = 25


class LowPAlive(Rules):
    """The BG/NBD probability that the customer is still active is below `below`."""
    below: Ratio = 0.3
    weight: Weight = 25


class Indicators(Rules):
    purchase_gap: PurchaseGap = PurchaseGap()
    frequency_falling: Falling = Falling(recent_days=60, prior_days=120, min_prior=2)
    activity_falling: Falling = Falling(recent_days=14, prior_days=28, min_prior=4, weight=15)
    dormant: Dormancy = Dormancy()
    complaint_unresolved: Unresolved = Unresolved()
    nps_detractor: LowScore = LowScore(max_score=6)
    csat_low: LowScore = LowScore(max_score=2)
    repeated_refunds: Refunds = Refunds()
    points_expiring: PointsExpiring = PointsExpiring()
    tier_at_risk: TierAtRisk = TierAtRisk()
    low_p_alive: LowPAlive = LowPAlive()


# Which alert each indicator raises.
ALERT_OF: dict[str, AlertType] = {
    "purchase_gap": AlertType.CHURN_RISK, "frequency_falling": AlertType.CHURN_RISK,
    "activity_falling": AlertType.CHURN_RISK, "dormant": AlertType.CHURN_RISK, "low_p_alive": AlertType.CHURN_RISK,
    "complaint_unresolved": AlertType.BAD_EXPERIENCE, "nps_detractor": AlertType.BAD_EXPERIENCE,
    "csat_low": AlertType.BAD_EXPERIENCE, "repeated_refunds": AlertType.BAD_EXPERIENCE,
    "points_expiring": AlertType.POINTS_EXPIRING, "tier_at_risk": AlertType.TIER_AT_RISK,
}


class Severity(Rules):
    """score = sum of the reasons' weights x the value tier's weight; graded by the lowest score of
    each level (below `medium` is low)."""
    value_weights: dict[str, Weight] = Field(default_factory=lambda: {"high": 2.0, "mid": 1.5, "low": 1.0})
    medium: Weight = 20
    high: Weight = 40
    critical: Weight = 70

    @model_validator(mode="after")
    def _increasing(self) -> Severity:
        if not self.medium < self.high < self.critical:
            raise ValueError("severity levels must increase: medium < high < critical")
        return self


class Action(Rules):
    kind: Annotated[str, Field(pattern=r"^[a-z][a-z_]{0,39}$")]
    channels: list[ConsentChannel] = Field(min_length=1)


class ChurnRulesVersion(RulesVersionBase):
    indicators: Indicators = Indicators()
    severity: Severity = Severity()
    # An alert still open this many days after it opened expires; its reasons then raise no new
    # alert until they have cleared.
    expire_after_days: dict[AlertType, Days] = Field(default_factory=lambda: {
        AlertType.CHURN_RISK: 90, AlertType.BAD_EXPERIENCE: 30, AlertType.POINTS_EXPIRING: 45,
        AlertType.TIER_AT_RISK: 60})
    # Events that resolve an open alert of a type even if some of its reasons still hold: a purchase
    # is the customer coming back, though the 60-day frequency may still look low. The reasons left
    # then stay quiet until they clear, as after an expiry.
    resolved_by: dict[AlertType, list[str]] = Field(default_factory=lambda: {
        AlertType.CHURN_RISK: ["purchase_completed"]})
    # The churn score is recomputed at least this often while time passes.
    score_refresh_days: Days = 7
    # Alert type -> the sum of its reasons' weights (before the customer's value weight, which grades
    # urgency, not evidence) from which an alert of the type opens: weaker evidence alone raises none.
    # An alert already open stays open while any reason holds. Types not named: any reason opens one.
    open_min_weight: dict[AlertType, Weight] = Field(default_factory=dict)
    # Alert type -> days after an alert of the type closed (resolved or expired) before another may
    # open for the customer: a shopper whose quiet spell ended with a purchase is not flagged again
    # at the next quiet week. Types not named: at once, as before version 2026-12.
    reopen_after_days: dict[AlertType, Days] = Field(default_factory=dict)
    # Per value tier ("" = not yet scored is treated as "low"), the actions in order of preference;
    # the first one with a channel the customer consented to (marketing) is recommended.
    actions: dict[str, list[Action]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _complete(self) -> ChurnRulesVersion:
        missing = sorted(set(AlertType) - set(self.expire_after_days))
        if missing:
            raise ValueError(f"expire_after_days misses {missing}")
        if "low" not in self.actions:
            raise ValueError("actions must name at least the 'low' value tier")
        # The indicators read the profile's recent entries, which are kept only so long.
        looks_back = {"frequency_falling": (self.indicators.frequency_falling, trailing.PURCHASE),
                      "activity_falling": (self.indicators.activity_falling, trailing.SESSION)}
        for name, (falling, kind) in looks_back.items():
            if falling.recent_days + falling.prior_days > trailing.KEEP_DAYS[kind]:
                raise ValueError(f"{name} looks back further than the {trailing.KEEP_DAYS[kind]} days kept")
        if self.indicators.repeated_refunds.within_days > trailing.KEEP_DAYS[trailing.REFUND]:
            raise ValueError(f"repeated_refunds looks back further than the {trailing.KEEP_DAYS[trailing.REFUND]} days kept")
        return self


class ChurnRules(VersionedRules[ChurnRulesVersion]):
    """Every churn rules version, oldest first."""


def load_churn_rules(path: Path) -> ChurnRules:
    return load_toml(ChurnRules, path, "churn rules")
