"""The Prometheus files an operator starts from (deploy/prometheus/): they parse, scrape each process
on its default port, and the alert rules name only metrics the processes export. With promtool
installed (Debian's `prometheus` package), promtool also checks them and runs alerts_test.yml."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

# Each registers its process's metrics in the registry the rules are checked against.
import projections.metrics  # noqa: F401
import services.alerts.metrics  # noqa: F401
import services.ingest.metrics  # noqa: F401
import streams.runtime.metrics  # noqa: F401
from streams.config import PROJECT_ROOT, Settings

PROMETHEUS = PROJECT_ROOT / "deploy" / "prometheus"
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}


def load(name: str) -> dict:
    return yaml.safe_load((PROMETHEUS / name).read_text())


def exported_names() -> set[str]:
    """Every sample name the platform's metrics can expose, series with labels or not yet."""
    return {family.name + suffix for family in REGISTRY.collect() if family.name.startswith("crm_")
            for suffix in SUFFIXES[family.type]}


def rules() -> list[dict]:
    return [rule for group in load("alerts.yml")["groups"] for rule in group["rules"]]


def test_the_scrape_config_targets_each_process_on_its_default_port(monkeypatch):
    from services.intake.run import metrics_port as intake_metrics_port

    for name in ("CRM_WORKER_METRICS_PORT", "CRM_WRITER_METRICS_PORT", "CRM_API_PORT", "CRM_ALERTS_PORT",
                 "CRM_INTAKE_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings()
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in load("prometheus.yml")["scrape_configs"]}
    assert targets == {"crm-worker": [f"127.0.0.1:{defaults.worker_metrics_port}"],
                       "crm-writer": [f"127.0.0.1:{defaults.writer_metrics_port}"],
                       "crm-intake": [f"127.0.0.1:{intake_metrics_port()}"],
                       "crm-api": [f"127.0.0.1:{defaults.api_port}"],
                       "crm-alerts": [f"127.0.0.1:{defaults.alerts_port}"]}
    assert load("prometheus.yml")["rule_files"] == ["alerts.yml"]


def test_every_metric_an_alert_rule_uses_is_exported_by_a_process():
    exported = exported_names()
    for rule in rules():
        used = set(re.findall(r"\bcrm_[a-z0-9_]+", rule["expr"]))
        assert used <= exported, (rule["alert"], used - exported)


def test_every_alert_rule_has_a_severity_a_summary_and_a_description():
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_the_platforms_metrics_follow_the_naming_conventions():
    for family in REGISTRY.collect():
        if not family.name.startswith("crm_"):
            continue
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the client adds it to the samples
        assert re.fullmatch(r"crm_(worker|writer|api|alerts|intake)_[a-z0-9_]+", family.name), family.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_records")), family.name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
@pytest.mark.parametrize("command", [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                                     ["test", "rules", "alerts_test.yml"]], ids=" ".join)
def test_promtool_accepts_the_files_and_the_rules_fire_as_their_tests_expect(command):
    done = subprocess.run(["promtool", *command], cwd=Path(PROMETHEUS), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
