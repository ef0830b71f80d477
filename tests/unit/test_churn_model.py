"""The churn model's publication (projections/churn_model.py) over a real `events` table: created by
the project's own `connect` and `migrate` in an embedded chdb, filled with purchases of about 300
customers simulated from known BG/NBD parameters (in days), then summarised and published to a
recording producer.

chdb allows one engine per process, and an integration test of the same session may hold one, so
the ClickHouse part runs in a process of its own (like tests/unit/test_cluster_ddl.py): it prints
what it saw as JSON, and the checks run here."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from numpy.random import PCG64, Generator

from schemas.alerts import ChurnModelPublished
from streams import topics
from streams.churn import bgnbd
from streams.churn.bgnbd import Params
from tests.unit.test_bgnbd import simulate_purchase_times

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DAY_MS = 86_400_000
START_MS = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)
TRUE_PARAMS = Params(r=0.9, alpha=25.0, a=0.6, b=2.5)  # in days: a purchase every month or so
MERGED_ALIAS = "loyalty_card:LC-merged"


def _purchases(customers: int = 300, seed: int = 11) -> dict[str, list[int]]:
    """Purchase times (ms) by customer key: first purchases spread over a year, repeat purchases
    simulated up to the end of that year (so two of them may fall on one day, and count once)."""
    rng = Generator(PCG64(seed))
    first_days = rng.uniform(0, 300, customers)
    first_ms = START_MS + np.round(first_days * DAY_MS).astype(np.int64)
    ages = 365.0 - first_days
    repeats = simulate_purchase_times(TRUE_PARAMS, ages, seed)
    return {f"cust-{n:04d}": [int(first)] + [int(first + round(time * DAY_MS)) for time in times]
            for n, (first, times) in enumerate(zip(first_ms, repeats))}


def _expected_summary(purchases: dict[str, list[int]], as_of_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What `summary` should return, computed here from the raw times, ordered by customer key."""
    keys = sorted(key for key, times in purchases.items() if min(times) <= as_of_ms)
    x, last, age = [], [], []
    for key in keys:
        times = [time for time in purchases[key] if time <= as_of_ms]
        x.append(len({time // DAY_MS for time in times}) - 1)  # distinct UTC days
        last.append(max(times) - min(times))
        age.append(as_of_ms - min(times))
    return np.array(x, dtype=np.int64), np.array(last, dtype=np.int64) / DAY_MS, np.array(age, dtype=np.int64) / DAY_MS


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.flushes = 0

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, partition: int | None = None):
        self.sent.append({"topic": topic, "key": key.decode(), "value": value.decode(), "partition": partition})

    def flush(self) -> None:
        self.flushes += 1


def _in_own_process(state_dir: str, purchases_file: str) -> None:
    """The ClickHouse side, run in a child process (see the module docstring)."""
    import os
    import uuid

    from projections import churn_model
    from projections.clickhouse import connect
    from projections.migrations import migrate
    from streams.config import Settings

    purchases = json.loads(Path(purchases_file).read_text())["purchases"]
    client = connect(Settings(state_dir=Path(state_dir), clickhouse_dsn=None, clickhouse_database="crm"))
    migrate(client, "crm")

    def at(ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, UTC)

    rows = [[uuid.uuid4(), "purchase_completed", key, at(ms), at(ms)] for key, times in purchases.items() for ms in times]
    # Not purchases: a later page view sets "as of", a registration is no purchase at all.
    latest = max(ms for times in purchases.values() for ms in times)
    as_of_ms = latest + 3 * DAY_MS
    rows.append([uuid.uuid4(), "product_viewed", "cust-0000", at(as_of_ms), at(as_of_ms)])
    rows.append([uuid.uuid4(), "customer_registered", "cust-never-bought", at(START_MS), at(START_MS)])
    # A purchase kept under an alias since linked to a customer: in `events` again under the customer.
    rows.append([uuid.uuid4(), "purchase_completed", MERGED_ALIAS, at(START_MS), at(START_MS)])
    client.insert("crm.customer_profiles", [[MERGED_ALIAS, 1, "cust-0001"]],
                  column_names=["customer_key", "version", "merged_into"])
    # A producer's wrong clock: an event dated 2199, received at the start. It must not move the as-of time.
    rows.append([uuid.uuid4(), "daily_sign_in", "cust-wrong-clock", datetime(2199, 1, 1, tzinfo=UTC), at(START_MS)])
    columns = ["event_id", "type", "customer_key", "occurred_at", "received_at"]
    client.insert("crm.events", rows, column_names=columns)
    client.insert("crm.events", rows[:25], column_names=columns)  # a writer's re-insert: FINAL collapses it

    x, t_x, T = churn_model.summary(client, "crm", as_of_ms)
    early_ms = START_MS + 100 * DAY_MS
    early = churn_model.summary(client, "crm", early_ms)
    first, second, few = RecordingProducer(), RecordingProducer(), RecordingProducer()
    first_id = churn_model.publish(client, "crm", first)
    second_id = churn_model.publish(client, "crm", second, last_id=first_id)
    too_few_id = churn_model.publish(client, "crm", few, min_customers=10_000)
    result = {
        "latest_event_ms": churn_model.latest_event_ms(client, "crm"), "as_of_ms": as_of_ms,
        "summary": [x.tolist(), t_x.tolist(), T.tolist()], "early_ms": early_ms,
        "early": [column.tolist() for column in early],
        "first_id": first_id, "first_sent": first.sent, "first_flushes": first.flushes,
        "second_id": second_id, "second_sent": second.sent, "too_few_id": too_few_id, "too_few_sent": few.sent,
    }
    print(json.dumps(result), flush=True)
    os._exit(0)  # skip chdb's shutdown: the result is out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[int]], dict]:
    pytest.importorskip("chdb")
    work = tmp_path_factory.mktemp("churn-model")
    purchases = _purchases()
    (work / "purchases.json").write_text(json.dumps({"purchases": purchases}))
    code = ("import sys; from tests.unit.test_churn_model import _in_own_process; "
            "_in_own_process(sys.argv[1], sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", code, str(work / "state"), str(work / "purchases.json")],
                          check=False, capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the chdb process: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    return purchases, json.loads(lines[-1])


def test_as_of_is_the_latest_event_of_any_type(run):
    _, result = run
    assert result["latest_event_ms"] == result["as_of_ms"]


def test_the_summary_is_what_the_purchases_say(run):
    purchases, result = run
    x, t_x, T = (np.array(column) for column in result["summary"])
    expected_x, expected_t_x, expected_T = _expected_summary(purchases, result["as_of_ms"])
    assert x.size == len(purchases) == 300  # no alias kept under a link, no registration without purchase
    assert np.array_equal(x, expected_x)
    assert np.array_equal(t_x, expected_t_x)
    assert np.array_equal(T, expected_T)
    assert x.sum() > 300  # the simulation bought more than once per customer on average
    # Some customers bought twice on a day: x counts days, not purchases.
    assert x.sum() < sum(len(times) - 1 for times in purchases.values())


def test_the_summary_as_of_an_earlier_time_leaves_out_what_came_after(run):
    purchases, result = run
    x, t_x, T = (np.array(column) for column in result["early"])
    expected_x, expected_t_x, expected_T = _expected_summary(purchases, result["early_ms"])
    assert 0 < x.size < len(purchases)
    assert np.array_equal(x, expected_x) and np.array_equal(t_x, expected_t_x) and np.array_equal(T, expected_T)
    assert np.all(t_x <= T)


def test_publish_appends_the_fitted_model_to_every_partition(run):
    purchases, result = run
    sent = result["first_sent"]
    assert [record["partition"] for record in sent] == list(range(topics.EVENT_PARTITIONS))
    assert {record["topic"] for record in sent} == {topics.EVENTS.name}
    assert {record["key"] for record in sent} == {"churn-model"}
    assert result["first_flushes"] == 1
    models = [ChurnModelPublished.model_validate_json(record["value"]) for record in sent]
    assert [model.partition for model in models] == list(range(topics.EVENT_PARTITIONS))
    assert len({model.event_id for model in models}) == topics.EVENT_PARTITIONS
    as_of = datetime.fromtimestamp(result["as_of_ms"] / 1000, UTC)
    fitted = bgnbd.fit(*_expected_summary(purchases, result["as_of_ms"]))
    for model in models:
        assert model.model_id == result["first_id"]
        assert model.model_id.startswith(f"{as_of:%Y%m%dT%H%M%S}-")
        assert model.occurred_at == as_of
        assert model.time_unit_days == 1.0
        assert model.customers == 300
        # The same fit as over the summary computed here, to the published 6 significant digits.
        assert (model.r, model.alpha, model.a, model.b) == tuple(
            float(f"{value:.6g}") for value in (fitted.params.r, fitted.params.alpha, fitted.params.a, fitted.params.b))
        assert model.log_likelihood == pytest.approx(fitted.log_likelihood, abs=1e-3)
    # 300 customers pin the parameters down only roughly: the purchase rate within a third.
    model = models[0]
    assert model.r / model.alpha == pytest.approx(TRUE_PARAMS.r / TRUE_PARAMS.alpha, rel=0.35)


def test_the_same_model_is_not_published_twice(run):
    _, result = run
    assert result["second_id"] is None and result["second_sent"] == []


def test_too_few_customers_publish_nothing(run):
    _, result = run
    assert result["too_few_id"] is None and result["too_few_sent"] == []
