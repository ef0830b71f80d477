"""The churn indicators: which hold for a customer at a moment of event time, with the numbers
behind each, and the next moment at which one of them may turn. Pure functions of the profile, the
churn state, the points account and the churn score; docs/alerts.md lists them.

Every window is as of `now_ms`, an event time: an event's, or a clock tick's from the log."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from streams import trailing
from streams.churn.rules import ALERT_OF, ChurnRulesVersion, Falling
from streams.churn.state import ChurnState
from streams.loyalty.calendar import DAY_MS
from streams.loyalty.ledger import Account
from streams.profile import CustomerProfile

HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class Finding:
    code: str
    weight: float
    evidence: dict[str, Any]

    @property
    def alert_type(self) -> str:
        return ALERT_KIND_OF[self.code]


# ALERT_OF with the alert types' values: looked up for every finding at every evaluation.
ALERT_KIND_OF: dict[str, str] = {code: alert_type.value for code, alert_type in ALERT_OF.items()}


def findings(profile: CustomerProfile, churn: ChurnState, account: Account, p_alive: float | None,
             expected_90d: float | None, rules: ChurnRulesVersion, now_ms: int) -> list[Finding]:
    """Every indicator that holds at `now_ms`, in the order of the rules."""
    found = [
        _purchase_gap(churn, rules, now_ms),
        _falling("frequency_falling", rules.indicators.frequency_falling, profile, churn, _FREQUENCY_KINDS, now_ms),
        _falling("activity_falling", rules.indicators.activity_falling, profile, churn, _ACTIVITY_KINDS, now_ms),
        _dormant(profile, churn, rules, now_ms),
        _low_p_alive(p_alive, expected_90d, rules),
        _complaint_unresolved(profile, rules, now_ms),
        _low_score("nps_detractor", "nps", profile, rules, now_ms),
        _low_score("csat_low", "csat", profile, rules, now_ms),
        _repeated_refunds(profile, rules, now_ms),
        _points_expiring(profile, account, rules),
        _tier_at_risk(account, rules, now_ms),
    ]
    return [finding for finding in found if finding is not None]


def next_change_ms(profile: CustomerProfile, churn: ChurnState, account: Account, rules: ChurnRulesVersion,
                   now_ms: int) -> int | None:
    """The first moment after `now_ms` at which time alone may turn an indicator (points reminders
    and tier reviews wake the customer through the ledger's own deadlines; the score's crossing
    through streams/churn/score.py)."""
    offsets = _offsets(rules)
    # Every moment at which an indicator may turn, gathered and then the first after now.
    moments: list[int] = []
    gap = _gap_deadline(churn, rules)
    if gap is not None:
        moments.append(gap)
    # Each recent entry turns a window indicator when it moves from the recent window to the prior
    # one and when it leaves the prior one (falling), or leaves the refund window: of its moments,
    # only the earliest still to come can be the first (offsets are ascending per kind).
    by_kind = offsets.entry_ms
    for occurred, kind, _, _ in profile.recent:
        entry_offsets = by_kind.get(kind)
        if entry_offsets:
            for offset in entry_offsets:
                if occurred + offset > now_ms:
                    moments.append(occurred + offset)
                    break
    if churn.purchase_day_count and profile.last_seen_ms is not None:
        moments += [profile.last_seen_ms + offset for offset in offsets.dormant_ms]
    if churn.last_purchase_ms is not None:
        moments += [churn.last_purchase_ms + offset for offset in offsets.since_purchase_ms]
    if profile.open_complaints:
        moments += [filed + offsets.complaint_ms for filed in profile.open_complaints.values()]
    surveys = profile.surveys
    if surveys:
        for kind, within_ms in offsets.survey_ms:
            answers = surveys.get(kind)
            if answers:
                moments.append(answers[-1][0] + within_ms)
    if account.tier_review_ms is not None:
        moments.append(account.tier_review_ms - offsets.tier_ms)
    return min([moment for moment in moments if moment > now_ms], default=None)


@dataclass(frozen=True, slots=True)
class _Offsets:
    """A rules version's look-backs in milliseconds, for `next_change_ms`."""
    entry_ms: dict[str, tuple[int, ...]]   # recent-entry kind -> ascending offsets from its event time
    dormant_ms: tuple[int, ...]
    since_purchase_ms: tuple[int, ...]     # falling indicators' min_days_since_purchase, where set
    complaint_ms: int
    survey_ms: tuple[tuple[str, int], ...]
    tier_ms: int


