"""The lifecycle of churn alerts: from the indicators that hold now to the alert changes they make.

Per customer and alert type at most one alert is open. It opens when an indicator of its type holds;
it is updated when its reasons or its severity change; it is resolved when an event of the
customer's clears every reason, or is one that resolves the type whatever remains (`resolved_by`:
a purchase for churn risk), and expires when time alone clears them or when it has been open
`expire_after_days`. The reasons of an expired alert raise no new alert until
they have cleared (see ChurnState.quiet); a new reason does. From version 2026-12 of the rules an
alert opens only when its reasons weigh enough (`open_min_weight`), and not within
`reopen_after_days` of the customer's last alert of the type closing.

Ids are derived from the customer and a per-customer count, changes from the alert and its version,
so a redelivery or a replay produces the same ids (schemas/identity.py derived_id)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.alerts import (
    SEVERITY_ORDER,
    Action,
    AlertChange,
    AlertStatus,
    AlertType,
    Cause,
    Reason,
    Severity,
)
from schemas.identity import derived_id
from streams.churn.indicators import Finding
from streams.churn.rules import ChurnRulesVersion
from streams.churn.score import Score
from streams.churn.state import ChurnState, OpenAlert
from streams.loyalty.calendar import DAY_MS
from streams.profile import CustomerProfile, favourite_store


def transition(profile: CustomerProfile, churn: ChurnState, found: list[Finding], score: Score | None,
               rules: ChurnRulesVersion, now_ms: int, cause: Cause) -> list[dict[str, Any]]:
    """The alert changes (AlertChange records as JSON dicts) that `found` makes at `now_ms`;
    updates `churn` (open alerts, quiet reasons) in place."""
    changes: list[dict[str, Any]] = []
    if churn.closed:
        _end_cool_downs(churn, rules, now_ms)
    if not found and not churn.open and not churn.quiet:
        return changes  # the common case: nothing holds, nothing open, nothing quiet
    by_kind: dict[str, list[Finding]] = {}
    for finding in found:
        by_kind.setdefault(finding.alert_type, []).append(finding)
    for alert_type, kind in _ALERT_TYPES:
        mine = by_kind.get(kind, [])
        codes = [finding.code for finding in mine]
        current = churn.open.get(kind)
        if current is None:
            if not codes and kind not in churn.quiet:
                continue  # what _raises would say, without its bookkeeping (there is none to do)
            if _raises(churn, kind, codes) and _may_open(churn, kind, alert_type, mine, rules, now_ms):
                churn.opened_count += 1
                alert_id = str(derived_id("alert", profile.customer_key, str(churn.opened_count)))
                severity, weighted = _severity(mine, profile, rules)
                churn.open[kind] = OpenAlert(alert_id, 1, now_ms, severity.value, codes)
                changes.append(_change(profile, churn.open[kind], AlertStatus.OPENED, alert_type, mine, severity,
                                       weighted, score, rules, now_ms, cause))
            continue
        severity, weighted = _severity(mine, profile, rules)
        came_back = cause.event_type in rules.resolved_by.get(alert_type, ())
        if came_back or not codes or now_ms >= current.opened_ms + rules.expire_after_days[alert_type] * DAY_MS:
            resolved = came_back or (not codes and cause.type == "event")
            status = AlertStatus.RESOLVED if resolved else AlertStatus.EXPIRED
            if codes:
                churn.quiet[kind] = codes
            if alert_type in rules.reopen_after_days:
                churn.closed[kind] = now_ms
            del churn.open[kind]
            current.version += 1
            # The closing change names the reasons it closes, without evidence (they no longer hold).
            closed = [Finding(code, 0, {}) for code in current.codes] if not codes else mine
            changes.append(_change(profile, current, status, alert_type, closed, Severity(current.severity),
                                   weighted, score, rules, now_ms, cause))
        elif codes != current.codes or severity.value != current.severity:
            current.version += 1
            current.codes, current.severity = codes, severity.value
            changes.append(_change(profile, current, AlertStatus.UPDATED, alert_type, mine, severity, weighted,
                                   score, rules, now_ms, cause))
    return changes


# Every alert type with its value, in AlertType's order (the order of the changes).
_ALERT_TYPES = tuple((alert_type, alert_type.value) for alert_type in AlertType)


def _raises(churn: ChurnState, kind: str, codes: list[str]) -> bool:
    """Whether reasons `codes` open an alert, given what an expired alert left quiet."""
    quiet = churn.quiet.get(kind)
    if quiet is None:
        return bool(codes)
    still = [code for code in quiet if code in codes]
    if still:
        churn.quiet[kind] = still
    else:
        del churn.quiet[kind]
    return any(code not in quiet for code in codes)


def _may_open(churn: ChurnState, kind: str, alert_type: AlertType, found: list[Finding], rules: ChurnRulesVersion,
              now_ms: int) -> bool:
    """Whether the reasons weigh enough to open an alert of the type (`open_min_weight`), and the
    cool-down after the customer's last alert of the type (`reopen_after_days`) has passed."""
    if sum(finding.weight for finding in found) < rules.open_min_weight.get(alert_type, 0):
        return False
    return kind not in churn.closed  # cool-downs that are over were dropped (_end_cool_downs)


