"""The alert projections (projections/alerts_table.py), the `alert_funnel` view and every query of
docs/alerts-sql.md, on known alerts: six customers' alerts, built with the contract
(schemas/alerts.py) and written through the projection writer's own row makers, some changes
twice, with merges stopped so that the copies are really there. The expected figures are worked
out by hand from the alerts below, not read from the output.

The rows go into a database of their own in the session's ClickHouse (the embedded engine allows
one data directory per process, which the `stack` fixture owns), so that no other test sees them
and the rebuild test (test_replay.py), which compares rebuilt tables with the live ones, is not
confused by rows that no log holds."""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from projections import alerts_table, profiles_table
from projections.clickhouse import connect
from projections.migrations import migrate
from projections.replay import TABLES, Record
from projections.writer import COLUMNS, SINKS
from schemas.alerts import Action, AlertChange, Cause, ChurnModelPublished, Reason
from streams import topics
from streams.profile import CustomerProfile

DOC = Path(__file__).resolve().parents[2] / "docs" / "alerts-sql.md"
NAMESPACE = uuid.UUID("5b0c4a51-9a43-4a8e-bc3e-6f4d1e2a7c10")


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class Alert:
    """One alert of one customer; `change` makes its next AlertChange."""

    def __init__(self, customer: str, alert_type: str, store: str, opened_at: str):
        self.customer, self.alert_type, self.store = customer, alert_type, store
        self.alert_id = uuid.uuid5(NAMESPACE, customer + alert_type)
        self.opened_at = _at(opened_at)
        self.changes: list[AlertChange] = []

    def change(self, status: str, at: str, severity: str, score: float, reasons: list[str],
               cause: tuple[str, str] = ("time", ""), p_alive: float | None = None) -> AlertChange:
        version = len(self.changes) + 1
        cause_type, event_type = cause
        change = AlertChange(
            change_id=uuid.uuid5(self.alert_id, str(version)), alert_id=self.alert_id, version=version,
            status=status, alert_type=self.alert_type, customer_key=self.customer, customer_id=self.customer,
            severity=severity, severity_score=score,
            reasons=[Reason(code=code, evidence={"weight": 10, "days": version}) for code in reasons],
            action=Action(kind="coupon", channel="email", note="mid value") if status in ("opened", "updated")
            else Action(kind="none"),
            value_tier="mid", segments=["value_tier:mid", "lifecycle:dormant"], store_id=self.store,
            p_alive=p_alive, expected_purchases_90d=None if p_alive is None else round(p_alive * 2, 3),
            model_id="" if p_alive is None else "m-2025-01", opened_at=self.opened_at, occurred_at=_at(at),
            cause=Cause(type=cause_type, event_id=str(uuid.uuid4()) if cause_type == "event" else "",
                        event_type=event_type),
            rules_version="2026-11",
        )
        self.changes.append(change)
        return change


