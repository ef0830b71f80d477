"""`crm status`'s health lines (services/health.py): each process's /metrics, found through its
address file, summed up in a line or two; a process without metrics is said so, never an error."""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from deploy.metrics_endpoint import announce, serve
from services import health
from services.cli import main


def worker_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    records = Counter("crm_worker_records_in_total", "", ["topic", "partition"], registry=registry)
    records.labels("crm.events", "0").inc(1000)
    records.labels("crm.events", "1").inc(500)
    Counter("crm_worker_outputs_total", "", ["topic"], registry=registry).labels("crm.events.accepted").inc(1400)
    dead = Counter("crm_worker_dead_letters_total", "", ["reason"], registry=registry)
    dead.labels("malformed_json").inc(2)
    dead.labels("schema_invalid").inc(7)
    Counter("crm_worker_duplicates_total", "", registry=registry).inc(3)
    Counter("crm_worker_send_retries_total", "", registry=registry)
    Histogram("crm_worker_batch_records", "", registry=registry).observe(1500)
    phases = Histogram("crm_worker_batch_duration_seconds", "", ["phase"], registry=registry)
    phases.labels("fold").observe(0.040)
    phases.labels("flush").observe(0.012)
    lag = Gauge("crm_worker_consumer_lag_records", "", ["topic", "partition"], registry=registry)
    lag.labels("crm.events", "0").set(5)
    lag.labels("crm.events", "3").set(120)
    return registry


def test_the_worker_line_sums_records_breaks_dead_letters_down_and_names_the_worst_partition():
    lines = health.worker(health.Samples(generate_latest(worker_registry()).decode()))
    assert lines == [
        "records in 1,500, out 1,400; duplicates 3; dead letters 9 (schema_invalid 7, malformed_json 2)",
        "lag crm.events 125 (worst crm.events[3] 120); batches 1, mean 1,500 records, fold 40 ms, flush 12 ms; "
        "send retries 0",
    ]


def test_the_writer_line_names_the_slowest_table_and_a_writer_that_never_wrote():
    registry = CollectorRegistry()
    inserts = Histogram("crm_writer_insert_duration_seconds", "", ["table"], registry=registry)
    inserts.labels("events").observe(0.010)
    inserts.labels("customer_profiles").observe(0.050)
    Counter("crm_writer_insert_failures_total", "", ["table"], registry=registry).labels("events").inc(4)
    Gauge("crm_writer_last_write_timestamp_seconds", "", registry=registry)
    first, second = health.writer(health.Samples(generate_latest(registry).decode()))
    assert "insert mean 30 ms (slowest customer_profiles 50 ms)" in first
    assert "insert failures 4 (events 4)" in first and first.endswith("last write never")
    assert second == "lag not measured yet"


def test_the_api_line_counts_server_errors():
    registry = CollectorRegistry()
    requests = Counter("crm_api_requests_total", "", ["method", "route", "status"], registry=registry)
    requests.labels("POST", "/v1/events", "200").inc(40)
    requests.labels("POST", "/v1/events", "503").inc(2)
    requests.labels("GET", "unmatched", "404").inc(1)
    Counter("crm_api_events_refused_total", "", ["reason"], registry=registry).labels("schema_invalid").inc(5)
    (line,) = health.api(health.Samples(generate_latest(registry).decode()))
    assert line.startswith("requests 43, 5xx 2;") and "refused 5 (schema_invalid 5)" in line


def test_a_process_is_reported_up_down_or_without_metrics(tmp_path):
    assert health.report(tmp_path, "alerts") == ["metrics: none announced (not running)"]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    announce("api", tmp_path, f"http://127.0.0.1:{port}/metrics")
    assert health.report(tmp_path, "api")[0].startswith(f"metrics: DOWN, http://127.0.0.1:{port}/metrics")
    endpoint = serve("worker", tmp_path, 0, worker_registry())
    try:
        first, *summary = health.report(tmp_path, "worker")
        assert first == f"metrics: up, {endpoint.url}" and summary[0].startswith("records in 1,500")
    finally:
        endpoint.close()


def test_crm_status_shows_the_api_from_its_metrics_and_skips_processes_that_do_not_run(tmp_path, capsys,
                                                                                         monkeypatch):
    monkeypatch.setenv("CRM_STATE_DIR", str(tmp_path))  # restored afterwards; `main` sets it from --state-dir
    monkeypatch.setenv("CRM_KAFKA_PORT", "1")  # no broker there: status must not wait for one
    monkeypatch.delenv("CRM_KAFKA_BOOTSTRAP", raising=False)
    registry = CollectorRegistry()
    Counter("crm_api_requests_total", "", ["method", "route", "status"], registry=registry) \
        .labels("GET", "/health", "200").inc()
    endpoint = serve("api", tmp_path, 0, registry)
    try:
        assert main(["--state-dir", str(tmp_path), "status"]) == 0
    finally:
        endpoint.close()
    out = capsys.readouterr().out
    assert "worker: not running\nwriter: not running\nalerts: not running\n" in out
    assert f"api:\n  metrics: up, {endpoint.url}\n  requests 1, 5xx 0;" in out
