"""Prometheus metrics of the running processes (docs/operations.md): good and malformed events go in
through the ingestion API and straight to Kafka, and each process's /metrics shows what it did. The
worker is the session's subprocess, found through its address file; the writer runs in this process
(its metrics are this process's registry, served the way `crm writer` serves them); the ingestion
API is the session's; the alerts service is started here on a state directory of its own."""

from __future__ import annotations

import dataclasses
import uuid

import httpx
import pytest

from deploy.metrics_endpoint import address_file, read_address
from projections import metrics as writer_metrics
from services.alerts.service import AlertService
from services.health import Samples, report
from tests.factories import event
from tests.integration.test_ingest_api import now, post

pytestmark = pytest.mark.integration


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return Samples(response.text)


def test_each_process_shows_on_its_metrics_what_the_events_did(stack, api):
    worker_url = stack.wait_for(lambda: read_address(stack.settings.state_dir, "worker"), timeout=120,
                                what="the worker's metrics address file")
    worker_before, api_before = scrape(worker_url), scrape(f"{api.url}/metrics")
    writer_endpoint = writer_metrics.serve(stack.settings)
    try:
        writer_before = scrape(writer_endpoint.url)
        tag = uuid.uuid4().hex[:8]
        good = [event("daily_sign_in", customer_id=f"metrics-{tag}-{n}", occurred_at=now(minutes=-1)) for n in range(3)]
        assert post(api, "/v1/events/batch", {"events": good}, api.key("backoffice")).status_code == 200
        assert post(api, "/v1/events", b'{"type": "daily_sign_in",', api.key("backoffice")).status_code == 400
        for n in range(2):
            stack.send(f"metrics-{tag}-bad-{n}".encode(), b"{not json")
        stack.flush()

        def worker_moved() -> Samples | None:
            now_ = scrape(worker_url)
            folded = now_.total("crm_worker_records_in_total") - worker_before.total("crm_worker_records_in_total")
            dead = now_.total("crm_worker_dead_letters_total", reason="malformed_json") \
                - worker_before.total("crm_worker_dead_letters_total", reason="malformed_json")
            return now_ if folded >= 5 and dead >= 2 else None

        worker = stack.wait_for(worker_moved, timeout=180, what="the worker's records-in and dead-letter counters")
        assert worker.total("crm_worker_outputs_total", topic="crm.events.accepted") \
            >= worker_before.total("crm_worker_outputs_total", topic="crm.events.accepted") + 3
        assert worker.total("crm_worker_batch_duration_seconds_count", phase="fold") \
            > worker_before.total("crm_worker_batch_duration_seconds_count", phase="fold")
        stack.wait_for(lambda: scrape(worker_url).by_name.get("crm_worker_consumer_lag_records"), timeout=120,
                       what="the worker's lag gauges")

        api_after = scrape(f"{api.url}/metrics")
        assert api_after.total("crm_api_events_accepted_total") - api_before.total("crm_api_events_accepted_total") == 3
        assert api_after.total("crm_api_events_refused_total", reason="malformed_json") \
            - api_before.total("crm_api_events_refused_total", reason="malformed_json") == 1
        assert api_after.total("crm_api_requests_total", route="/v1/events/batch", status="200") \
            - api_before.total("crm_api_requests_total", route="/v1/events/batch", status="200") == 1
        assert api_after.total("crm_api_kafka_send_duration_seconds_count", topic="crm.events") \
            > api_before.total("crm_api_kafka_send_duration_seconds_count", topic="crm.events")

        def writer_moved() -> bool:
            now_ = scrape(writer_endpoint.url)
            return now_.total("crm_writer_rows_inserted_total", table="dead_letters") \
                >= writer_before.total("crm_writer_rows_inserted_total", table="dead_letters") + 3
        stack.wait_for(writer_moved, timeout=180, what="the writer's dead_letters rows counter")
        assert read_address(stack.settings.state_dir, "writer") == writer_endpoint.url
        assert report(stack.settings.state_dir, "worker")[0] == f"metrics: up, {worker_url}"
    finally:
        writer_endpoint.close()
    assert not address_file(stack.settings.state_dir, "writer").exists()


def test_the_alerts_service_answers_metrics_and_announces_where(stack, tmp_path):
    service = AlertService(dataclasses.replace(stack.settings, state_dir=tmp_path), port=0, consume=False)
    service.start_in_thread()
    try:
        url = f"{service.url}/metrics"
        assert read_address(tmp_path, "alerts") == url
        text = httpx.get(url, timeout=10).text
        for family in ("crm_alerts_changes_consumed_total", "crm_alerts_webhook_deliveries_total",
                       "crm_alerts_webhook_pending_deliveries", "crm_alerts_stream_subscribers"):
            assert f"# TYPE {family} " in text, family
    finally:
        service.stop()
    assert read_address(tmp_path, "alerts") is None
