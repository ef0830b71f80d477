"""Churn alerts and churn models, for SQL (docs/alerts-sql.md):

`churn_alerts`, from crm.alerts: every state change of every alert (schemas/alerts.py AlertChange),
one row each. Keyed (customer_key, alert_id, version): an alert's versions number its changes 1, 2,
3… and a re-sent change (same `change_id`) always has the same content, so it collapses into its
row (ReplacingMergeTree). Analysts look alerts up by customer and follow one alert through its
changes; the latest state of an alert is its highest version (`argMax(column, version) ... GROUP BY
alert_id`, or `ORDER BY version DESC LIMIT 1 BY alert_id`), over FINAL.

`churn_models`, from crm.churn-models: every BG/NBD model the worker put in force, keyed by its id
(profiles and alerts name it in `model_id`).

Neither table records the Kafka position of its rows: both topics are derived, and a rebuild
(projections/replay.py) feeds the row makers the same records without positions, so a position
would make the rebuilt rows differ from the live ones. A record that does not read as the contract
says is skipped with a warning instead of stopping the writer (which would fail on the same batch
again after every restart); the contract is checked by the models in schemas/alerts.py."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel

from schemas.alerts import AlertChange, ChurnModelPublished

log = logging.getLogger("crm.writer")

MIGRATIONS = [
    (15, """
CREATE TABLE IF NOT EXISTS {db}.churn_alerts
(
    change_id               UUID COMMENT 'unique per change and stable across re-sends',
    alert_id                UUID COMMENT 'the alert, across its changes',
    version                 UInt32 COMMENT '1 when opened, then one more per change of the alert',
    status                  LowCardinality(String) COMMENT 'opened, updated, resolved or expired',
    alert_type              LowCardinality(String) COMMENT 'churn_risk, bad_experience, points_expiring or tier_at_risk',
    customer_key            String,
    customer_id             Nullable(String),
    severity                LowCardinality(String) COMMENT 'low, medium, high or critical, as of this change',
    severity_score          Float64 COMMENT 'reason weights times the customer''s value weight',
    reason_codes            Array(LowCardinality(String)) COMMENT 'the indicators that held, as of this change',
    reasons                 String COMMENT 'JSON array of the reasons, each with its code and evidence (the numbers behind it)',
    action_kind             LowCardinality(String) COMMENT 'coupon, bonus_points, personal_call or none',
    action_channel          LowCardinality(String) COMMENT 'a channel the customer consented to; empty when no action',
    action_note             String,
    value_tier              LowCardinality(String) COMMENT 'the customer''s value tier at this change; empty when none',
    segments                Array(LowCardinality(String)) COMMENT 'dimension:segment, e.g. value_tier:high',
    store_id                LowCardinality(String) COMMENT 'the customer''s favourite store; empty when none',
    p_alive                 Nullable(Float64) COMMENT 'BG/NBD probability the customer is still active; NULL without a model',
    expected_purchases_90d  Nullable(Float64) COMMENT 'BG/NBD expected purchases in the next 90 days',
    model_id                LowCardinality(String) COMMENT 'the churn_models row the score comes from; empty when none',
    opened_at               DateTime64(3, 'UTC') COMMENT 'event time the alert was opened (the same on every change)',
    occurred_at             DateTime64(3, 'UTC') COMMENT 'event time of this change',
    cause_type              LowCardinality(String) COMMENT 'event, time or model',
    cause_event_id          String COMMENT 'the causing event; empty when time or a model caused it',
    cause_event_type        LowCardinality(String) COMMENT 'the causing event''s type, e.g. purchase_completed',
    rules_version           LowCardinality(String) COMMENT 'the churn rules version in force'
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_key, alert_id, version)
"""),
    (16, """
