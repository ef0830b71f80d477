"""Where a customer stands at a moment, in every segment dimension, as pure functions of the
profile (brought up to that moment), the rules in force and the population boundaries:

- value tier: high / mid / low by net spend over 365 days against the boundaries' cuts;
- RFM: recency, frequency and monetary scores 1-5 against the boundaries' quintile cuts, and the
  named segment of the (R, mean of F and M) cell; 0 and "" until the customer has bought;
- tags: each tag rule's conditions over the figures in `facts`.

Without boundaries (none published yet, or published for another currency) a customer has no value
tier and no RFM scores: they are relative to a population nobody has measured yet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.boundaries import SegmentBoundaries
from streams import trailing
from streams.loyalty.calendar import DAY_MS
from streams.profile import CustomerProfile
from streams.segments.rules import SegmentRulesVersion


@dataclass(frozen=True, slots=True)
class Standing:
    value_tier: str
    rfm: tuple[int, int, int]
    rfm_segment: str
    tags: tuple[str, ...]


def standing(profile: CustomerProfile, at_ms: int, rules: SegmentRulesVersion,
             boundaries: SegmentBoundaries | None) -> Standing:
    figures = facts(profile, at_ms, rules)
    if boundaries is not None and boundaries.currency != rules.currency:
        boundaries = None
    tags = tuple(name for name, conditions in _tag_conditions(rules) if _hold(conditions, figures))
    if boundaries is None:
        return Standing("", (0, 0, 0), "", tags)
    scores = rfm_scores(figures, boundaries)
    segment = rules.rfm.segment_of(scores[0], (scores[1] + scores[2] + 1) // 2) if scores[0] else ""
    return Standing(value_tier(figures["spend_365d_minor"], boundaries), scores, segment, tags)


Conditions = tuple[tuple[str, float | None, float | None], ...]  # (figure, min, max): Bounds, unpacked

# Rules version id -> (the version, its tags sorted by name with their conditions unpacked): every
# standing tests every tag. The entry holds the version so that its id stays its own.
_TAG_CONDITIONS: dict[int, tuple[SegmentRulesVersion, tuple[tuple[str, Conditions], ...]]] = {}


def _tag_conditions(rules: SegmentRulesVersion) -> tuple[tuple[str, Conditions], ...]:
    cached = _TAG_CONDITIONS.get(id(rules))
    if cached is None or cached[0] is not rules:
        compiled = tuple((name, tuple((field, bounds.min, bounds.max) for field, bounds in conditions.items()))
                         for name, conditions in sorted(rules.tags.items()))
        cached = _TAG_CONDITIONS[id(rules)] = (rules, compiled)
    return cached[1]


def _hold(conditions: Conditions, figures: dict[str, Any]) -> bool:
    """Whether every condition holds: what Bounds.holds says for each (inclusive bounds; a figure
    that is None holds none)."""
    for field, low, high in conditions:
        value = figures[field]
        if value is None or (low is not None and not value >= low) or (high is not None and not value <= high):
            return False
    return True


def value_tier(spend_365d_minor: int, boundaries: SegmentBoundaries) -> str:
    cuts = boundaries.value
    if cuts is not None and spend_365d_minor >= cuts.high_min_minor:
        return "high"
    if cuts is not None and spend_365d_minor >= cuts.mid_min_minor:
        return "mid"
    return "low"


def rfm_scores(figures: dict[str, Any], boundaries: SegmentBoundaries) -> tuple[int, int, int]:
    """(R, F, M), each 1-5: how many of the four quintile cuts the customer is beyond. Ties with a cut
    score low (for recency: a customer exactly at the cut is the more recent)."""
    cuts = boundaries.rfm
    if cuts is None or figures["days_since_last_purchase"] is None:
        return (0, 0, 0)
    recency = 5 - sum(figures["days_since_last_purchase"] > cut for cut in cuts.recency_days)
    frequency = 1 + sum(figures["purchase_count"] > cut for cut in cuts.frequency)
    monetary = 1 + sum(figures["monetary"] > cut for cut in cuts.monetary_minor)
    return (recency, frequency, monetary)


def facts(profile: CustomerProfile, at_ms: int, rules: SegmentRulesVersion) -> dict[str, Any]:
    """The figures segments are cut by: the tag fields in streams/segments/rules.py (money in major
    units of the rules' currency), and in minor units `monetary` and `spend_365d_minor`."""
    windows = trailing.figures(profile.recent, at_ms)
    purchases = profile.purchase_count
    events = sum(profile.channel_events.values())
    nps, csat = (profile.surveys.get(kind, []) for kind in ("nps", "csat"))
    return {
        "purchase_count": purchases,
        "refund_count": profile.refund_count,
        "refund_rate": profile.refund_count / purchases if purchases else None,
        "monetary": profile.spend_minor.get(rules.currency, 0),
        "spend_365d_minor": windows["spend_365d_minor"].get(rules.currency, 0),
        "spend_365d": windows["spend_365d_minor"].get(rules.currency, 0) / 100,
        "session_count": profile.session_count,
        "sign_in_count": profile.sign_in_count,
        "sessions_30d": windows["sessions_30d"],
        "sign_ins_30d": windows["sign_ins_30d"],
        "complaint_count": profile.complaint_count,
        "complaints_30d": windows["complaints_30d"],
        "open_complaints": len(profile.open_complaints),
        "nps_latest": nps[-1][2] if nps else None,
        "csat_latest": csat[-1][2] if csat else None,
        "points_available": profile.points_available,
        "weekend_purchase_share": profile.weekend_purchases / purchases if purchases else None,
        "app_share": profile.channel_events.get("app", 0) / events if events else None,
        "days_since_last_purchase": _days_since(profile.last_purchase_ms, at_ms),
        "days_since_last_seen": _days_since(profile.last_seen_ms, at_ms),
    }


def next_change_ms(profile: CustomerProfile, after_ms: int, rules: SegmentRulesVersion,
                   boundaries: SegmentBoundaries | None) -> int | None:
    """The first moment after `after_ms` at which time alone may change the standing: a recency
    score crossing a cut, a day count crossing a tag's bound, or an entry leaving a trailing window."""
    best = trailing.next_change_ms(profile.recent, after_ms)
    last_purchase = profile.last_purchase_ms
    candidates: list[int] = []
    if last_purchase is not None and boundaries is not None and boundaries.rfm is not None:
        candidates += [last_purchase + (cut + 1) * DAY_MS for cut in boundaries.rfm.recency_days]
    since_purchase, since_seen = _tag_day_bounds(rules)
    if last_purchase is not None:
        candidates += [last_purchase + offset for offset in since_purchase]
    if profile.last_seen_ms is not None:
        candidates += [profile.last_seen_ms + offset for offset in since_seen]
    for moment in candidates:
        if moment > after_ms and (best is None or moment < best):
            best = moment
    return best


# Rules version -> (offsets from the last purchase, offsets from the last visit) at which a tag's
# day-count condition may turn. Rules versions live as long as the worker; the entry holds the
# version itself so that its id stays its own.
_TAG_DAY_BOUNDS: dict[int, tuple[SegmentRulesVersion, tuple[tuple[int, ...], tuple[int, ...]]]] = {}


def _tag_day_bounds(rules: SegmentRulesVersion) -> tuple[tuple[int, ...], tuple[int, ...]]:
    cached = _TAG_DAY_BOUNDS.get(id(rules))
    if cached is not None and cached[0] is rules:
        return cached[1]
    offsets: dict[str, list[int]] = {"days_since_last_purchase": [], "days_since_last_seen": []}
    for conditions in rules.tags.values():
        for field, bounds in conditions.items():
            if field not in offsets:
                continue
            # A day count d holds min once d >= min (ceil), and stops holding max once d > max.
            if bounds.min is not None:
                offsets[field].append(-int(-bounds.min // 1) * DAY_MS)
            if bounds.max is not None:
                offsets[field].append((int(bounds.max // 1) + 1) * DAY_MS)
    bounds_ms = (tuple(offsets["days_since_last_purchase"]), tuple(offsets["days_since_last_seen"]))
    _TAG_DAY_BOUNDS[id(rules)] = (rules, bounds_ms)
    return bounds_ms


def _days_since(millis: int | None, at_ms: int) -> int | None:
    return None if millis is None else (at_ms - millis) // DAY_MS
