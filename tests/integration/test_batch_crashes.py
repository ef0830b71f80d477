"""A crash between each two steps of the end of a worker's batch (deploy/failpoints.py):
the worker folds a batch in memory, sends the changelog, then the outputs, waits for Kafka,
writes RocksDB, and only then acknowledges the batch's records. Whichever step it dies after, its
successor folds the unacknowledged records again and every projection in ClickHouse still equals
the pure fold over the log: nothing lost, nothing counted twice."""

from __future__ import annotations

import subprocess
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from deploy.failpoints import WORKER_POINTS
from tests.integration.fold_check import Workload, assert_projections_equal_the_fold, event_rows, pure_fold

pytestmark = pytest.mark.integration

CUSTOMERS, EVENTS = 40, 400
BATCH_SIZE = 50  # the crashing worker's batches: the workload spans about ten of them
CRASH_AT = 3     # the crashing worker dies the third time it reaches its failpoint


@pytest.mark.parametrize("point", WORKER_POINTS)
def test_a_worker_killed_at_a_step_of_a_batch_loses_nothing_and_doubles_nothing(stack, point):
    index = WORKER_POINTS.index(point)
    prefix = f"fp{index}-{uuid.uuid4().hex[:6]}"
    # Each case's event time is its own, and earlier than the other tests' clock ticks: a tick at or
    # before a partition's clock changes nothing, and the crash test in test_end_to_end.py relies on
    # its ticks (from 2026-02-18) moving the clock.
    start = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(days=45 * index)
    workload = Workload(stack, prefix, customers=CUSTOMERS, start=start,
                        ticks={150: start + timedelta(days=17), EVENTS - 1: start + timedelta(days=30)})
    crashing = stack.worker.variant(stack.worker.log_path.with_name(f"worker-{point}.log"),
                                    CRM_FAILPOINTS=f"{point}={CRASH_AT}", CRM_WORKER_BATCH_SIZE=str(BATCH_SIZE))
    stack.worker.stop()
    try:
        crashing.start()
        workload.send(EVENTS)
        try:
            returncode = crashing.wait_until_dead(timeout=300)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker armed with {point}={CRASH_AT} did not crash; log: {crashing.log_path}")
        assert returncode == -9, f"the worker ended with {returncode}, not by SIGKILL; log: {crashing.log_path}"
        # At most CRASH_AT batches of BATCH_SIZE records were folded: the crash came mid-workload.
        partway = event_rows(stack, prefix)
        assert partway < len(workload.sent)
    finally:
        crashing.stop()
        if not stack.worker.running:
            stack.worker.start()

    stack.wait_for(lambda: event_rows(stack, prefix) == len(workload.sent), timeout=300,
                   what="all events after the restart")
    fold = pure_fold(stack, prefix)
    assert all(fold.customer(name) for name in workload.names)
    assert "earned_pending" in {kind for kind, *_ in fold.movements.values()}
    assert fold.segment_changes
    assert_projections_equal_the_fold(stack, prefix, fold, workload.sent)