def _end_cool_downs(churn: ChurnState, rules: ChurnRulesVersion, now_ms: int) -> None:
    """Drops the cool-downs that are over at `now_ms` (or that the rules in force no longer have)."""
    for kind, closed in list(churn.closed.items()):
        cool_down = rules.reopen_after_days.get(AlertType(kind))
        if cool_down is None or now_ms >= closed + cool_down * DAY_MS:
            del churn.closed[kind]


def reopen_ms(churn: ChurnState, rules: ChurnRulesVersion) -> list[int]:
    """When the cool-downs running now end: a reason still holding may open an alert then."""
    return [closed + rules.reopen_after_days[AlertType(kind)] * DAY_MS for kind, closed in churn.closed.items()
            if AlertType(kind) in rules.reopen_after_days]


def _severity(found: list[Finding], profile: CustomerProfile, rules: ChurnRulesVersion) -> tuple[Severity, float]:
    grading = rules.severity
    weighted = round(sum(f.weight for f in found) * grading.value_weights.get(profile.value_tier or "low", 1.0), 2)
    level = sum(weighted >= threshold for threshold in (grading.medium, grading.high, grading.critical))
    return SEVERITY_ORDER[level], weighted


def recommended_action(profile: CustomerProfile, rules: ChurnRulesVersion) -> Action:
    """The first action for the customer's value tier with a channel the customer consented to."""
    tier = profile.value_tier or "low"
    consented = {key.split(":", 1)[1] for key, (_, _, granted) in profile.consent.items()
                 if granted and key.startswith("marketing:")}
    choices = rules.actions.get(tier) or rules.actions["low"]
    for choice in choices:
        for channel in choice.channels:
            if channel.value in consented:
                return Action(kind=choice.kind, channel=channel.value, note=f"value tier {tier}: {choice.kind} by {channel.value}")
    return Action(kind="none", channel=None,
                  note=f"value tier {tier}: no consented channel for " + ", ".join(c.kind for c in choices))


def segments_of(profile: CustomerProfile) -> list[str]:
    named = [("lifecycle", profile.lifecycle_stage), ("value_tier", profile.value_tier), ("rfm", profile.rfm_segment),
             *(("tag", tag) for tag in profile.tags)]
    return [f"{dimension}:{segment}" for dimension, segment in named if segment]


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _change(profile: CustomerProfile, alert: OpenAlert, status: AlertStatus, alert_type: AlertType,
            found: list[Finding], severity: Severity, weighted: float, score: Score | None,
            rules: ChurnRulesVersion, now_ms: int, cause: Cause) -> dict[str, Any]:
    change = AlertChange(
        change_id=derived_id("alert-change", alert.alert_id, str(alert.version)), alert_id=alert.alert_id,
        version=alert.version, status=status, alert_type=alert_type, customer_key=profile.customer_key,
        customer_id=profile.customer_id, severity=severity, severity_score=weighted,
        reasons=[Reason(code=f.code, evidence=f.evidence) for f in found],
        action=recommended_action(profile, rules), value_tier=profile.value_tier, segments=segments_of(profile),
        store_id=favourite_store(profile), p_alive=score.p_alive if score else None,
        expected_purchases_90d=score.expected_90d if score else None, model_id=score.model_id if score else "",
        opened_at=_at(alert.opened_ms), occurred_at=_at(now_ms), cause=cause, rules_version=rules.version,
    )
    return change.model_dump(mode="json")
