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

# The same in milliseconds, for the per-event loops below; each kind's windows shortest first.
WINDOWS_MS = {kind: tuple(days * DAY_MS for days in windows) for kind, windows in WINDOWS_DAYS.items()}
KEEP_MS = {kind: days * DAY_MS for kind, days in KEEP_DAYS.items()}
assert all(list(windows) == sorted(windows) for windows in WINDOWS_MS.values())


def add(entries: tuple[Entry, ...], entry: Entry) -> tuple[Entry, ...]:
    return tuple(sorted((*entries, entry)))


def prune(entries: tuple[Entry, ...], as_of_ms: int) -> tuple[Entry, ...]:
    """Without the entries that no window as of `as_of_ms` (or later) counts any more; `entries`
    itself when it keeps them all (the usual case: callers may compare by identity)."""
    for occurred, kind, _, _ in entries:
        if occurred <= as_of_ms - KEEP_MS[kind]:
            break
    else:
        return entries
    return tuple(e for e in entries if e[0] > as_of_ms - KEEP_MS[e[1]])


def figures(entries: tuple[Entry, ...], as_of_ms: int) -> dict[str, Any]:
    """The windows as of `as_of_ms`. Each spend dict lists currencies in the order of their first
    entry in the window (entries are in event-time order), as the records have always had them."""
    spend: dict[int, dict[str, int]] = {days: {} for days in SPEND_WINDOWS_DAYS}
    spend_since = [(as_of_ms - days * DAY_MS, spend[days]) for days in SPEND_WINDOWS_DAYS]
    activity_since = as_of_ms - ACTIVITY_WINDOW_DAYS * DAY_MS
    sessions = sign_ins = complaints = 0
    for occurred, kind, currency, amount in entries:
        if occurred > as_of_ms:
            continue
        # An entry is in a window of D days while its age is under D days: occurred > as_of - D.
        if kind == SESSION:
            sessions += occurred > activity_since
        elif kind == SIGN_IN:
            sign_ins += occurred > activity_since
        elif kind == COMPLAINT:
            complaints += occurred > activity_since
        else:
            signed = amount if kind == PURCHASE else -amount
            for since, totals in spend_since:
                if occurred > since:
                    totals[currency] = totals.get(currency, 0) + signed
    return {
        **{f"spend_{days}d_minor": totals for days, totals in spend.items()},
        "sessions_30d": sessions,
        "sign_ins_30d": sign_ins,
        "complaints_30d": complaints,
    }


def next_change_ms(entries: tuple[Entry, ...], after_ms: int) -> int | None:
    """The first moment after `after_ms` at which an entry leaves one of its windows."""
    best = None
    for occurred, kind, _, _ in entries:
        for window in WINDOWS_MS[kind]:
            moment = occurred + window
            if moment > after_ms:
                # The entry's first window to end after `after_ms`; its longer ones end later.
                if best is None or moment < best:
                    best = moment
                break
    return best
