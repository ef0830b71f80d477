"""Trailing windows over a customer's recent activity: net spend over the last 30, 90 and 365 days
per currency, app sessions, sign-ins and complaints over the last 30 days.

The profile keeps each recent purchase, refund, session and sign-in as an entry (event time, kind,
currency, amount) for as long as some window counts it (KEEP_DAYS). A figure is as of a moment T: it sums the
entries with event time in (T - window, T]. So an entry leaves a window exactly `window` after it
happened; `next_change_ms` names the next such moment, for the partition timers to wake the customer
then, so the figures in the projection slide with event time even if the customer never returns."""

from __future__ import annotations

from typing import Any

from streams.loyalty.calendar import DAY_MS

PURCHASE, REFUND, SESSION, SIGN_IN, COMPLAINT = "purchase", "refund", "session", "sign_in", "complaint"
SPEND_WINDOWS_DAYS = (30, 90, 365)
ACTIVITY_WINDOW_DAYS = 30
WINDOWS_DAYS = {PURCHASE: SPEND_WINDOWS_DAYS, REFUND: SPEND_WINDOWS_DAYS,
                SESSION: (ACTIVITY_WINDOW_DAYS,), SIGN_IN: (ACTIVITY_WINDOW_DAYS,), COMPLAINT: (ACTIVITY_WINDOW_DAYS,)}

# How long entries are kept: the longest window a figure or a churn indicator (streams/churn/rules.py)
# looks back over.
KEEP_DAYS = {PURCHASE: 365, REFUND: 365, SESSION: 60, SIGN_IN: 60, COMPLAINT: 30}

Entry = tuple[int, str, str, int]  # event time ms, kind, currency ("" for counts), amount (minor units or 1)


def add(entries: tuple[Entry, ...], entry: Entry) -> tuple[Entry, ...]:
    return tuple(sorted((*entries, entry)))


def prune(entries: tuple[Entry, ...], as_of_ms: int) -> tuple[Entry, ...]:
    """Without the entries that no window as of `as_of_ms` (or later) counts any more."""
    kept = tuple(e for e in entries if e[0] > as_of_ms - KEEP_DAYS[e[1]] * DAY_MS)
    return entries if len(kept) == len(entries) else kept


def figures(entries: tuple[Entry, ...], as_of_ms: int) -> dict[str, Any]:
    spend: dict[int, dict[str, int]] = {days: {} for days in SPEND_WINDOWS_DAYS}
    activity = {SESSION: 0, SIGN_IN: 0, COMPLAINT: 0}
    for occurred, kind, currency, amount in entries:
        if occurred > as_of_ms:
            continue
        age = as_of_ms - occurred
        if kind in activity:
            activity[kind] += age < ACTIVITY_WINDOW_DAYS * DAY_MS
            continue
        signed = amount if kind == PURCHASE else -amount
        for days in SPEND_WINDOWS_DAYS:
            if age < days * DAY_MS:
                spend[days][currency] = spend[days].get(currency, 0) + signed
    return {
        **{f"spend_{days}d_minor": totals for days, totals in spend.items()},
        "sessions_30d": activity[SESSION],
        "sign_ins_30d": activity[SIGN_IN],
        "complaints_30d": activity[COMPLAINT],
    }


def next_change_ms(entries: tuple[Entry, ...], after_ms: int) -> int | None:
    """The first moment after `after_ms` at which an entry leaves one of its windows."""
    return min((occurred + days * DAY_MS for occurred, kind, _, _ in entries for days in WINDOWS_DAYS[kind]
                if occurred + days * DAY_MS > after_ms), default=None)
