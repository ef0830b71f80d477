"""Two worker processes in one consumer group share the six events partitions, each with its own
RocksDB state: a second worker joins while events flow (a rebalance mid-stream), is killed
mid-stream (after the session timeout the survivor takes its partitions and restores their state
from the changelog, state its own RocksDB holds only up to the first rebalance), and is started
again (it restores what the survivor wrote meanwhile). Every projection in ClickHouse then equals
the pure fold over the log."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from streams import topics
from tests.integration.fold_check import Workload, assert_projections_equal_the_fold, event_rows, pure_fold

pytestmark = pytest.mark.integration

CHUNK, PAUSE = 10, 0.5  # while events flow: 10 events every half second


def group_members(admin: KafkaAdminClient) -> int | None:
    """How many members the worker's consumer group has once a rebalance has settled; None while one runs."""
    try:
        group = admin.describe_groups([topics.WORKER_APP_ID])[topics.WORKER_APP_ID]
    except KafkaError:
        return None
    return len(group["members"]) if group["group_state"] == "Stable" else None


def flow(workload: Workload, until: Callable[[], Any], what: str, at_least: float = 0.0, timeout: float = 300) -> None:
    """Send the workload on, a chunk at a time, for at least `at_least` seconds and until `until()`."""
    began = time.monotonic()
    while time.monotonic() - began < at_least or not until():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        workload.send(CHUNK)
        time.sleep(PAUSE)


def test_two_workers_share_the_partitions_through_a_rebalance_a_crash_and_a_restart(stack, tmp_path):
    prefix = f"two-{uuid.uuid4().hex[:6]}"
    # Event time after everything before, so that this test's clock ticks move the partitions' clocks;
    # except the edge-of-the-catalog times of test_producer_fuzz.py, past which nothing is accepted.
    latest = stack.query("SELECT greatest((SELECT max(as_of) FROM customer_profiles WHERE as_of < '2100-01-01'), "
                         "(SELECT max(occurred_at) FROM events WHERE occurred_at < '2100-01-01'))")[0][0]
    start = max(datetime(2028, 1, 1, tzinfo=UTC), latest.replace(tzinfo=UTC) + timedelta(days=1))
    workload = Workload(stack, prefix, customers=60, start=start, ticks={300: start + timedelta(days=17)})
    second = stack.worker.variant(tmp_path / "worker-2.log", CRM_STATE_DIR=str(tmp_path / "state-2"))
    admin = KafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap, client_id="crm-test-group")
    try:
        stack.wait_for(lambda: group_members(admin) == 1, timeout=300, what="the stack's worker alone in its group")
        # A second worker joins while events flow; both then fold for a while.
        second.start()
        flow(workload, lambda: group_members(admin) == 2, "the second worker to join")
        flow(workload, lambda: True, "both workers folding", at_least=5)
        joined = len(workload.sent)

        # It dies mid-stream. Events flow on; after the session timeout its partitions move to the
        # survivor, which restores their state from the changelog and folds everything.
        second.kill()
        flow(workload, lambda: True, "events for the dead worker's partitions", at_least=5)
        stack.wait_for(lambda: event_rows(stack, prefix) == len(workload.sent), timeout=300,
                       what="the survivor to fold every partition")
        assert group_members(admin) == 1
        survived = len(workload.sent)

        # Started again while events flow, it takes back some partitions, restoring what the
        # survivor wrote to their changelog meanwhile.
        second.start()
        flow(workload, lambda: group_members(admin) == 2, "the second worker to join again")
        flow(workload, lambda: True, "both workers folding again", at_least=5)
        workload.tick(start + timedelta(days=30))
        stack.wait_for(lambda: event_rows(stack, prefix) == len(workload.sent), timeout=300,
                       what="all events in ClickHouse")
        assert second.running and stack.worker.running
        assert 0 < joined < survived < len(workload.sent)

        fold = pure_fold(stack, prefix)
        assert all(fold.customer(name) for name in workload.names)
        assert {"earned_pending", "made_available"} <= {kind for kind, *_ in fold.movements.values()}
        assert fold.segment_changes
        assert_projections_equal_the_fold(stack, prefix, fold, workload.sent)
    finally:
        admin.close()
        second.stop()
        if not stack.worker.running:
            stack.worker.start()
