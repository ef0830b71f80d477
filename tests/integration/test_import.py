"""`crm import` against the real broker, worker and ClickHouse: a generated retailer history
(customers, orders with line items, refunds, points balances over 2024, customer keys `impit-`) is
imported by a run that dies like a crash half way, resumed, then imported once more in full. Every
row must arrive exactly once, the rejects as dead letters once per row, and the profiles must show
the purchases and the spend the files hold.

One year, no more: the projection writer (and the rebuild, tests/integration/test_replay.py, after
this test) inserts a batch's `events` rows in one INSERT, the table has a partition per month, and
ClickHouse allows 100 of them per INSERT (docs/import.md, "Known limits"); the other tests' events
already span many months. 2024 is after the cohort month test_views.py checks (2023-03)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from decimal import Decimal

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from rich.console import Console

from projections.writer import WRITER_GROUP
from services.importer.progress import ImportFolder
from services.importer.run import Options, run
from services.importer.sample import write_export
from streams import topics
from streams.config import PROJECT_ROOT

pytestmark = pytest.mark.integration

PREFIX = "impit"
IMPORT_ID = "it-history"


def event_rows(stack) -> int:
    return stack.query("SELECT count() FROM events FINAL WHERE startsWith(customer_key, {p:String})",
                       {"p": f"{PREFIX}-"})[0][0]


def import_dead_letters(stack) -> int:
    return stack.query("SELECT count() FROM dead_letters FINAL WHERE startsWith(source_topic, {t:String})",
                       {"t": f"import:{IMPORT_ID}:"})[0][0]


def other_dead_letters(stack) -> list[tuple]:
    """What the worker refused of this test's customers (a conflicting duplicate, say): nothing, ever."""
    return stack.query("SELECT reason, detail FROM dead_letters FINAL WHERE startsWith(record_key, {p:String}) "
                       "AND reason != 'import_row_invalid'", {"p": PREFIX})


def profiles(stack) -> dict[str, tuple[int, Decimal]]:
    rows = stack.query("SELECT customer_key, purchase_count, spend['EUR'] FROM customer_profiles FINAL "
                       "WHERE startsWith(customer_key, {p:String})", {"p": f"{PREFIX}-"})
    return {key: (count, Decimal(spend).quantize(Decimal("0.01"))) for key, count, spend in rows}


def end_offsets(stack, names: list[str]) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap)
    try:
        return consumer.end_offsets([TopicPartition(name, p) for name in names
                                     for p in consumer.partitions_for_topic(name)])
    finally:
        consumer.close()


def wait_until_consumed(stack, group: str, ends: dict[TopicPartition, int]) -> None:
    """Until `group` has committed at least `ends` on every partition: it has read all of it."""
    admin = KafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap)
    try:
        def done() -> bool:
            committed = admin.list_group_offsets({group: None}).get(group, {})
            return all(tp in committed and committed[tp].offset >= end for tp, end in ends.items() if end)
        stack.wait_for(done, timeout=300, what=f"{group} to read everything up to {ends}")
    finally:
        admin.close()


def test_an_interrupted_resumed_and_repeated_import_lands_every_row_exactly_once(stack, tmp_path):
    export = write_export(tmp_path, customers=150, prefix=PREFIX, import_id=IMPORT_ID, seed=17, years=(2024, 2024))
    expected = export.expected
    rejected = sum(expected.rejected.values())

    # Sent a chunk (100) of each partition's stream in turn: the crash comes in the second round,
    # when some first chunks were acknowledged and recorded.
    crashed = subprocess.run([sys.executable, "-m", "services.cli", "import", str(export.mapping),
                              "--crash-after", str(expected.events - 50)],
                             env=dict(os.environ), cwd=PROJECT_ROOT, capture_output=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    folder = ImportFolder(stack.settings.state_dir, IMPORT_ID)
    partitions = [folder.load(partition) for partition in range(topics.EVENTS.partitions)]
    acknowledged = sum(progress.acknowledged for progress in partitions if progress)
    assert 0 < acknowledged < expected.events

    resumed = run(export.mapping, stack.settings, Options(show_progress=False), Console(quiet=True))
    assert (resumed.status, resumed.earlier, resumed.sent) == ("sent", acknowledged, expected.events - acknowledged)
    stack.wait_for(lambda: event_rows(stack) >= expected.events, what="the imported events in ClickHouse")
    stack.wait_for(lambda: profiles(stack) == {key: (expected.purchases[key], spend)
                                               for key, spend in expected.spend.items()},
                   what="profiles with the files' purchase counts and spend")
    stack.wait_for(lambda: import_dead_letters(stack) == rejected, what="one dead letter per rejected row")
    assert event_rows(stack) == expected.events

    again = run(export.mapping, stack.settings, Options(resend=True, show_progress=False), Console(quiet=True))
    assert (again.status, again.sent, again.dead_letters) == ("sent", expected.events, rejected)
    wait_until_consumed(stack, topics.WORKER_APP_ID, end_offsets(stack, [topics.EVENTS.name]))
    wait_until_consumed(stack, WRITER_GROUP, end_offsets(stack, [topics.DEAD_LETTERS.name, topics.ACCEPTED.name]))
    assert event_rows(stack) == expected.events
    assert import_dead_letters(stack) == rejected
    assert other_dead_letters(stack) == []
    assert len(profiles(stack)) == len(expected.spend)
