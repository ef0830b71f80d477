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

from dataclasses import dataclass
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
        return {"entry": "segment_changed", "customer_key": self.customer_key, "seq": self.seq,
                "dimension": self.dimension, "from_segment": self.from_segment, "to_segment": self.to_segment,
                "occurred_ms": self.occurred_ms, "cause_event_id": self.cause_event_id,
                "cause_type": self.cause_type, "rules_version": self.rules_version}


Changes = tuple[CustomerProfile, list[SegmentChange]]


def advance(profile: CustomerProfile, until_ms: int, rules: SegmentRules,
            boundaries: SegmentBoundaries | None) -> Changes:
    """The changes that time alone makes between the profile's clock and `until_ms`."""
    if profile.first_seen_ms is None or until_ms <= profile.clock_ms:
        return profiles.elapse(profile, until_ms), []
    changes: list[SegmentChange] = []
    # Each due moment is visited as of itself without moving the profile's clock there: standing
    # and deadlines as of a moment do not depend on the clock, only on the moment (entries that
    # pruning would drop count in no window then), so one copy at the end brings the clock up.
    moment = profile.clock_ms
    while True:
        moment = _next_due_ms(profile, moment, rules, boundaries)  # type: ignore[assignment]
        if moment is None or moment > until_ms:
            break
        profile, made = _restage(profile, moment, rules, boundaries, "", "time")
        changes.extend(made)
    return profiles.elapse(profile, until_ms), changes


def settle(profile: CustomerProfile, rules: SegmentRules, boundaries: SegmentBoundaries | None,
           cause_event_id: str) -> Changes:
    """The changes (if any) that an event just folded into the profile makes, as of the profile's clock."""
    return _restage(profile, profile.clock_ms, rules, boundaries, cause_event_id, "event")


def rescore(profile: CustomerProfile, rules: SegmentRules, boundaries: SegmentBoundaries) -> Changes:
    """The changes that new population boundaries make, as of the profile's clock."""
    if profile.first_seen_ms is None or profile.boundaries_id == boundaries.boundaries_id:
        return profile, []
    return _restage(profile, profile.clock_ms, rules, boundaries, boundaries.boundaries_id, "boundaries")


def next_due_ms(profile: CustomerProfile, rules: SegmentRules, boundaries: SegmentBoundaries | None) -> int | None:
    """The next event time after the profile's clock at which time alone may change a segment."""
    return _next_due_ms(profile, profile.clock_ms, rules, boundaries)


class _LastDue:
    """The last deadline computed, to answer the same question again without recomputing: a tick
    asks for it while advancing the customer and again to list the next deadline, and between the
    two only the clock moved.

    A deadline is min{m in M : m > after}, where the candidate moments M follow from the profile's
    first/last seen and last purchase, its trailing entries, the rules version and the boundaries,
    and not from `after`. So with M unchanged, the answer `due` found for `after` also holds for any
    later `after2` < `due` (and None stays None). M's inputs are compared by value, the entries and
    the rules version and boundaries by identity (the memo holds them, so no other object can
    take their id). One tuple, replaced whole, so that a reader never sees half of two entries."""

    last: tuple[Any, ...] | None = None  # (recent, version, boundaries, first, last seen, last purchase, after, due)


def _next_due_ms(profile: CustomerProfile, after: int, rules: SegmentRules,
                 boundaries: SegmentBoundaries | None) -> int | None:
    """The first moment after `after` (at or past the profile's clock) at which time alone may
    change a segment, under the rules version in force at `after`."""
    first_seen, last_seen = profile.first_seen_ms, profile.last_seen_ms
    if first_seen is None or last_seen is None:
        return None
    version = rules.at_ms(after)
    last_purchase, recent = profile.last_purchase_ms, profile.recent
    last = _LastDue.last
    if (last is not None and last[0] is recent and last[1] is version and last[2] is boundaries
            and last[3] == first_seen and last[4] == last_seen and last[5] == last_purchase
            and last[6] <= after and (last[7] is None or after < last[7])):
        return last[7]
    due = lifecycle.next_boundary_ms(first_seen, last_seen, last_purchase, after, version.lifecycle)
    scored = scoring.next_change_ms(profile, after, version, boundaries)
    if scored is not None and (due is None or scored < due):
        due = scored
    _LastDue.last = (recent, version, boundaries, first_seen, last_seen, last_purchase, after, due)
    return due


def _restage(profile: CustomerProfile, at_ms: int, rules: SegmentRules, boundaries: SegmentBoundaries | None,
             cause_event_id: str, cause_type: str) -> Changes:
    """Where the customer stands at `at_ms` (the profile's clock, or a moment after it that
    `advance` visits) against where the profile says: the changes, and the profile that says so."""
    version = rules.at_ms(at_ms)
    stage = lifecycle.stage_at(profile.first_seen_ms, profile.last_seen_ms, profile.last_purchase_ms,  # type: ignore[arg-type]
                               at_ms, version.lifecycle)
    now = scoring.standing(profile, at_ms, version, boundaries)
    moves = [("lifecycle", profile.lifecycle_stage, stage), ("value_tier", profile.value_tier, now.value_tier),
             ("rfm", profile.rfm_segment, now.rfm_segment)]
    if now.tags != profile.tags:
        moves += [(TAG + tag, tag, "") for tag in profile.tags if tag not in now.tags]
        moves += [(TAG + tag, "", tag) for tag in now.tags if tag not in profile.tags]
    changes = [
        SegmentChange(profile.customer_key, profile.segment_seq + n, dimension, before, after, at_ms,
                      cause_event_id, cause_type, version.version)
        for n, (dimension, before, after) in enumerate([m for m in moves if m[1] != m[2]])
    ]
    scored_with = boundaries.boundaries_id if boundaries is not None else profile.boundaries_id
    if not changes and (now.value_tier, now.rfm, now.tags, scored_with) == (
            profile.value_tier, profile.rfm, profile.tags, profile.boundaries_id):
        return profile, []  # the common case: nothing moved (spares a copy of the profile)
    updated = profiles.evolve(
        profile, lifecycle_stage=stage,
        lifecycle_since_ms=at_ms if stage != profile.lifecycle_stage else profile.lifecycle_since_ms,
        value_tier=now.value_tier, rfm=now.rfm, rfm_segment=now.rfm_segment, tags=now.tags,
        boundaries_id=scored_with, segment_seq=profile.segment_seq + len(changes),
    )
    return updated, changes