def _alerts() -> dict[str, Alert]:
    a = Alert("alerts-a", "churn_risk", "store-1", "2025-01-10 10:00:00")
    a.change("opened", "2025-01-10 10:00:00", "high", 60, ["purchase_gap", "frequency_falling"], p_alive=0.25)
    a.change("updated", "2025-01-12 10:00:00", "critical", 90, ["purchase_gap", "frequency_falling", "dormant"],
             p_alive=0.2)
    # Won back: a purchase 10 days (240 hours) after the opening.
    a.change("resolved", "2025-01-20 10:00:00", "critical", 90, [], ("event", "purchase_completed"), p_alive=0.6)
    b = Alert("alerts-b", "churn_risk", "store-1", "2025-01-10 12:00:00")
    b.change("opened", "2025-01-10 12:00:00", "high", 45, ["dormant"], p_alive=0.05)
    b.change("expired", "2025-04-10 12:00:00", "high", 45, ["dormant"], p_alive=0.05)
    c = Alert("alerts-c", "bad_experience", "store-2", "2025-01-11 09:00:00")
    c.change("opened", "2025-01-11 09:00:00", "medium", 35, ["complaint_unresolved"])
    # Resolved by a purchase, but after 40 days (960 hours): no win-back.
    d = Alert("alerts-d", "churn_risk", "store-2", "2025-01-10 08:00:00")
    d.change("opened", "2025-01-10 08:00:00", "high", 50, ["purchase_gap"], p_alive=0.28)
    d.change("resolved", "2025-02-19 08:00:00", "high", 50, [], ("event", "purchase_completed"), p_alive=0.7)
    # Resolved after 12 hours, by something other than a purchase.
    e = Alert("alerts-e", "bad_experience", "store-2", "2025-01-11 15:00:00")
    e.change("opened", "2025-01-11 15:00:00", "medium", 30, ["nps_detractor", "complaint_unresolved"], p_alive=0.9)
    e.change("resolved", "2025-01-12 03:00:00", "medium", 30, [], ("event", "complaint_resolved"), p_alive=0.9)
    # Opened low, updated to medium, still open; no favourite store.
    f = Alert("alerts-f", "churn_risk", "", "2025-02-03 07:30:00")
    f.change("opened", "2025-02-03 07:30:00", "low", 15, ["activity_falling"], p_alive=0.55)
    f.change("updated", "2025-02-05 07:30:00", "medium", 22.5, ["activity_falling", "purchase_gap"], p_alive=0.4)
    return {alert.customer[-1]: alert for alert in (a, b, c, d, e, f)}


def _value(change: AlertChange) -> bytes:
    return orjson.dumps(change.model_dump(mode="json", exclude_none=True))


def _model(model_id: str, fitted_to: str, customers: int, r: float) -> bytes:
    model = ChurnModelPublished(event_id=uuid.uuid5(NAMESPACE, model_id), occurred_at=_at(fitted_to), partition=3,
                                model_id=model_id, r=r, alpha=4.5, a=0.8, b=2.4, customers=customers,
                                log_likelihood=-1234.5)
    data = model.model_dump(mode="json")
    del data["partition"]  # as crm.churn-models carries it
    return orjson.dumps(data)


def _profile(key: str, version: int, **churn: Any) -> bytes:
    record = CustomerProfile(customer_key=key, customer_id=None if ":" in key else key, version=version, last_offset=version,
                             first_seen_ms=1_735_000_000_000, last_seen_ms=1_738_000_000_000,
                             clock_ms=1_738_000_000_000, merged_into=churn.pop("merged_into", "")).to_record()
    for name in ("churn_p_alive", "churn_expected_90d", "churn_model_id", "open_alerts"):
        record.pop(name, None)
    record.update(churn)
    return orjson.dumps(record)


def _write(client: Any, database: str, topic: str, values: list[bytes]) -> None:
    """What ProjectionWriter.write does with one topic's batch."""
    records = [Record(topic, 0, offset, None, value, []) for offset, value in enumerate(values)]
    for table, rows in SINKS[topic](records).items():
        if rows:
            client.insert(f"{database}.{table}", rows, column_names=COLUMNS[table])


def _documented_queries() -> dict[str, str]:
    """docs/alerts-sql.md: each ```sql block, by its first line's comment."""
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    queries = {}
    for block in blocks:
        title = re.match(r"-- (.+)\n", block)
        assert title, f"a query in docs/alerts-sql.md without a title comment: {block[:80]}"
        queries[title.group(1).strip()] = block
    assert len(queries) == len(blocks), "two queries in docs/alerts-sql.md share a title"
    return queries


@pytest.fixture
def database(stack):
    """A fresh database with every migration applied, in the session's ClickHouse."""
    name = f"alerts_sql_{uuid.uuid4().hex[:10]}"
    client = connect(dataclasses.replace(stack.settings, clickhouse_database=name))
    migrate(client, name)
    try:
        yield client, name
    finally:
        client.command(f"DROP DATABASE IF EXISTS {name}")
        client.close()


