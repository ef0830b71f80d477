"""`crm demo`, small, as a user runs it: its own broker, worker and writer on free ports and a fresh
state directory, in a process of its own (chdb allows one engine per process). What the issue asks
of its summary: a published churn model, p_alive on every profile, alerts whose actions include
every kind the churn rules allow, and an active sample buyer."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from streams.config import PROJECT_ROOT

CUSTOMERS, DAYS = 400, 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    state_dir = tmp_path_factory.mktemp("demo")
    env = {name: value for name, value in os.environ.items() if not name.startswith("CRM_")}
    env.update({"COLUMNS": "250", "CRM_WORKER_METRICS_PORT": "0", "CRM_WRITER_METRICS_PORT": "0",
                **{name: str(_free_port()) for name in ("CRM_KAFKA_PORT", "CRM_KAFKA_CONTROLLER_PORT", "CRM_SQL_PORT",
                                                        "CRM_ALERTS_PORT", "CRM_API_PORT", "CRM_DASHBOARD_PORT")}})
    crm = [sys.executable, "-m", "services.cli", "--state-dir"]
    try:
        run = subprocess.run([*crm, str(state_dir), "demo", "--customers", str(CUSTOMERS), "--days", str(DAYS)],
                             env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    finally:
        # Whatever the demo left running: the stack it starts again at its end or, after a failure,
        # the broker and worker it started first (their pid files are in the demo's state directory).
        subprocess.run([*crm, str(state_dir / "demo"), "stop"], env=env, cwd=PROJECT_ROOT, capture_output=True,
                       timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run.stdout


def test_the_demo_publishes_boundaries_and_a_churn_model_while_it_replays_the_history(demo_output):
    stages = re.findall(r"day +(\d+) \(\d{4}-\d\d-\d\d\): published segment boundaries \S+; (.*)", demo_output)
    assert [int(day) for day, _ in stages] == [30, 60, 90, DAYS]
    assert stages[-1][1].startswith("churn model ")


def test_every_customer_profile_has_a_p_alive(demo_output):
    scored, profiles = map(int, re.search(r"(\d+) of (\d+) customer profiles have a p_alive", demo_output).groups())
    assert scored == profiles == CUSTOMERS


def test_alerts_recommend_every_action_the_churn_rules_allow(demo_output):
    assert "Action kinds the churn rules allow: bonus_points, coupon, personal_call; recommended: every one" in demo_output


def test_the_sample_buyer_is_active(demo_output):
    sample = demo_output.split("Sample profile", 1)[1]
    assert re.search(r"lifecycle_stage +active", sample)
