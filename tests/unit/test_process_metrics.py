"""Each process's Prometheus metrics, without Kafka: the worker's batch counters and lag gauges
(streams/runtime/metrics.py), the writer's poll, insert and lag figures (projections/metrics.py), the
ingestion API's request and event counters (services/ingest), and the alerts service's deliveries,
pending and dead gauges and live streams (services/alerts). The metrics are process-wide, so every
check compares a sample before and after."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from kafka import TopicPartition
from kafka.errors import IllegalStateError
from prometheus_client import REGISTRY

from projections import metrics as writer_metrics
from services.alerts import metrics as alerts_metrics
from services.alerts.api import Runtime, _alerts
from services.alerts.api import create_app as alerts_app
from services.alerts.bell import Bell
from services.alerts.filters import Filters
from services.alerts.store import DELIVERED, AlertStore
from services.ingest.api import create_app as ingest_app
from services.ingest.keys import ApiKeyStore
from streams.config import Settings
from streams.records import SourceRecord, TopicRecord
from streams.runtime import metrics as worker_metrics
from tests.unit.test_alert_delivery import FAST, Receiver, log_alerts, run_dispatcher, subscribe
from tests.unit.test_alert_delivery import alert as an_alert


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def call(app: FastAPI, path: str, method: str = "GET", content: bytes | None = None) -> httpx.Response:
    """One request to the app in process (no lifespan: the ingestion API has no Kafka producer then)."""
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, content=content)

    return asyncio.run(main())


def record(partition: int, offset: int) -> SourceRecord:
    return SourceRecord(key=b"k", value=b"{}", partition=partition, offset=offset, timestamp_ms=0)


# --- the worker ------------------------------------------------------------------------------------

def test_a_batch_counts_its_records_per_partition_its_size_and_both_phases():
    before = {p: sample("crm_worker_records_in_total", topic="crm.events", partition=p) for p in ("0", "4")}
    batches = sample("crm_worker_batch_records_count")
    flushes = sample("crm_worker_batch_duration_seconds_count", phase="flush")
    worker_metrics.batch_done([record(0, 1), record(0, 2), record(4, 7)], fold_seconds=0.01, flush_seconds=0.02)
    assert sample("crm_worker_records_in_total", topic="crm.events", partition="0") - before["0"] == 2
    assert sample("crm_worker_records_in_total", topic="crm.events", partition="4") - before["4"] == 1
    assert sample("crm_worker_batch_records_count") - batches == 1
    assert sample("crm_worker_batch_duration_seconds_count", phase="flush") - flushes == 1


def test_outputs_are_counted_per_topic():
    before = sample("crm_worker_outputs_total", topic="crm.customer-profiles")
    worker_metrics.outputs_sent([TopicRecord("crm.customer-profiles", b"a", b"{}"),
                                 TopicRecord("crm.customer-profiles", b"b", b"{}"),
                                 TopicRecord("crm.events.accepted", b"a", b"{}")])
    assert sample("crm_worker_outputs_total", topic="crm.customer-profiles") - before == 2


def test_the_lag_of_a_revoked_partition_is_withdrawn():
    worker_metrics.lag_measured("crm.events", {1: 40, 2: 0})
    assert sample("crm_worker_consumer_lag_records", topic="crm.events", partition="1") == 40
    worker_metrics.partitions_gone("crm.events", {1})
    assert REGISTRY.get_sample_value("crm_worker_consumer_lag_records", {"topic": "crm.events", "partition": "1"}) is None
    assert REGISTRY.get_sample_value("crm_worker_consumer_lag_records", {"topic": "crm.events", "partition": "2"}) == 0


# --- the projection writer -------------------------------------------------------------------------

class FakeConsumer:
    """What `polled` asks of kafka-python's consumer: the assignment, highwaters and positions."""

    def __init__(self, ends: dict[TopicPartition, int | None], positions: dict[TopicPartition, int | None]):
        self.ends, self.positions = ends, positions

    def assignment(self) -> set[TopicPartition]:
        return set(self.ends)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.ends[tp]

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        if tp not in self.positions:
            raise IllegalStateError("Partition is not assigned")
        return self.positions[tp]


# The topics here are the tests' own: in a whole test run the integration session's projection writer
# polls in a thread of this process, and reports its real topics meanwhile.

def test_a_poll_counts_records_per_topic():
    ledger = TopicPartition("test.points-ledger", 2)
    before = sample("crm_writer_records_consumed_total", topic=ledger.topic)
    writer_metrics.polled(FakeConsumer({}, {}), {ledger: [object()] * 3, TopicPartition("test.profiles", 0): []})
    assert sample("crm_writer_records_consumed_total", topic=ledger.topic) - before == 3


def test_the_lag_is_set_for_each_partition_it_can_and_withdrawn_once_it_is_not_assigned():
    lag = writer_metrics._Lag()
    ledger, profiles, revoked = (TopicPartition("test.points-ledger", 2), TopicPartition("test.customer-profiles", 0),
                                 TopicPartition("test.alerts", 5))
    lag.measure(FakeConsumer({ledger: 120, profiles: None, revoked: 9}, {ledger: 100, profiles: 3}))
    assert sample("crm_writer_consumer_lag_records", topic=ledger.topic, partition="2") == 20
    # No highwater yet, or no longer assigned: no figure rather than a wrong one.
    for tp in (profiles, revoked):
        assert REGISTRY.get_sample_value("crm_writer_consumer_lag_records",
                                         {"topic": tp.topic, "partition": str(tp.partition)}) is None
    lag.measure(FakeConsumer({}, {}))
    assert REGISTRY.get_sample_value("crm_writer_consumer_lag_records",
                                     {"topic": ledger.topic, "partition": "2"}) is None