def test_the_documented_queries_and_the_funnel_give_the_known_figures(database):
    client, db = database
    for table in ("churn_alerts", "churn_models", "customer_profiles"):
        client.command(f"SYSTEM STOP MERGES {db}.{table}")  # so that re-sent copies stay copies
    alerts = _alerts()
    changes = [change for alert in alerts.values() for change in alert.changes]
    a, b, d = alerts["a"], alerts["b"], alerts["d"]
    # The alerts as the worker sends them, then re-sends: within one batch, and in a later one.
    _write(client, db, topics.ALERTS.name, [_value(change) for change in changes] + [_value(a.changes[0])])
    resent = [a.changes[2], b.changes[1], *d.changes]
    _write(client, db, topics.ALERTS.name, [_value(change) for change in resent])
    _write(client, db, topics.CHURN_MODELS.name, [_model("m-2025-01", "2025-01-01 00:00:00", 500, 0.25)])
    _write(client, db, topics.CHURN_MODELS.name, [_model("m-2025-02", "2025-02-01 00:00:00", 640, 0.3),
                                                  _model("m-2025-01", "2025-01-01 00:00:00", 500, 0.25)])
    # Profiles: alerts-a's first snapshot is replaced by a newer one; one snapshot from before the
    # churn fields existed; a profile kept under an alias that was linked (left out).
    _write(client, db, topics.PROFILES.name, [_profile("alerts-a", 5, churn_p_alive=0.85, churn_expected_90d=1.2,
                                                       churn_model_id="m-2025-01", open_alerts=["churn_risk"])])
    _write(client, db, topics.PROFILES.name, [
        _profile("alerts-a", 9, churn_p_alive=0.15, churn_expected_90d=0.2, churn_model_id="m-2025-02", open_alerts=[]),
        _profile("alerts-c", 3, churn_p_alive=0.62, churn_expected_90d=0.9, churn_model_id="m-2025-02",
                 open_alerts=["bad_experience"]),
        _profile("alerts-f", 4, churn_p_alive=0.18, churn_expected_90d=0.1, churn_model_id="m-2025-02",
                 open_alerts=["churn_risk"]),
        _profile("alerts-old", 2),
        _profile("loyalty_card:alerts-x", 2, churn_p_alive=0.95, churn_expected_90d=3.0, churn_model_id="m-2025-02",
                 open_alerts=["churn_risk"], merged_into="alerts-f"),
    ])

    def query(sql: str) -> list[tuple]:
        return client.query(sql).result_rows

    # --- the tables: copies present before FINAL, one row per change after it ---------------------
    # A copy within one insert is collapsed by the insert itself (ClickHouse's optimize_on_insert);
    # the copies of a later batch stay until parts merge.
    assert query("SELECT count() FROM churn_alerts") == [(len(changes) + len(resent),)]
    assert query("SELECT count(), uniqExact(change_id) FROM churn_alerts FINAL") == [(len(changes), len(changes))]
    assert query("SELECT count() FROM churn_models FINAL") == [(2,)]
    row = query("SELECT status, severity, reason_codes, reasons, action_kind, action_channel, segments, store_id, "
                "p_alive, expected_purchases_90d, model_id, toString(opened_at), toString(occurred_at), cause_type, "
                f"cause_event_type, rules_version, customer_id FROM churn_alerts FINAL "
                f"WHERE alert_id = '{a.alert_id}' AND version = 2")
    assert row == [("updated", "critical", ["purchase_gap", "frequency_falling", "dormant"],
                    orjson.dumps([{"code": code, "evidence": {"days": 2, "weight": 10}}
                                  for code in ("purchase_gap", "frequency_falling", "dormant")]).decode(),
                    "coupon", "email", ["value_tier:mid", "lifecycle:dormant"], "store-1", 0.2, 0.4, "m-2025-01",
                    "2025-01-10 10:00:00.000", "2025-01-12 10:00:00.000", "time", "", "2026-11", "alerts-a")]
    assert query(f"SELECT action_kind, action_channel, cause_type, cause_event_type, length(cause_event_id) "
                 f"FROM churn_alerts FINAL WHERE alert_id = '{a.alert_id}' AND version = 3") == [
        ("none", "", "event", "purchase_completed", 36)]
    assert query("SELECT p_alive, model_id FROM churn_alerts FINAL WHERE customer_key = 'alerts-c'") == [(None, "")]
    assert query("SELECT customer_key, churn_p_alive, churn_expected_90d, churn_model_id, open_alerts "
                 "FROM customer_profiles FINAL ORDER BY customer_key") == [
        ("alerts-a", 0.15, 0.2, "m-2025-02", []),
        ("alerts-c", 0.62, 0.9, "m-2025-02", ["bad_experience"]),
        ("alerts-f", 0.18, 0.1, "m-2025-02", ["churn_risk"]),
        ("alerts-old", None, None, "", []),  # a snapshot from before the churn fields: the defaults
        ("loyalty_card:alerts-x", 0.95, 3.0, "m-2025-02", ["churn_risk"]),
    ]

    # --- every documented query ----------------------------------------------------------------------
    queries = _documented_queries()
    expected: dict[str, list[tuple]] = {
        # Reasons at opening only (alerts-a's later `dormant` does not count); alerts-e has two.
        "Alerts opened per store and reason": [
            ("store-2", "complaint_unresolved", 2), ("", "activity_falling", 1), ("store-1", "dormant", 1),
            ("store-1", "frequency_falling", 1), ("store-1", "purchase_gap", 1), ("store-2", "nps_detractor", 1),
            ("store-2", "purchase_gap", 1)],
        # churn_risk: a after 240 h, d after 960 h: median 600, p90 240 + 0.9 × 720 = 888.
        # bad_experience: e after 12 h.
        "Time to resolution per alert type": [("bad_experience", 1, 12.0, 12.0), ("churn_risk", 2, 600.0, 888.0)],
        # January: churn_risk a, b, d (a won back), bad_experience c, e; February: f.
        "Win-back rate per alert type and month": [
            (date(2025, 1, 1), "bad_experience", 2, 0, 0.0), (date(2025, 1, 1), "churn_risk", 3, 1, 0.3333),
            (date(2025, 2, 1), "churn_risk", 1, 0, 0.0)],
        # At opening: b 0.05; a 0.25, d 0.28; f 0.55; e 0.9; c none.
        "P(alive) when alerts were opened": [(0.0, 1), (0.2, 2), (0.5, 1), (0.9, 1)],
        # At opening: f 15; e 30, c 35; b 45; d 50; a 60.
        "Severity score when alerts were opened": [(10.0, 1), (30.0, 2), (40.0, 1), (50.0, 1), (60.0, 1)],
        # a's newest snapshot 0.15 and f 0.18; c 0.62; the old snapshot unscored, the alias left out.
        "P(alive) of customers now": [(0.1, 2), (0.6, 1)],
        # c opened, f updated to medium; a, b, d, e ended.
        "Open alerts per type and severity": [("bad_experience", "medium", 1, alerts["c"].opened_at),
                                              ("churn_risk", "medium", 1, alerts["f"].opened_at)],
        "Customers with an open alert per type": [("bad_experience", 1), ("churn_risk", 1)],
        # By opening day and the severity opened with (a was opened high, later critical).
        "The alert funnel": [
            (date(2025, 1, 10), "churn_risk", "high", 3, 0, 1, 2, 1, 1, 0.3333, 600.0),
            (date(2025, 1, 11), "bad_experience", "medium", 2, 1, 0, 1, 0, 0, 0.0, 12.0),
            (date(2025, 2, 3), "churn_risk", "low", 1, 1, 1, 0, 0, 0, 0.0, None)],
        "Churn models in force over time": [
            ("m-2025-01", _at("2025-01-01 00:00:00"), 500, 0.25, 4.5, 0.8, 2.4, 1.0, -1234.5),
            ("m-2025-02", _at("2025-02-01 00:00:00"), 640, 0.3, 4.5, 0.8, 2.4, 1.0, -1234.5)],
    }
    assert set(queries) == set(expected), "every query in docs/alerts-sql.md is checked here"
    for title, sql in queries.items():
        assert _comparable(query(sql)) == _comparable(expected[title]), title
    assert "alert_funnel" in queries["The alert funnel"]

    # The funnel is the same with merges done (copies collapsed on disk rather than by FINAL).
    funnel = query(queries["The alert funnel"])
    client.command(f"SYSTEM START MERGES {db}.churn_alerts")
    client.command(f"OPTIMIZE TABLE {db}.churn_alerts FINAL")
    assert query("SELECT count() FROM churn_alerts") == [(len(changes),)]
    assert query(queries["The alert funnel"]) == funnel


