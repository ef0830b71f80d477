"""Lifecycle stage, from event time alone (thresholds in deploy/segment-rules.toml):

- new: first seen less than `new_days` ago;
- active: otherwise, a purchase less than `active_days` ago;
- lost: otherwise, no activity at all (any event) for `lost_days` or more;
- dormant: everyone else: no recent purchase, though perhaps still browsing.

A stage changes only at an event or at one of three moments that follow from the profile: the end of
the new period, the end of the active period, the start of the lost period. `next_boundary_ms`
names the next one, for the partition timers to wake the customer then."""

from __future__ import annotations

from streams.loyalty.calendar import DAY_MS
from streams.segments.rules import Lifecycle

def stage_at(first_seen_ms: int, last_seen_ms: int, last_purchase_ms: int | None, at_ms: int,
             rules: Lifecycle) -> str:
    if at_ms - first_seen_ms < rules.new_days * DAY_MS:
        return "new"
    if last_purchase_ms is not None and at_ms - last_purchase_ms < rules.active_days * DAY_MS:
        return "active"
    if at_ms - last_seen_ms >= rules.lost_days * DAY_MS:
        return "lost"
    return "dormant"


def next_boundary_ms(first_seen_ms: int, last_seen_ms: int, last_purchase_ms: int | None, after_ms: int,
                     rules: Lifecycle) -> int | None:
    """The first moment after `after_ms` at which the stage may change with no new event."""
    moments = [first_seen_ms + rules.new_days * DAY_MS, last_seen_ms + rules.lost_days * DAY_MS]
    if last_purchase_ms is not None:
        moments.append(last_purchase_ms + rules.active_days * DAY_MS)
    return min((m for m in moments if m > after_ms), default=None)
