"""Churn rules version 2026-12 (issue 17: an alert volume a retailer can act on): activity_falling
only once the app use has stopped and the customer has not bought for a while, a minimum weight of
evidence before a churn-risk alert opens, a cool-down before it re-opens; and the versions before
it behave as they did."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.alerts import AlertChange, AlertType
from streams.churn.rules import ChurnRules, load_churn_rules
from streams.churn.state import ChurnState, OpenAlert
from streams.config import PROJECT_ROOT
from streams.pipeline import load_customer, process
from streams.rulebooks import Rulebooks
from tests.unit.test_churn import RULES, START, Log, purchase, regular_buyer

DEPLOYED = load_churn_rules(PROJECT_ROOT / "deploy" / "churn-rules.toml")
NEW = next(version for version in DEPLOYED.versions if version.version == "2026-12")
# 2026-12 as if it had been in force from the start (the unit tests' history is in 2026).
NEW_ONLY = Rulebooks(RULES.loyalty, RULES.segments,
                     ChurnRules(versions=[NEW.model_copy(update={"effective_from": datetime(2020, 1, 1, tzinfo=UTC)})]))


class NewLog(Log):
    """A partition folded with rules version 2026-12 throughout."""

    def append(self, key: bytes, value: bytes, at: datetime) -> list:
        from streams.pipeline import SourceRecord

        record = SourceRecord(key=key, value=value, partition=0, offset=len(self.records),
                              timestamp_ms=int(at.timestamp() * 1000))
        self.records.append(record)
        outputs = process(record, self.store, self.seen, NEW_ONLY)
        self.outputs += outputs
        return outputs


def churn_risk(log: Log, customer: str = "c-1") -> list[AlertChange]:
    return [change for change in log.alerts(customer) if change.alert_type == "churn_risk"]


def test_the_new_version_takes_effect_after_the_old_one_and_the_old_one_sets_none_of_the_new_knobs():
    old = DEPLOYED.at_ms(int(datetime(2026, 12, 6, tzinfo=UTC).timestamp() * 1000))
    assert old.version == "2026-11"
    assert DEPLOYED.at_ms(int(NEW.effective_from.timestamp() * 1000)).version == "2026-12"
    assert old.open_min_weight == {} and old.reopen_after_days == {}
    for falling in (old.indicators.frequency_falling, old.indicators.activity_falling):
        assert falling.max_recent is None and falling.min_days_since_purchase is None
    assert NEW.open_min_weight == {AlertType.CHURN_RISK: 30} and NEW.reopen_after_days == {AlertType.CHURN_RISK: 30}
    assert NEW.actions == old.actions  # every action kind still recommended


def test_a_quiet_fortnight_in_the_app_of_a_customer_who_still_buys_raises_nothing_any_more():
    def customer(log: Log) -> None:
        log.send("customer_registered", START)
        for day in range(0, 71, 7):
            log.send("purchase_completed", START + timedelta(days=day), **purchase())
        for day in range(0, 43, 2):  # the app every other day for six weeks, then not at all
            log.send("app_session_started", START + timedelta(days=day, hours=1), payload={"session_id": f"s-{day}"})
        log.ticks(START, 70)

    old, new = Log(), NewLog()
    customer(old)
    customer(new)
    assert "activity_falling" in {reason.code for change in churn_risk(old) for reason in change.reasons}
    assert churn_risk(new) == []


def test_activity_falling_holds_once_the_app_use_stopped_and_no_purchase_for_30_days():
    log = NewLog()
    log.send("customer_registered", START)
    for day in (0, 7, 14):
        log.send("purchase_completed", START + timedelta(days=day), **purchase())
    for day in range(0, 41, 2):
        log.send("app_session_started", START + timedelta(days=day, hours=1), payload={"session_id": f"s-{day}"})
    log.ticks(START + timedelta(days=40), 30)
    changes = churn_risk(log)
    # The gap opens the alert (3 x the 7-day rhythm); the app falls silent 14 days after its last session.
    assert changes[0].status == "opened" and [r.code for r in changes[0].reasons] == ["purchase_gap"]
    assert changes[0].occurred_at == START + timedelta(days=14 + 21, milliseconds=1)
    joined = next(c for c in changes if "activity_falling" in [r.code for r in c.reasons])
    assert joined.status == "updated" and joined.occurred_at == START + timedelta(days=40 + 14, hours=1)
    evidence = next(r.evidence for r in joined.reasons if r.code == "activity_falling")
    assert evidence["recent"] == 0 and evidence["days_since_last_purchase"] == 40.0


def test_weak_evidence_alone_opens_no_churn_risk_alert():
    def one_purchase(log: Log) -> None:
        log.send("customer_registered", START)
        log.send("purchase_completed", START, **purchase())
        log.ticks(START, 130)

    old, new = Log(), NewLog()
    one_purchase(old)
    one_purchase(new)
    # dormant at 60 days weighs 20: an alert under 2026-11, none under 2026-12 until 120 days (35).
    assert churn_risk(old)[0].occurred_at == START + timedelta(days=60)
    [opened] = churn_risk(new)
    assert opened.occurred_at == START + timedelta(days=120)
    assert [(r.code, r.evidence["threshold_days"]) for r in opened.reasons] == [("dormant", 120)]


def test_after_a_purchase_closes_a_churn_alert_none_opens_again_for_30_days():
    def comes_back(log: Log) -> datetime:
        last = regular_buyer(log, every_days=5)
        log.ticks(last, 16)
        back = last + timedelta(days=16)
        log.send("purchase_completed", back, **purchase())
        log.ticks(back, 40)
        return back

    old = Log()
    back = comes_back(old)
    assert [c.status for c in churn_risk(old)][:3] == ["opened", "resolved", "opened"]
    assert churn_risk(old)[2].occurred_at < back + timedelta(days=30)

    new = NewLog()
    back = comes_back(new)
    first, resolved, again = churn_risk(new)[:3]
    assert (first.status, resolved.status, again.status) == ("opened", "resolved", "opened")
    assert resolved.occurred_at == back
    # The gap (3 x 5 days) passed at back + 15 days; the cool-down held it to the day it ended.
    assert again.occurred_at == back + timedelta(days=30) and again.cause.type == "time"
    assert [r.code for r in again.reasons] == ["purchase_gap"] and again.alert_id != first.alert_id
    # The cool-down is kept only while it runs; under 2026-11 it is never kept at all.
    assert load_customer(new.store, "c-1").churn.closed == {}
    assert load_customer(old.store, "c-1").churn.closed == {}


def test_a_cool_down_ends_even_when_nothing_opens_then():
    log = NewLog()
    last = regular_buyer(log, every_days=5)
    log.ticks(last, 16)
    back = last + timedelta(days=16)
    log.send("purchase_completed", back, **purchase())
    assert load_customer(log.store, "c-1").churn.closed == {"churn_risk": int(back.timestamp() * 1000)}
    for day in range(5, 35, 5):  # buying at the usual pace again: nothing holds when the cool-down ends
        log.send("purchase_completed", back + timedelta(days=day), **purchase())
    log.ticks(back + timedelta(days=30), 3)
    assert load_customer(log.store, "c-1").churn.closed == {}
    assert [c.status for c in churn_risk(log)] == ["opened", "resolved"]


def test_the_cool_down_is_kept_in_the_churn_state_and_its_copy():
    state = ChurnState([1, 2], 1, 2, 2, {"churn_risk": OpenAlert("a", 1, 5, "high", ["dormant"])}, 1, {}, 9,
                       {"bad_experience": 7})
    assert ChurnState.from_dict(state.to_dict()) == state
    copy = state.copy()
    copy.closed["churn_risk"] = 8
    assert state.closed == {"bad_experience": 7}
    # Without a cool-down in force nothing is kept: the state of 2026-11 customers is as it was.
    assert "closed" not in ChurnState().to_dict()


def test_the_demo_runs_the_latest_version_over_its_whole_history(tmp_path: Path):
    from services.demo import _churn_rules_for_demo

    target = tmp_path / "churn-rules.toml"
    assert _churn_rules_for_demo(PROJECT_ROOT / "deploy" / "churn-rules.toml", target) == DEPLOYED.versions[-1].version
    [version] = load_churn_rules(target).versions
    assert version.effective_from == datetime(2020, 1, 1, tzinfo=UTC)
    assert version.model_dump(exclude={"effective_from"}) == DEPLOYED.versions[-1].model_dump(exclude={"effective_from"})


def test_the_demo_tells_per_severity_how_often_the_customer_had_left():
    from services.demo import ChurnAlert, _by_severity

    at = datetime(2026, 6, 1, tzinfo=UTC)
    left_at = {"gone": at - timedelta(days=10), "later": at + timedelta(days=20)}
    opened = [ChurnAlert("gone", at, ("purchase_gap",), "critical"), ChurnAlert("later", at, ("dormant",), "high"),
              ChurnAlert("still", at, ("purchase_gap",), "high"), ChurnAlert("still", at, ("dormant",), "medium")]
    columns, rows = _by_severity(opened, left_at)
    assert columns == ["severity", "opened", "customer had left", "customer left, then or later"]
    assert rows == [("critical", 1, "100%", "100%"), ("high", 2, "0%", "50%"), ("medium", 1, "0%", "0%")]
