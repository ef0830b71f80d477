"""Churn alerts through `pipeline.process`: generated customers who drift away, complain, answer a
survey badly, or come back, with clock ticks from the log as the only passing of time."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import orjson

from schemas.alerts import AlertChange, ChurnModelPublished
from schemas.clock import clock_tick
from streams.config import settings as crm_settings
from streams.pipeline import AlertChanged, SourceRecord, load_customer, process
from streams.rulebooks import load_rulebooks
from tests.factories import event

RULES = load_rulebooks(crm_settings())
START = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
# The BG/NBD parameters of the CDNOW sample, per week: a model as the writer would publish it.
MODEL = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426, "time_unit_days": 7.0, "customers": 2357,
         "log_likelihood": -9582.4}


class Log:
    """One partition of the events topic and a worker folding it."""

    def __init__(self):
        self.records: list[SourceRecord] = []
        self.store: dict = {}
        self.seen: dict = {}
        self.outputs: list = []

    def append(self, key: bytes, value: bytes, at: datetime) -> list:
        record = SourceRecord(key=key, value=value, partition=0, offset=len(self.records),
                              timestamp_ms=int(at.timestamp() * 1000))
        self.records.append(record)
        outputs = process(record, self.store, self.seen, RULES)
        self.outputs += outputs
        return outputs

    def send(self, type_: str, at: datetime, customer: str = "c-1", **fields) -> list:
        body = event(type_, customer, occurred_at=at.isoformat(), **fields)
        return self.append(customer.encode(), orjson.dumps(body), at)

    def tick(self, at: datetime) -> list:
        return self.append(b"clock", clock_tick(0, at), at)

    def ticks(self, start: datetime, days: int) -> None:
        for day in range(1, days + 1):
            self.tick(start + timedelta(days=day))

    def model(self, at: datetime, model_id: str = "cdnow") -> list:
        record = ChurnModelPublished(event_id=uuid.uuid4(), occurred_at=at, partition=0, model_id=model_id, **MODEL)
        return self.append(b"churn-model", orjson.dumps(record.model_dump(mode="json")), at)

    def alerts(self, customer: str = "c-1") -> list[AlertChange]:
        return [AlertChange.model_validate(o.data) for o in self.outputs
                if isinstance(o, AlertChanged) and o.customer_key == customer]


def purchase(total: str = "30.00") -> dict:
    return {"payload": {"order_id": f"o-{uuid.uuid4().hex[:8]}", "currency": "EUR",
                        "lines": [{"sku": "s", "category": "grocery", "quantity": 1, "unit_price": total}]}}


def survey(kind: str, score: int) -> dict:
    return {"payload": {"survey_id": "s-1", "kind": kind, "score": score}}


def consent(channel: str, granted: bool = True) -> dict:
    return {"payload": {"channel": channel, "granted": granted}}


def regular_buyer(log: Log, customer: str = "c-1", every_days: int = 10, purchases: int = 5) -> datetime:
    log.send("customer_registered", START, customer)
    log.send("consent_changed", START, customer, **consent("email"))
    at = START
    for n in range(purchases):
        at = START + timedelta(days=every_days * n)
        log.send("purchase_completed", at, customer, **purchase())
    return at


def test_a_customer_who_drifts_away_is_alerted_when_the_gap_passes_twice_the_median():
    log = Log()
    last = regular_buyer(log)
    log.ticks(last, 19)
    assert log.alerts() == []
    log.ticks(last + timedelta(days=19), 2)
    [opened] = log.alerts()
    assert opened.status == "opened" and opened.alert_type == "churn_risk"
    assert [r.code for r in opened.reasons] == ["purchase_gap"]
    evidence = opened.reasons[0].evidence
    assert evidence["median_gap_days"] == 10.0 and evidence["factor"] == 2.0 and evidence["purchase_days"] == 5
    # The moment the gap first exceeds 20 days, to the millisecond: woken by the partition timers.
    assert opened.occurred_at == last + timedelta(days=20, milliseconds=1)
    assert opened.cause.type == "time"
    assert opened.action.kind == "coupon" and opened.action.channel == "email"


def test_a_drifting_customer_s_alert_is_updated_as_reasons_add_up_and_resolved_by_a_purchase():
    log = Log()
    last = regular_buyer(log)
    log.ticks(last, 70)
    changes = log.alerts()
    assert [c.status for c in changes][:1] == ["opened"]
    assert all(c.alert_id == changes[0].alert_id for c in changes)
    assert [c.version for c in changes] == list(range(1, len(changes) + 1))
    codes = {r.code for r in changes[-1].reasons}
    assert {"purchase_gap", "frequency_falling", "dormant"} <= codes
    came_back = last + timedelta(days=75)
    log.send("purchase_completed", came_back, **purchase())
    resolved = log.alerts()[-1]
    assert resolved.status == "resolved" and resolved.cause.event_type == "purchase_completed"
    assert resolved.occurred_at == came_back and resolved.alert_id == changes[0].alert_id
    assert load_customer(log.store, "c-1").profile.open_alerts == ()


def test_a_complaint_unresolved_for_48_hours_raises_a_bad_experience_alert_until_it_is_resolved():
    log = Log()
    log.send("customer_registered", START)
    filed = START + timedelta(hours=1)
    log.send("complaint_filed", filed, payload={"complaint_id": "k-1", "category": "delivery"})
    log.tick(filed + timedelta(hours=47))
    assert log.alerts() == []
    log.tick(filed + timedelta(hours=49))
    [opened] = log.alerts()
    assert opened.alert_type == "bad_experience" and opened.occurred_at == filed + timedelta(hours=48)
    assert opened.reasons[0].evidence["complaints"] == 1
    log.send("complaint_resolved", filed + timedelta(days=3), payload={"complaint_id": "k-1"})
    resolved = log.alerts()[-1]
    assert (resolved.status, resolved.cause.event_type) == ("resolved", "complaint_resolved")


def test_a_detractor_alert_opens_at_the_answer_and_expires_when_the_answer_ages_out():
    log = Log()
    log.send("customer_registered", START)
    log.send("survey_answered", START + timedelta(days=1), **survey("nps", 3))
    [opened] = log.alerts()
    assert (opened.status, opened.cause.type, opened.cause.event_type) == ("opened", "event", "survey_answered")
    assert opened.reasons[0].evidence["score"] == 3
    log.ticks(START, 40)
    assert [c.status for c in log.alerts()] == ["opened", "expired"]  # open 30 days at most
    # A second detractor answer is a new reason (the first had cleared): a new alert.
    log.send("survey_answered", START + timedelta(days=95), **survey("csat", 1))
    newest = log.alerts()[-1]
    assert newest.status == "opened" and newest.alert_id != opened.alert_id


def test_repeated_refunds_and_a_good_answer_later():
    log = Log()
    log.send("customer_registered", START)
    for n in range(2):
        log.send("purchase_refunded", START + timedelta(days=n + 1),
                 payload={"refund_id": f"r-{n}", "order_id": "o", "currency": "EUR", "amount": "5.00"})
    [opened] = log.alerts()
    assert opened.reasons[0].code == "repeated_refunds" and opened.reasons[0].evidence["refunds"] == 2


def test_the_recommended_action_follows_value_tier_and_consent():
    from streams.churn.alerts import recommended_action
    from streams.profile import CustomerProfile

    version = RULES.churn.versions[-1]
    high = CustomerProfile(customer_key="c", value_tier="high", consent={"marketing:push": [0, 0, True]})
    assert (recommended_action(high, version).kind, recommended_action(high, version).channel) == ("bonus_points", "push")
    called = CustomerProfile(customer_key="c", value_tier="high", consent={"marketing:phone": [0, 0, True]})
    assert recommended_action(called, version).kind == "personal_call"
    withdrawn = CustomerProfile(customer_key="c", value_tier="low", consent={"marketing:email": [0, 0, False]})
    assert recommended_action(withdrawn, version).kind == "none"


def test_the_churn_score_comes_from_the_model_in_the_log_and_falls_with_silence():
    log = Log()
    last = regular_buyer(log)
    assert load_customer(log.store, "c-1").profile.churn_p_alive is None
    log.model(last + timedelta(hours=1))
    log.send("daily_sign_in", last + timedelta(days=1))
    scored = load_customer(log.store, "c-1").profile
    # x = 4 repeat purchase days, t_x = 40 days, T = 41 days, in the model's weeks.
    x, t_x, age = 4, 40 / 7, 41 / 7
    expected = 1 / (1 + MODEL["a"] / (MODEL["b"] + x - 1) * ((MODEL["alpha"] + age) / (MODEL["alpha"] + t_x)) ** (MODEL["r"] + x))
    assert scored.churn_model_id == "cdnow" and scored.churn_p_alive == round(expected, 4)
    assert scored.churn_expected_90d > 0
    log.ticks(last + timedelta(days=1), 200)
    later = load_customer(log.store, "c-1").profile
    assert later.churn_p_alive < 0.3
    assert "low_p_alive" in {r.code for c in log.alerts() for r in c.reasons}


def test_the_model_reaches_customers_through_the_sweep_without_their_events():
    log = Log()
    regular_buyer(log, "c-1")
    regular_buyer(log, "c-2")
    log.model(START + timedelta(days=41))
    log.tick(START + timedelta(days=41, hours=1))
    assert all(load_customer(log.store, c).profile.churn_model_id == "cdnow" for c in ("c-1", "c-2"))


def _random_customer_log(seed: int) -> Log:
    rng = random.Random(seed)
    log = Log()
    customers = [f"c-{n}" for n in range(4)]
    for customer in customers:
        log.send("customer_registered", START, customer)
    at = START
    for _ in range(160):
        at += timedelta(hours=rng.randint(1, 72))
        customer = rng.choice(customers)
        kind = rng.choice(["purchase", "purchase", "tick", "tick", "tick", "complaint", "resolve", "survey", "refund",
                           "session"])
        if kind == "purchase":
            log.send("purchase_completed", at, customer, **purchase())
        elif kind == "tick":
            log.tick(at)
        elif kind == "complaint":
            log.send("complaint_filed", at, customer, payload={"complaint_id": f"k-{rng.randint(0, 3)}", "category": "x"})
        elif kind == "resolve":
            log.send("complaint_resolved", at, customer, payload={"complaint_id": f"k-{rng.randint(0, 3)}"})
        elif kind == "survey":
            log.send("survey_answered", at, customer, **survey("nps", rng.randint(0, 10)))
        elif kind == "refund":
            log.send("purchase_refunded", at, customer,
                     payload={"refund_id": f"r-{rng.random()}", "order_id": "o", "currency": "EUR", "amount": "1.00"})
        else:
            log.send("app_session_started", at, customer, payload={"session_id": f"s-{rng.random()}"})
        if rng.random() < 0.05:
            log.model(at, f"m-{rng.randint(0, 2)}")
    log.ticks(at, 150)
    return log


def test_at_most_one_open_alert_per_customer_and_type_and_versions_without_gaps():
    for seed in range(6):
        log = _random_customer_log(seed)
        open_now: dict[tuple[str, str], str] = {}
        versions: dict[str, int] = {}
        changes = [AlertChange.model_validate(o.data) for o in log.outputs if isinstance(o, AlertChanged)]
        assert changes, "the generated customers raise alerts"
        for change in changes:
            slot = (change.customer_key, change.alert_type)
            alert = str(change.alert_id)
            if change.status == "opened":
                assert slot not in open_now
                open_now[slot] = alert
            else:
                assert open_now.get(slot) == alert
                if change.status in ("resolved", "expired"):
                    del open_now[slot]
            assert change.version == versions.get(alert, 0) + 1
            versions[alert] = change.version
        assert len({c.change_id for c in changes}) == len(changes)


def test_a_replay_and_a_redelivery_give_the_same_alerts():
    log = _random_customer_log(7)
    first = [o.data for o in log.outputs if isinstance(o, AlertChanged)]
    replay = Log()
    for record in log.records:
        replay.outputs += process(record, replay.store, replay.seen, RULES)
    assert [o.data for o in replay.outputs if isinstance(o, AlertChanged)] == first
    # Every record delivered again (a crash before the commit): alert changes are only re-sent,
    # with the same change ids, and no alert opens twice.
    again = [o for record in log.records for o in process(record, replay.store, replay.seen, RULES)]
    resent = {o.data["change_id"] for o in again if isinstance(o, AlertChanged)}
    assert resent <= {change["change_id"] for change in first}


def test_without_ticks_an_event_after_a_deadline_first_raises_what_time_did_then_resolves_it():
    log = Log()
    last = regular_buyer(log)
    back = last + timedelta(days=30)
    log.send("purchase_completed", back, **purchase())
    opened, resolved = log.alerts()
    assert (opened.status, opened.occurred_at, opened.cause.type) == ("opened", last + timedelta(days=20, milliseconds=1), "time")
    assert (resolved.status, resolved.occurred_at, resolved.cause.event_type) == ("resolved", back, "purchase_completed")


def test_a_bad_churn_model_record_is_dead_lettered_and_the_worker_goes_on():
    from streams.pipeline import DeadLetter

    log = Log()
    at = START
    misrouted = ChurnModelPublished(event_id=uuid.uuid4(), occurred_at=at, partition=1, model_id="m", **MODEL)
    [letter] = log.append(b"churn-model", orjson.dumps(misrouted.model_dump(mode="json")), at)
    assert isinstance(letter, DeadLetter) and letter.reason == "misrouted_churn_model"
    invalid = {**misrouted.model_dump(mode="json"), "partition": 0, "r": -1}
    [letter] = log.append(b"churn-model", orjson.dumps(invalid), at)
    assert isinstance(letter, DeadLetter) and letter.reason == "schema_invalid" and "r" in letter.detail
    regular_buyer(log)
    assert load_customer(log.store, "c-1").profile.churn_model_id == ""


def test_a_working_copy_of_the_churn_state_shares_nothing_that_the_fold_changes_in_place():
    from streams.churn.state import ChurnState, OpenAlert

    state = ChurnState([1, 2], 1, 2, 2, {"churn_risk": OpenAlert("a", 1, 5, "high", ["dormant"])}, 1,
                       {"bad_experience": ["nps_detractor"]}, 9)
    copy = state.copy()
    assert copy == state
    copy.open["churn_risk"].version += 1
    copy.open["churn_risk"].codes.append("purchase_gap")
    copy.quiet["bad_experience"].append("csat_low")
    copy.purchase_days.append(3)
    assert state.open["churn_risk"] == OpenAlert("a", 1, 5, "high", ["dormant"])
    assert state.quiet == {"bad_experience": ["nps_detractor"]} and state.purchase_days == [1, 2]
