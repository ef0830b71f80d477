"""A customer's segments over event time: the current segment per dimension lives in the profile,
and every entry into a segment (with the exit from the previous one) is a `SegmentChange`, numbered
per customer (`seq` from 0, no gaps) so that its projection row has a deterministic key.

Dimensions: `lifecycle` (streams/segments/lifecycle.py), `value_tier` and `rfm`
(streams/segments/scoring.py), and one `tag:<name>` per tag, entered with the tag's name as segment
and left to "".

Three entry points, all pure:
- `advance(profile, until_ms, rules, boundaries)`: time passes with no event from the customer (a
  clock tick, or the gap before the customer's next event). Each change is dated at the exact moment
  it happened, and the profile's clock ends at `until_ms`.
- `settle(profile, rules, boundaries, cause_event_id)`: after an event was folded into the profile.
- `rescore(profile, rules, boundaries)`: new population boundaries reached the customer."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from schemas.boundaries import SegmentBoundaries
from streams import profile as profiles
from streams.profile import CustomerProfile
from streams.segments import lifecycle, scoring
from streams.segments.rules import SegmentRules

TAG = "tag:"


@dataclass(frozen=True, slots=True)
class SegmentChange:
    customer_key: str
    seq: int
    dimension: str
    from_segment: str
    to_segment: str
    occurred_ms: int
    cause_event_id: str  # the event, or the boundaries id; empty when time caused it
    cause_type: str      # "event", "time" or "boundaries"
    rules_version: str

    def to_dict(self) -> dict[str, Any]:
        return {"entry": "segment_changed", **{name: getattr(self, name) for name in self.__dataclass_fields__}}


Changes = tuple[CustomerProfile, list[SegmentChange]]


def advance(profile: CustomerProfile, until_ms: int, rules: SegmentRules,
            boundaries: SegmentBoundaries | None) -> Changes:
    """The changes that time alone makes between the profile's clock and `until_ms`."""
    if profile.first_seen_ms is None or until_ms <= profile.clock_ms:
        return profiles.elapse(profile, until_ms), []
    changes: list[SegmentChange] = []
    while True:
        moment = next_due_ms(profile, rules, boundaries)
        if moment is None or moment > until_ms:
            break
        profile, made = _restage(profiles.elapse(profile, moment), rules, boundaries, "", "time")
        changes.extend(made)
    return profiles.elapse(profile, until_ms), changes


def settle(profile: CustomerProfile, rules: SegmentRules, boundaries: SegmentBoundaries | None,
           cause_event_id: str) -> Changes:
    """The changes (if any) that an event just folded into the profile makes, as of the profile's clock."""
    return _restage(profile, rules, boundaries, cause_event_id, "event")


def rescore(profile: CustomerProfile, rules: SegmentRules, boundaries: SegmentBoundaries) -> Changes:
    """The changes that new population boundaries make, as of the profile's clock."""
    if profile.first_seen_ms is None or profile.boundaries_id == boundaries.boundaries_id:
        return profile, []
    return _restage(profile, rules, boundaries, boundaries.boundaries_id, "boundaries")


def next_due_ms(profile: CustomerProfile, rules: SegmentRules, boundaries: SegmentBoundaries | None) -> int | None:
    """The next event time after the profile's clock at which time alone may change a segment."""
    if profile.first_seen_ms is None or profile.last_seen_ms is None:
        return None
    after = profile.clock_ms
    version = rules.at_ms(after)
    moments = [
        lifecycle.next_boundary_ms(profile.first_seen_ms, profile.last_seen_ms, profile.last_purchase_ms,
                                   after, version.lifecycle),
        scoring.next_change_ms(profile, after, version, boundaries),
    ]
    return min((m for m in moments if m is not None), default=None)


def _restage(profile: CustomerProfile, rules: SegmentRules, boundaries: SegmentBoundaries | None,
             cause_event_id: str, cause_type: str) -> Changes:
    at_ms = profile.clock_ms
    version = rules.at_ms(at_ms)
    stage = lifecycle.stage_at(profile.first_seen_ms, profile.last_seen_ms, profile.last_purchase_ms,  # type: ignore[arg-type]
                               at_ms, version.lifecycle)
    now = scoring.standing(profile, at_ms, version, boundaries)
    moves = [("lifecycle", profile.lifecycle_stage, stage), ("value_tier", profile.value_tier, now.value_tier),
             ("rfm", profile.rfm_segment, now.rfm_segment)]
    moves += [(TAG + tag, tag, "") for tag in profile.tags if tag not in now.tags]
    moves += [(TAG + tag, "", tag) for tag in now.tags if tag not in profile.tags]
    changes = [
        SegmentChange(customer_key=profile.customer_key, seq=profile.segment_seq + n, dimension=dimension,
                      from_segment=before, to_segment=after, occurred_ms=at_ms, cause_event_id=cause_event_id,
                      cause_type=cause_type, rules_version=version.version)
        for n, (dimension, before, after) in enumerate((m for m in moves if m[1] != m[2]))
    ]
    scored_with = boundaries.boundaries_id if boundaries is not None else profile.boundaries_id
    if not changes and (now.value_tier, now.rfm, now.tags, scored_with) == (
            profile.value_tier, profile.rfm, profile.tags, profile.boundaries_id):
        return profile, []  # the common case: nothing moved (spares a copy of the profile)
    updated = replace(
        profile, lifecycle_stage=stage,
        lifecycle_since_ms=at_ms if stage != profile.lifecycle_stage else profile.lifecycle_since_ms,
        value_tier=now.value_tier, rfm=now.rfm, rfm_segment=now.rfm_segment, tags=now.tags,
        boundaries_id=scored_with, segment_seq=profile.segment_seq + len(changes),
    )
    return updated, changes