# Rules version id -> (the version, its offsets). Versions live as long as the worker; the entry
# holds the version so that its id stays its own.
_OFFSETS: dict[int, tuple[ChurnRulesVersion, _Offsets]] = {}


def _offsets(rules: ChurnRulesVersion) -> _Offsets:
    cached = _OFFSETS.get(id(rules))
    if cached is not None and cached[0] is rules:
        return cached[1]
    indicators = rules.indicators
    entry_ms: dict[str, list[int]] = {}
    for falling, kinds in ((indicators.frequency_falling, _FREQUENCY_KINDS),
                           (indicators.activity_falling, _ACTIVITY_KINDS)):
        for kind in kinds:
            entry_ms.setdefault(kind, []).extend([falling.recent_days * DAY_MS,
                                                  (falling.recent_days + falling.prior_days) * DAY_MS])
    entry_ms.setdefault(trailing.REFUND, []).append(indicators.repeated_refunds.within_days * DAY_MS)
    offsets = _Offsets(
        entry_ms={kind: tuple(sorted(values)) for kind, values in entry_ms.items()},
        dormant_ms=tuple(days * DAY_MS for days in indicators.dormant.days),
        since_purchase_ms=tuple(sorted({falling.min_days_since_purchase * DAY_MS
                                        for falling in (indicators.frequency_falling, indicators.activity_falling)
                                        if falling.min_days_since_purchase is not None})),
        complaint_ms=indicators.complaint_unresolved.hours * HOUR_MS,
        survey_ms=(("nps", indicators.nps_detractor.within_days * DAY_MS),
                   ("csat", indicators.csat_low.within_days * DAY_MS)),
        tier_ms=indicators.tier_at_risk.within_days * DAY_MS,
    )
    _OFFSETS[id(rules)] = (rules, offsets)
    return offsets


_FREQUENCY_KINDS = (trailing.PURCHASE,)
_ACTIVITY_KINDS = (trailing.SESSION, trailing.SIGN_IN)


def _days(ms: float) -> float:
    return round(ms / DAY_MS, 1)


def _gap_deadline(churn: ChurnState, rules: ChurnRulesVersion) -> int | None:
    """When the time since the last purchase first exceeds `factor` x the median gap."""
    gap = rules.indicators.purchase_gap
    if churn.purchase_day_count < gap.min_purchases or len(churn.purchase_days) < 2:
        return None
    typical = _median_gap(churn)
    return churn.last_purchase_ms + math.floor(gap.factor * typical) + 1  # type: ignore[operator]


def _median_gap(churn: ChurnState) -> float:
    """statistics.median of the gaps between purchase days (the same arithmetic, without its
    overhead: this runs at every evaluation)."""
    gaps = sorted([later - earlier for earlier, later in pairwise(churn.purchase_days)])
    middle = len(gaps) // 2
    if len(gaps) % 2:
        return gaps[middle]
    return (gaps[middle - 1] + gaps[middle]) / 2


def _purchase_gap(churn: ChurnState, rules: ChurnRulesVersion, now_ms: int) -> Finding | None:
    deadline = _gap_deadline(churn, rules)
    if deadline is None or now_ms < deadline:
        return None
    gap = rules.indicators.purchase_gap
    return Finding("purchase_gap", gap.weight, {
        "days_since_last_purchase": _days(now_ms - churn.last_purchase_ms),  # type: ignore[operator]
        "median_gap_days": _days(_median_gap(churn)), "factor": gap.factor,
        "purchase_days": churn.purchase_day_count,
    })


def _falling(code: str, falling: Falling, profile: CustomerProfile, churn: ChurnState, kinds: tuple[str, ...],
             now_ms: int) -> Finding | None:
    since_purchase = falling.min_days_since_purchase
    if since_purchase is not None and (churn.last_purchase_ms is None
                                       or now_ms - churn.last_purchase_ms < since_purchase * DAY_MS):
        return None  # only a buyer (as `dormant`) who has not bought for so long
    recent_start = now_ms - falling.recent_days * DAY_MS
    prior_start = recent_start - falling.prior_days * DAY_MS
    recent = prior = 0
    for occurred, kind, _, _ in profile.recent:
        if kind in kinds and occurred <= now_ms:
            recent += occurred > recent_start
            prior += prior_start < occurred <= recent_start
    if prior < falling.min_prior:
        return None
    ratio = (recent / falling.recent_days) / (prior / falling.prior_days)
    if ratio > falling.max_ratio or (falling.max_recent is not None and recent > falling.max_recent):
        return None
    evidence = {
        "recent": recent, "recent_days": falling.recent_days, "prior": prior, "prior_days": falling.prior_days,
        "rate_ratio": round(ratio, 3), "max_ratio": falling.max_ratio,
    }
    if since_purchase is not None:
        evidence["days_since_last_purchase"] = _days(now_ms - churn.last_purchase_ms)  # type: ignore[operator]
    return Finding(code, falling.weight, evidence)