def _comparable(rows: list[tuple]) -> list[tuple]:
    """Times as naive UTC (the client may return either), floats rounded past their noise."""
    def one(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
        if isinstance(value, float):
            return round(value, 9)
        return value
    return [tuple(one(value) for value in row) for row in rows]


def test_the_writer_and_the_rebuild_know_the_alert_tables():
    assert SINKS[topics.ALERTS.name] is alerts_table.rows
    assert SINKS[topics.CHURN_MODELS.name] is alerts_table.model_rows
    assert COLUMNS["churn_alerts"] == alerts_table.COLUMNS and COLUMNS["churn_models"] == alerts_table.MODEL_COLUMNS
    assert {"churn_alerts", "churn_models"} <= set(TABLES)
    assert {"churn_p_alive", "churn_expected_90d", "churn_model_id", "open_alerts"} <= set(profiles_table.COLUMNS)


def test_records_that_are_not_alerts_are_skipped_not_fatal(caplog):
    good = _alerts()["a"].changes[0]
    wrong_type = orjson.loads(_value(good)) | {"severity_score": "very"}
    bad_status = orjson.loads(_value(good)) | {"status": "snoozed"}
    missing = orjson.loads(_value(good))
    del missing["alert_id"]
    newer = orjson.loads(_value(good)) | {"delivered_to": ["webhook"]}  # a field this writer does not know
    values = [b"not json", b"[1, 2]", b"null", b"{}", orjson.dumps(wrong_type), orjson.dumps(bad_status),
              orjson.dumps(missing), _value(good), orjson.dumps(newer), b"\xff\xfe"]
    records = [Record(topics.ALERTS.name, 2, offset, b"alerts-a", value, []) for offset, value in enumerate(values)]
    records.append(Record(topics.ALERTS.name, 2, len(values), b"alerts-a", None, []))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="crm.writer"):
        made = alerts_table.rows(records)
    assert list(made) == ["churn_alerts"]
    assert [row[0] for row in made["churn_alerts"]] == [good.change_id, good.change_id]
    assert len(made["churn_alerts"][0]) == len(alerts_table.COLUMNS)
    skipped = [r.getMessage() for r in caplog.records if "skipped a record" in r.getMessage()]
    assert len(skipped) == 8 and all(f"{topics.ALERTS.name} partition 2" in message for message in skipped)
    assert "offset 5" in skipped[5]

    model = _model("m-1", "2025-01-01 00:00:00", 10, 0.5)
    zero_rate = orjson.loads(model) | {"r": 0}
    made = alerts_table.model_rows([Record(topics.CHURN_MODELS.name, 0, offset, b"m-1", value, [])
                                    for offset, value in enumerate([b"{", orjson.dumps(zero_rate), model])])
    assert [row[0] for row in made["churn_models"]] == ["m-1"]
    assert made["churn_models"][0][1] == _at("2025-01-01 00:00:00")
