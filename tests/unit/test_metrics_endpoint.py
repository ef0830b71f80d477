"""The /metrics endpoint every process serves or announces (deploy/metrics_endpoint.py): it answers
on the address it writes to `$CRM_STATE_DIR/run/<name>.metrics`, survives a taken port, and
withdraws only its own address."""

from __future__ import annotations

import logging
import socket

import httpx
from prometheus_client import CollectorRegistry, Counter

from deploy.metrics_endpoint import address_file, announce, local_url, read_address, serve


def registry_with_a_counter() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("crm_test_things_total", "Things.", registry=registry).inc(3)
    return registry


def test_serving_on_port_zero_announces_the_bound_address_which_answers_with_the_registry(tmp_path):
    endpoint = serve("worker", tmp_path, 0, registry_with_a_counter())
    try:
        assert read_address(tmp_path, "worker") == endpoint.url
        assert endpoint.url.startswith("http://127.0.0.1:") and endpoint.url.endswith("/metrics")
        assert not endpoint.url.startswith("http://127.0.0.1:0/")
        assert "crm_test_things_total 3.0" in httpx.get(endpoint.url, timeout=5).text
    finally:
        endpoint.close()
    assert not address_file(tmp_path, "worker").exists()


def test_a_taken_port_falls_back_to_a_free_one_with_a_warning(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="crm.metrics"):
            endpoint = serve("worker", tmp_path, port, registry_with_a_counter())
        try:
            assert f":{port}/" not in endpoint.url
            assert httpx.get(endpoint.url, timeout=5).status_code == 200
            assert f"metrics port {port} is taken" in caplog.text
        finally:
            endpoint.close()


def test_closing_leaves_an_address_another_process_wrote_since(tmp_path):
    mine = announce("alerts", tmp_path, "http://127.0.0.1:1111/metrics")
    address_file(tmp_path, "alerts").write_text("http://127.0.0.1:2222/metrics\n")
    mine.close()
    mine.close()
    assert read_address(tmp_path, "alerts") == "http://127.0.0.1:2222/metrics"


def test_no_address_file_reads_as_none(tmp_path):
    assert read_address(tmp_path, "api") is None


def test_a_wildcard_host_is_reached_on_the_loopback():
    assert local_url("0.0.0.0", 8080) == "http://127.0.0.1:8080/metrics"
    assert local_url("::1", 8090) == "http://[::1]:8090/metrics"
    assert local_url("127.0.0.1", 8090) == "http://127.0.0.1:8090/metrics"