def _dormant(profile: CustomerProfile, churn: ChurnState, rules: ChurnRulesVersion, now_ms: int) -> Finding | None:
    # Only customers who have bought can lapse; a registration alone is not a relationship to lose.
    if not churn.purchase_day_count or profile.last_seen_ms is None:
        return None
    dormant = rules.indicators.dormant
    silent = now_ms - profile.last_seen_ms
    levels = [level for level, days in enumerate(dormant.days) if silent >= days * DAY_MS]
    if not levels:
        return None
    level = levels[-1]
    return Finding("dormant", dormant.weights[level], {
        "days_since_last_seen": _days(silent), "threshold_days": dormant.days[level],
    })


def _low_p_alive(p_alive: float | None, expected_90d: float | None, rules: ChurnRulesVersion) -> Finding | None:
    low = rules.indicators.low_p_alive
    if p_alive is None or p_alive >= low.below:
        return None
    return Finding("low_p_alive", low.weight, {"p_alive": p_alive, "below": low.below,
                                               "expected_purchases_90d": expected_90d})


def _complaint_unresolved(profile: CustomerProfile, rules: ChurnRulesVersion, now_ms: int) -> Finding | None:
    unresolved = rules.indicators.complaint_unresolved
    overdue = sorted(filed for filed in profile.open_complaints.values()
                     if now_ms - filed >= unresolved.hours * HOUR_MS)
    if not overdue:
        return None
    return Finding("complaint_unresolved", unresolved.weight, {
        "complaints": len(overdue), "oldest_hours_open": round((now_ms - overdue[0]) / HOUR_MS, 1),
        "after_hours": unresolved.hours,
    })


def _low_score(code: str, kind: str, profile: CustomerProfile, rules: ChurnRulesVersion, now_ms: int) -> Finding | None:
    low = getattr(rules.indicators, code)
    answers = profile.surveys.get(kind)
    if not answers:
        return None
    answered, _, score = answers[-1]
    if score > low.max_score or now_ms - answered >= low.within_days * DAY_MS or answered > now_ms:
        return None
    return Finding(code, low.weight, {"score": score, "max_score": low.max_score,
                                      "answered_days_ago": _days(now_ms - answered)})


def _repeated_refunds(profile: CustomerProfile, rules: ChurnRulesVersion, now_ms: int) -> Finding | None:
    refunds = rules.indicators.repeated_refunds
    since = now_ms - refunds.within_days * DAY_MS
    count = sum(1 for occurred, kind, _, _ in profile.recent if kind == trailing.REFUND and since < occurred <= now_ms)
    if count < refunds.count:
        return None
    return Finding("repeated_refunds", refunds.weight, {"refunds": count, "within_days": refunds.within_days})


def _points_expiring(profile: CustomerProfile, account: Account, rules: ChurnRulesVersion) -> Finding | None:
    expiring = rules.indicators.points_expiring
    balance = account.last_balance
    if balance is None or profile.value_tier not in expiring.value_tiers:
        return None
    if balance["expiring_soon"] < expiring.min_points:
        return None
    return Finding("points_expiring", expiring.weight, {
        "points": balance["expiring_soon"], "within_days": balance["expiring_soon_days"],
        "next_expiry_ms": balance["next_expiry_ms"], "value_tier": profile.value_tier,
    })


def _tier_at_risk(account: Account, rules: ChurnRulesVersion, now_ms: int) -> Finding | None:
    at_risk = rules.indicators.tier_at_risk
    review = account.tier_review_ms
    if review is None or account.tier_after_review is None or not now_ms < review:
        return None
    if review - now_ms > at_risk.within_days * DAY_MS:
        return None
    return Finding("tier_at_risk", at_risk.weight, {
        "tier": account.tier, "tier_after_review": account.tier_after_review,
        "review_in_days": _days(review - now_ms), "review_at_ms": review,
    })