CREATE TABLE IF NOT EXISTS {db}.churn_models
(
    model_id        String,
    occurred_at     DateTime64(3, 'UTC') COMMENT 'the event time the purchase history was fitted up to',
    r               Float64 COMMENT 'BG/NBD: shape of the gamma distribution of purchase rates',
    alpha           Float64 COMMENT 'BG/NBD: scale of the gamma distribution of purchase rates',
    a               Float64 COMMENT 'BG/NBD: first shape of the beta distribution of drop-out probabilities',
    b               Float64 COMMENT 'BG/NBD: second shape of the beta distribution of drop-out probabilities',
    time_unit_days  Float64 COMMENT 'the parameters'' unit of time, in days',
    customers       UInt64 COMMENT 'customers with a purchase that the fit saw',
    log_likelihood  Float64 COMMENT 'of the fit'
)
ENGINE = ReplacingMergeTree
ORDER BY model_id
"""),
]

COLUMNS = [
    "change_id", "alert_id", "version", "status", "alert_type", "customer_key", "customer_id", "severity",
    "severity_score", "reason_codes", "reasons", "action_kind", "action_channel", "action_note", "value_tier",
    "segments", "store_id", "p_alive", "expected_purchases_90d", "model_id", "opened_at", "occurred_at",
    "cause_type", "cause_event_id", "cause_event_type", "rules_version",
]
MODEL_COLUMNS = ["model_id", "occurred_at", "r", "alpha", "a", "b", "time_unit_days", "customers", "log_likelihood"]

M = TypeVar("M", bound=BaseModel)


def rows(records: Iterable[Any]) -> dict[str, list[list[Any]]]:
    """Rows for churn_alerts from records of crm.alerts."""
    return {"churn_alerts": [_alert_row(change) for change in _read(records, AlertChange)]}


def model_rows(records: Iterable[Any]) -> dict[str, list[list[Any]]]:
    """Rows for churn_models from records of crm.churn-models (ChurnModelPublished without its
    `partition`, which only says where the model entered the events log)."""
    return {"churn_models": [_model_row(model) for model in _read(records, ChurnModelPublished,
                                                                  defaults={"partition": 0})]}


def _read(records: Iterable[Any], model: type[M], defaults: dict[str, Any] | None = None) -> Iterable[M]:
    """Each record's value as `model`; records that are not one are logged and skipped. Fields the
    model does not know are ignored at the top level (a newer producer may add some)."""
    known = set(model.model_fields)
    for record in records:
        value = getattr(record, "value", None)
        if value is None:
            continue  # a tombstone of a compacted topic: nothing to project
        try:
            data = orjson.loads(value)
            if not isinstance(data, dict):
                raise TypeError(f"top level is {type(data).__name__}, expected an object")
            parsed = model.model_validate({**(defaults or {}), **{k: v for k, v in data.items() if k in known}})
        except Exception as exc:  # noqa: BLE001 - an unreadable record is skipped, never fatal
            log.warning("skipped a record of %s partition %s offset %s that is not a %s: %s",
                        getattr(record, "topic", "?"), getattr(record, "partition", "?"),
                        getattr(record, "offset", "?"), model.__name__, str(exc).replace("\n", " ")[:500])
            continue
        yield parsed


def _alert_row(change: AlertChange) -> list[Any]:
    reasons = orjson.dumps([reason.model_dump(mode="json") for reason in change.reasons],
                           option=orjson.OPT_SORT_KEYS).decode()
    values: dict[str, Any] = {
        "change_id": change.change_id, "alert_id": change.alert_id, "version": change.version,
        "status": change.status.value, "alert_type": change.alert_type.value,
        "customer_key": change.customer_key, "customer_id": change.customer_id,
        "severity": change.severity.value, "severity_score": change.severity_score,
        "reason_codes": [reason.code for reason in change.reasons], "reasons": reasons,
        "action_kind": change.action.kind, "action_channel": change.action.channel or "",
        "action_note": change.action.note, "value_tier": change.value_tier, "segments": list(change.segments),
        "store_id": change.store_id, "p_alive": change.p_alive,
        "expected_purchases_90d": change.expected_purchases_90d, "model_id": change.model_id,
        "opened_at": change.opened_at.astimezone(UTC), "occurred_at": change.occurred_at.astimezone(UTC),
        "cause_type": change.cause.type, "cause_event_id": change.cause.event_id,
        "cause_event_type": change.cause.event_type, "rules_version": change.rules_version,
    }
    return [values[name] for name in COLUMNS]


def _model_row(model: ChurnModelPublished) -> list[Any]:
    return [model.occurred_at.astimezone(UTC) if name == "occurred_at" else getattr(model, name)
            for name in MODEL_COLUMNS]