def test_an_accepted_insert_counts_rows_time_and_last_write_and_a_refused_one_a_failure():
    rows, inserts = sample("crm_writer_rows_inserted_total", table="events"), \
        sample("crm_writer_insert_duration_seconds_count", table="events")
    with writer_metrics.insert("events", 250):
        pass
    assert sample("crm_writer_rows_inserted_total", table="events") - rows == 250
    assert sample("crm_writer_insert_duration_seconds_count", table="events") - inserts == 1
    assert sample("crm_writer_last_write_timestamp_seconds") > 0
    failures = sample("crm_writer_insert_failures_total", table="events")
    with pytest.raises(RuntimeError, match="NOT_ENOUGH_SPACE"), writer_metrics.insert("events", 250):
        raise RuntimeError("NOT_ENOUGH_SPACE")
    assert sample("crm_writer_insert_failures_total", table="events") - failures == 1
    assert sample("crm_writer_rows_inserted_total", table="events") - rows == 250


# --- the ingestion API -----------------------------------------------------------------------------

@pytest.fixture
def ingest(tmp_path) -> FastAPI:
    """The API app, to be called without its lifespan: only requests that need no Kafka."""
    return ingest_app(dataclasses.replace(Settings(), state_dir=tmp_path))


def test_api_requests_are_counted_by_route_template_and_status(ingest):
    def requests(route: str, status: str, method: str = "GET") -> float:
        return sample("crm_api_requests_total", method=method, route=route, status=status)

    before = requests("/health", "200"), requests("unmatched", "404"), requests("/v1/events", "401", "POST")
    assert call(ingest, "/health").status_code == 200
    assert call(ingest, "/no/such/path/12345").status_code == 404
    assert call(ingest, "/v1/events", "POST", b"{}").status_code == 401
    after = requests("/health", "200"), requests("unmatched", "404"), requests("/v1/events", "401", "POST")
    assert [b - a for a, b in zip(before, after)] == [1, 1, 1]


def test_the_api_serves_metrics_without_a_key_and_outside_its_openapi_description(ingest):
    call(ingest, "/health")
    response = call(ingest, "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "crm_api_requests_total" in response.text
    assert "/metrics" not in call(ingest, "/openapi.json").json()["paths"]


# --- the alerts service ----------------------------------------------------------------------------

def test_webhook_attempts_count_failures_retries_and_the_delivery(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    with Receiver(fail_first=1, fail_status=503) as receiver:
        subscription = subscribe(store, receiver)
        log_alerts(store, [an_alert()])
        run_dispatcher(store, until=lambda: store.delivery_counts(subscription.id)[DELIVERED] == 1, policy=FAST)
    outcomes = {outcome: sample("crm_alerts_webhook_deliveries_total", subscription=subscription.id, outcome=outcome)
                for outcome in ("failed", "delivered", "dead")}
    assert outcomes == {"failed": 1, "delivered": 1, "dead": 0}
    assert sample("crm_alerts_webhook_retries_total", subscription=subscription.id) == 1
    assert sample("crm_alerts_webhook_delivery_duration_seconds_count", subscription=subscription.id) == 2


def test_pending_and_dead_deliveries_are_read_from_the_store_and_a_removed_webhook_withdrawn(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    keys = ApiKeyStore(tmp_path / "ingest.sqlite")
    subscription = store.create_subscription("http://127.0.0.1:9/hook", Filters())
    log_alerts(store, [an_alert("cust-1"), an_alert("cust-2")])
    store.failed(subscription.id, 1, attempts=15, error="HTTP 500", response_status=500, retry_at=None)
    app = alerts_app(Runtime(store, keys, Bell()))
    text = call(app, "/metrics").text
    assert f'crm_alerts_webhook_pending_deliveries{{subscription="{subscription.id}"}} 1.0' in text
    assert f'crm_alerts_webhook_dead_deliveries{{subscription="{subscription.id}"}} 1.0' in text
    store.remove_subscription(subscription.id)
    gauges = ("crm_alerts_webhook_pending_deliveries{", "crm_alerts_webhook_dead_deliveries{")
    assert not [line for line in call(app, "/metrics").text.splitlines()
                if line.startswith(gauges) and subscription.id in line]
    assert "/metrics" not in call(app, "/openapi.json").json()["paths"]


def test_consumed_alert_changes_are_counted_by_outcome(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    change = an_alert()
    before = sample("crm_alerts_changes_consumed_total", outcome="logged"), \
        sample("crm_alerts_changes_consumed_total", outcome="duplicate")
    alerts_metrics.consumed(store.append([(change, change.model_dump_json().encode())]))
    alerts_metrics.consumed(store.append([(change, change.model_dump_json().encode())]))
    assert sample("crm_alerts_changes_consumed_total", outcome="logged") - before[0] == 1
    assert sample("crm_alerts_changes_consumed_total", outcome="duplicate") - before[1] == 1


def test_a_live_stream_counts_as_a_subscriber_until_it_ends(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite")
    log_alerts(store, [an_alert()])
    runtime = Runtime(store, SimpleNamespace(), Bell())

    async def main() -> tuple[float, float]:
        stream = _alerts(runtime, Filters(), 0)
        await anext(stream)
        during = sample("crm_alerts_stream_subscribers")
        await stream.aclose()
        return during, sample("crm_alerts_stream_subscribers")

    before = sample("crm_alerts_stream_subscribers")
    during, after = asyncio.run(main())
    assert (during - before, after - before) == (1, 0)
