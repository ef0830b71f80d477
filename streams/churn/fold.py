"""Churn for one customer, as a pure fold: the worker (streams/pipeline.py) calls `after_event` once
an event is in the profile and the points account, and `after_time` when a clock tick brings the
customer up to a later event time. Both re-score the customer, re-check the indicators and return
the alert changes; `next_due_ms` is when time alone may change anything here, for the partition
timers to wake the customer then."""

from __future__ import annotations

from typing import Any

from schemas.alerts import AlertType, Cause, ChurnModelPublished
from schemas.envelope import Envelope
from schemas.events import PurchaseCompleted
from streams.churn import indicators
from streams.churn.alerts import reopen_ms, transition
from streams.churn.rules import ChurnRules
from streams.churn.score import Score, falls_below_ms, score
from streams.churn.state import ChurnState
from streams.loyalty.calendar import DAY_MS, to_ms
from streams.loyalty.ledger import Account
from streams.profile import CustomerProfile, evolve

Outcome = tuple[CustomerProfile, list[dict[str, Any]]]
TIME = Cause(type="time")


def after_event(profile: CustomerProfile, churn: ChurnState, account: Account, model: ChurnModelPublished | None,
                rules: ChurnRules, event: Envelope) -> Outcome:
    if isinstance(getattr(event, "payload", None), PurchaseCompleted):
        churn.record_purchase(to_ms(event.occurred_at))
    return _evaluate(profile, churn, account, model, rules,
                     Cause(type="event", event_id=str(event.event_id), event_type=event.type), profile.clock_ms)


def after_time(profile: CustomerProfile, churn: ChurnState, account: Account, model: ChurnModelPublished | None,
               rules: ChurnRules, since_ms: int) -> Outcome:
    """Time passed from `since_ms` to the profile's clock with no event from the customer. Every
    moment in between at which an indicator may turn is visited, so each change is dated when it
    happened, not when the clock tick that found it came."""
    now = profile.clock_ms
    changes: list[dict[str, Any]] = []
    moment = next_due_ms(profile, churn, account, model, rules, since_ms)
    while moment is not None and moment < now:
        # The profile as of a passed moment is not kept: only its alert changes.
        changes += _changes_at(profile, churn, account, model, rules, TIME, moment)[1]
        moment = next_due_ms(profile, churn, account, model, rules, moment)
    profile, last = _evaluate(profile, churn, account, model, rules, TIME, now)
    return profile, changes + last


def next_due_ms(profile: CustomerProfile, churn: ChurnState, account: Account, model: ChurnModelPublished | None,
                rules: ChurnRules, after_ms: int | None = None) -> int | None:
    """The first moment after `after_ms` (default: the profile's clock) at which time alone may
    change the score, an indicator or an open alert."""
    now = profile.clock_ms if after_ms is None else after_ms
    if profile.first_seen_ms is None:
        return None
    version = rules.at_ms(now)
    moments = [indicators.next_change_ms(profile, churn, account, version, now),
               falls_below_ms(churn, model, version.indicators.low_p_alive.below)]
    moments += [alert.opened_ms + version.expire_after_days[AlertType(kind)] * DAY_MS for kind, alert in churn.open.items()]
    if churn.closed:
        moments += reopen_ms(churn, version)
    if churn.scored_ms is not None:
        moments.append(churn.scored_ms + version.score_refresh_days * DAY_MS)
    return min((moment for moment in moments if moment is not None and moment > now), default=None)


def _evaluate(profile: CustomerProfile, churn: ChurnState, account: Account, model: ChurnModelPublished | None,
              rules: ChurnRules, cause: Cause, now: int) -> Outcome:
    current, changes = _changes_at(profile, churn, account, model, rules, cause, now)
    return _with_churn(profile, current, tuple(sorted(churn.open))), changes


def _changes_at(profile: CustomerProfile, churn: ChurnState, account: Account, model: ChurnModelPublished | None,
                rules: ChurnRules, cause: Cause, now: int) -> tuple[Score | None, list[dict[str, Any]]]:
    """The score at `now` and the alert changes it and the indicators make; updates `churn`."""
    version = rules.at_ms(now)
    current = score(churn, model, now)
    churn.scored_ms = now if current is not None else None
    found = indicators.findings(profile, churn, account, current and current.p_alive, current and current.expected_90d,
                                version, now)
    return current, transition(profile, churn, found, current, version, now, cause)


def _with_churn(profile: CustomerProfile, current: Score | None, open_alerts: tuple[str, ...]) -> CustomerProfile:
    figures = (current.p_alive, current.expected_90d, current.model_id) if current else (None, None, "")
    if figures == (profile.churn_p_alive, profile.churn_expected_90d, profile.churn_model_id) \
            and open_alerts == profile.open_alerts:
        return profile
    return evolve(profile, churn_p_alive=figures[0], churn_expected_90d=figures[1], churn_model_id=figures[2],
                  open_alerts=open_alerts)
