"""A rebuild of every projection from the log gives exactly what the live system shows: after
more than 100,000 events (and whatever the other tests of the session wrote), every table rebuilt
beside the live ones, swapped in, and compared with the tables it replaced."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import orjson
import pytest

from projections import boundaries, churn_model
from projections.replay import Rebuild, TABLES, verify
from schemas.alerts import ChurnModelPublished
from services.lag import LagProbe
from services.simulator import Simulator, Workload
from streams import topics
from streams.rulebooks import load_rulebooks
from tests.factories import encoded, event

pytestmark = pytest.mark.integration


def wait_until_caught_up(stack, timeout: float = 900) -> None:
    """Worker and writer have consumed everything, twice in a row (the worker appends to its own log)."""
    probe = LagProbe(stack.settings)
    try:
        deadline, streak = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            streak = streak + 1 if probe.lag().caught_up else 0
            if streak >= 3:
                return
            time.sleep(2)
    finally:
        probe.close()
    raise AssertionError(f"the pipeline did not catch up; worker log: {stack.worker.log_path}")


def test_a_rebuild_from_the_log_equals_the_live_projections(stack):
    workload = Workload(customers=6200, days=45, seed=31, customer_prefix="replay", duplicate_rate=0.01)
    sent, started = 0, time.monotonic()
    for message in Simulator(workload).messages(topics.EVENT_PARTITIONS):
        stack.send(message.key, message.value, partition=message.partition)
        sent += 1
    # A few of them erased at the end of their history, so that the rebuild has erasures to make again
    # (crm.erasures, written by the fold) and meets erased customers' forfeits and closed alerts.
    for n in range(0, 200, 10):
        customer = f"{workload.customer_prefix}-{n:06d}"
        request = event("customer_erasure_requested", customer_id=customer, occurred_at=workload.end.isoformat(),
                        source={"channel": "service"}, payload={"request_id": f"req-{n}", "requested_by": "dpo"})
        stack.send(customer.encode(), encoded(request))
        sent += 1
    stack.flush()
    assert sent >= 100_000, sent
    wait_until_caught_up(stack)
    live_seconds = time.monotonic() - started
    # Boundaries and a churn model too, so that every table has rows to compare.
    rules = load_rulebooks(stack.settings)
    assert boundaries.publish(stack.client, stack.settings.clickhouse_database, rules.segments, stack.producer)
    # The churn model as the writer publishes it, with fixed parameters (CDNOW's, in days): this test
    # is about the rebuild, not the fit.
    at = datetime.fromtimestamp(churn_model.latest_event_ms(stack.client, stack.settings.clickhouse_database) / 1000, UTC)
    for partition in range(topics.EVENT_PARTITIONS):
        model = ChurnModelPublished(event_id=uuid.uuid4(), occurred_at=at, partition=partition, model_id="replay-cdnow",
                                    r=0.243, alpha=4.414 * 7, a=0.793, b=2.426, customers=2357, log_likelihood=-9582.4)
        stack.send(b"churn-model", orjson.dumps(model.model_dump(mode="json")), partition=partition)
    stack.flush()
    wait_until_caught_up(stack)

    progress: list[tuple[int, int]] = []
    figures = Rebuild(stack.client, stack.settings, rules,
                      progress=lambda done, total: progress.append((done, total))).run()
    assert figures["records"] >= sent
    # For BENCHMARKS.md (shown with `pytest -s`): the live pipeline and the rebuild in one run.
    print(f"\nlive: {sent} records sent, worker and writer caught up in {live_seconds:.0f} s "
          f"({sent / live_seconds:.0f} records/s); rebuild: {figures['records']} records in "
          f"{figures['build_seconds']:.0f} s ({figures['records_per_second']:.0f} records/s); "
          f"ratio {figures['records_per_second'] / (sent / live_seconds):.2f}")
    assert progress and progress[-1][0] == progress[-1][1]

    comparisons = verify(stack.client, stack.settings.clickhouse_database)
    assert [c.table for c in comparisons] == TABLES
    different = [c for c in comparisons if not c.identical]
    assert not different, different
    assert all(c.live_rows > 0 for c in comparisons), comparisons

    # The swapped-in tables are live: new events keep arriving in them.
    late = event("daily_sign_in", customer_id="replay-after")
    stack.send(b"replay-after", encoded(late))
    stack.flush()
    stack.wait_for(lambda: stack.query("SELECT count() FROM events FINAL WHERE event_id = {e:UUID}",
                                       {"e": late["event_id"]})[0][0] == 1, timeout=120, what="an event after the swap")
