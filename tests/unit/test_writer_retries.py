"""The projection writer waits out a ClickHouse that refuses inserts: it tries the refused table again
until it is stored, never skips a table and never inserts a stored table twice; stopping it while
ClickHouse refuses leaves the batch uncommitted."""

from __future__ import annotations

import threading
from collections import namedtuple
from typing import Any

import pytest

from projections import writer as writer_module
from projections.writer import ProjectionWriter
from streams import topics

Partition = namedtuple("Partition", "topic partition")
Record = namedtuple("Record", "topic partition offset key value headers timestamp")


class RefusingClient:
    """A ClickHouse client that refuses the first `refusals` inserts, then stores."""

    def __init__(self, refusals: int):
        self.refusals = refusals
        self.stored: list[tuple[str, int]] = []
        self.attempts = 0

    def insert(self, table: str, rows: list[list[Any]], column_names: list[str], settings: Any = None) -> None:
        self.attempts += 1
        if self.refusals > 0:
            self.refusals -= 1
            raise RuntimeError("Code: 243. DB::Exception: Could not perform insert (NOT_ENOUGH_SPACE)")
        self.stored.append((table, len(rows)))


def _writer(client: RefusingClient) -> ProjectionWriter:
    writer = ProjectionWriter.__new__(ProjectionWriter)  # no migrations, no Kafka: only the insert path
    writer.client, writer.database = client, "crm"
    writer._stop = threading.Event()
    writer.failpoints = writer_module.Failpoints("")
    writer._refuse_inserts_file = None
    return writer


def _dead_letter_batch(count: int) -> dict[Any, list[Any]]:
    headers = [("crm.dlq.reason", b"malformed_json"), ("crm.dlq.detail", b"x"),
               ("crm.dlq.source.topic", b"crm.events"), ("crm.dlq.source.partition", b"0"),
               ("crm.dlq.source.offset", b"1"), ("crm.dlq.source.timestamp", b"0")]
    name = topics.DEAD_LETTERS.name
    records = [Record(name, 0, n, b"k", b"{", headers, 1_700_000_000_000) for n in range(count)]
    return {Partition(name, 0): records}


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr(writer_module, "INSERT_RETRY_FIRST_SECONDS", 0.0)


def test_a_refused_insert_is_tried_again_until_it_is_stored_once():
    client = RefusingClient(refusals=3)
    assert _writer(client).write_until_stored(_dead_letter_batch(5))
    assert client.attempts == 4
    assert client.stored == [("crm.dead_letters", 5)]


def test_a_writer_stopped_while_clickhouse_refuses_reports_the_batch_unstored():
    client = RefusingClient(refusals=10**9)
    writer = _writer(client)
    writer._stop.set()
    assert writer.write_until_stored(_dead_letter_batch(2)) is False
    assert client.stored == []


def test_the_refusing_fault_asks_for_more_disk_than_any_disk_has(tmp_path):
    writer = _writer(RefusingClient(refusals=0))
    marker = tmp_path / "refuse"
    writer._refuse_inserts_file = marker
    assert not writer.refusing()
    marker.touch()
    assert writer.refusing()
    assert writer_module.REFUSING_SETTINGS["min_free_disk_bytes_to_perform_insert"] > 2**60
