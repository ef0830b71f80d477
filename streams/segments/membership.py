"""A customer's segments over event time: the current segment per dimension lives in the profile,
and every entry into a segment (with the exit from the previous one) is a `SegmentChange`, numbered
per customer (`seq` from 0, no gaps) so that its projection row has a deterministic key.

Two entry points, both pure:
- `advance(profile, until_ms, rules)`: time passes with no event from the customer (a clock tick, or
  the gap before the customer's next event). Each change is dated at the exact boundary it crossed.
- `settle(profile, rules, cause_event_id)`: after an event was folded into the profile."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from streams.profile import CustomerProfile
from streams.segments import lifecycle
from streams.segments.rules import SegmentRules


@dataclass(frozen=True, slots=True)
class SegmentChange:
    customer_key: str
    seq: int
    dimension: str
    from_segment: str
    to_segment: str
    occurred_ms: int
    cause_event_id: str  # empty when time caused it
    cause_type: str      # "event" or "time"
    rules_version: str

    def to_dict(self) -> dict[str, Any]:
        return {"entry": "segment_changed", **{name: getattr(self, name) for name in self.__dataclass_fields__}}


def advance(profile: CustomerProfile, until_ms: int, rules: SegmentRules) -> tuple[CustomerProfile, list[SegmentChange]]:
    """The changes that time alone makes between the profile's clock and `until_ms`; moving the clock
    itself is the profile's business (`streams.profile.elapse`)."""
    if profile.first_seen_ms is None or until_ms <= profile.clock_ms:
        return profile, []
    changes: list[SegmentChange] = []
    moment = profile.clock_ms
    while True:
        boundary = next_due_ms(profile, rules, after_ms=moment)
        if boundary is None or boundary > until_ms:
            break
        profile, change = _restage(profile, boundary, rules, "", "time")
        changes.extend(change)
        moment = boundary
    return profile, changes


def settle(profile: CustomerProfile, rules: SegmentRules, cause_event_id: str) -> tuple[CustomerProfile, list[SegmentChange]]:
    """The change (if any) that an event just folded into the profile makes, as of the profile's clock."""
    return _restage(profile, profile.clock_ms, rules, cause_event_id, "event")


def next_due_ms(profile: CustomerProfile, rules: SegmentRules, after_ms: int | None = None) -> int | None:
    """The next event time at which time alone may move this customer to another segment."""
    if profile.first_seen_ms is None or profile.last_seen_ms is None:
        return None
    after = profile.clock_ms if after_ms is None else after_ms
    return lifecycle.next_boundary_ms(profile.first_seen_ms, profile.last_seen_ms, profile.last_purchase_ms,
                                      after, rules.at_ms(after).lifecycle)


def _restage(profile: CustomerProfile, at_ms: int, rules: SegmentRules, cause_event_id: str,
             cause_type: str) -> tuple[CustomerProfile, list[SegmentChange]]:
    version = rules.at_ms(at_ms)
    stage = lifecycle.stage_at(profile.first_seen_ms, profile.last_seen_ms, profile.last_purchase_ms,  # type: ignore[arg-type]
                               at_ms, version.lifecycle)
    if stage == profile.lifecycle_stage:
        return profile, []
    change = SegmentChange(
        customer_key=profile.customer_key, seq=profile.segment_seq, dimension="lifecycle",
        from_segment=profile.lifecycle_stage, to_segment=stage, occurred_ms=at_ms,
        cause_event_id=cause_event_id, cause_type=cause_type, rules_version=version.version,
    )
    return replace(profile, lifecycle_stage=stage, lifecycle_since_ms=at_ms, segment_seq=profile.segment_seq + 1), [change]
