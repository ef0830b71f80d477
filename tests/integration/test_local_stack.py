"""The local stack's own behaviour: idempotent start, clear errors, migrations."""

from __future__ import annotations

import os
import socket

import pytest

from deploy.kafka.broker import BrokerError, LocalBroker
from projections.migrations import MIGRATIONS, migrate
from streams.config import Settings


@pytest.mark.skipif(os.environ.get("CRM_TESTCONTAINERS") == "1", reason="the local broker is not used")
def test_start_is_idempotent_and_status_reports_the_running_broker(stack):
    broker = LocalBroker(stack.settings)
    first = broker.status()
    assert first.running and first.pid
    assert broker.start().pid == first.pid


def test_a_taken_port_is_reported_clearly(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = LocalBroker(Settings(state_dir=tmp_path, kafka_port=port, kafka_controller_port=port + 1,
                                      kafka_bootstrap_override=None))
        with pytest.raises(BrokerError, match=f"Port {port} .* is taken"):
            broker.start()


def test_migrations_are_recorded_and_applied_once(stack):
    database = stack.settings.clickhouse_database
    assert migrate(stack.client, database) == []
    applied = [r[0] for r in stack.query(f"SELECT version FROM {database}.schema_migrations ORDER BY version")]
    assert applied == [version for version, _ in MIGRATIONS]
    tables = {r[0] for r in stack.query(f"SELECT name FROM system.tables WHERE database = '{database}'")}
    assert {"events", "customer_profiles", "dead_letters", "schema_migrations"} <= tables
