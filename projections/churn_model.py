"""The churn model: BG/NBD parameters (streams/churn/bgnbd.py) fitted over every customer's purchase
history in `events`, and appended to every partition of the events topic (schemas/alerts.py says
why the log, not a side channel).

Method (docs/churn-score.md):
- as of: the latest `occurred_at` of any event not dated after its receipt, an event time (never
  the wall clock);
- per customer with a purchase at or before then, in days: x = distinct UTC days with a purchase,
  minus one (the first); t_x = last purchase - first purchase; T = as of - first purchase;
- customers kept under an alias that was later linked to a customer are left out: their purchases
  are in `events` again under the customer (docs/identity.md);
- the parameters are fitted by maximum likelihood and rounded to 6 significant digits, so that the
  same history always gives the same record and the same id.
The writer runs this every CRM_CHURN_MODEL_SECONDS; `crm` commands and tests may call it directly."""

from __future__ import annotations

import hashlib
import logging
import uuid
from datetime import UTC, datetime

import numpy as np
import orjson
from clickhouse_connect.driver.client import Client
from kafka import KafkaProducer

from projections.events_table import latest_event_ms
from schemas.alerts import ChurnModelPublished
from streams import topics
from streams.churn import bgnbd

log = logging.getLogger("crm.churn_model")
DAY_MS = 86_400_000
TIME_UNIT_DAYS = 1.0
SIGNIFICANT_DIGITS = 6

# Times stay integer milliseconds until numpy divides them, so the figures are exact up to that one
# division and a test can recompute them bit for bit.
_SUMMARY_SQL = """
SELECT
    toInt64(uniqExact(toDate(occurred_at, 'UTC'))) - 1 AS repeat_days,
    toUnixTimestamp64Milli(max(occurred_at)) - toUnixTimestamp64Milli(min(occurred_at)) AS last_ms,
    {{as_of_ms:Int64}} - toUnixTimestamp64Milli(min(occurred_at)) AS age_ms
FROM {db}.events FINAL
WHERE type = 'purchase_completed'
  AND toUnixTimestamp64Milli(occurred_at) <= {{as_of_ms:Int64}}
  AND customer_key GLOBAL NOT IN (SELECT customer_key FROM {db}.customer_profiles FINAL WHERE merged_into != '')
GROUP BY customer_key
ORDER BY customer_key
"""




def summary(client: Client, database: str, as_of_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, t_x, T) per customer who bought at or before `as_of_ms`, in days, ordered by customer key.
    Purchases after `as_of_ms` are left out, so that t_x <= T."""
    columns = client.query(_SUMMARY_SQL.format(db=database), parameters={"as_of_ms": as_of_ms}).result_columns
    if not columns:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
    repeat_days, last_ms, age_ms = columns
    return (np.asarray(repeat_days, dtype=np.int64), np.asarray(last_ms, dtype=np.int64) / DAY_MS,
            np.asarray(age_ms, dtype=np.int64) / DAY_MS)


def publish(client: Client, database: str, producer: KafkaProducer, last_id: str | None = None,
            min_customers: int = 50) -> str | None:
    """Fit the model as of the latest event and append it to every events partition; returns its id,
    or None when there is nothing to publish: fewer than `min_customers` buyers, a fit that did not
    converge, or the same parameters as `last_id`."""
    as_of_ms = latest_event_ms(client, database)
    if as_of_ms is None:
        return None
    x, t_x, T = summary(client, database, as_of_ms)
    if x.size < min_customers:
        log.info("churn model not fitted: %d customers with purchases, fewer than %d", x.size, min_customers)
        return None
    fitted = bgnbd.fit(x, t_x, T)
    if not fitted.converged:
        log.warning("churn model fit over %d customers did not converge (ended at %s); not published",
                    fitted.customers, fitted.params)
        return None
    params = _rounded(fitted.params)
    as_of = datetime.fromtimestamp(as_of_ms / 1000, UTC)
    content = orjson.dumps([params.r, params.alpha, params.a, params.b, TIME_UNIT_DAYS])
    model_id = f"{as_of:%Y%m%dT%H%M%S}-{hashlib.blake2b(content, digest_size=4).hexdigest()}"
    if last_id is not None and last_id.split("-")[-1] == model_id.split("-")[-1]:
        return None
    log_likelihood = round(fitted.log_likelihood, 3)
    for partition in range(topics.EVENT_PARTITIONS):
        record = ChurnModelPublished(event_id=uuid.uuid4(), occurred_at=as_of, partition=partition,
                                     model_id=model_id, r=params.r, alpha=params.alpha, a=params.a, b=params.b,
                                     time_unit_days=TIME_UNIT_DAYS, customers=fitted.customers,
                                     log_likelihood=log_likelihood)
        producer.send(topics.EVENTS.name, key=b"churn-model", value=orjson.dumps(record.model_dump(mode="json")),
                      partition=partition)
    producer.flush()
    log.info("published churn model %s over %d customers (r=%s alpha=%s a=%s b=%s, log-likelihood %s)", model_id,
             fitted.customers, params.r, params.alpha, params.a, params.b, log_likelihood)
    return model_id


def _rounded(params: bgnbd.Params) -> bgnbd.Params:
    """To 6 significant digits: far finer than the fit's own uncertainty, and coarse enough that the
    last bits of the optimizer never change the record or its id."""
    return bgnbd.Params(*(float(f"{value:.{SIGNIFICANT_DIGITS}g}")
                          for value in (params.r, params.alpha, params.a, params.b)))
