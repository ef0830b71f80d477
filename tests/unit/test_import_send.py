"""Sending an import: order, progress, resumption, dead letters (services/importer/send.py, run.py,
progress.py), against a stand-in for kafka-python's producer."""

import base64
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import orjson
import pytest
from kafka.errors import KafkaTimeoutError
from rich.console import Console

from projections import dead_letters_table
from services.importer import send
from services.importer.mapping import load
from services.importer.plan import plan, stream_digest
from services.importer.progress import ImportBusy, ImportFolder, StreamProgress
from services.importer.run import Options, command, run
from services.importer.sample import write_export
from services.ingest.sealing import Sealer, offline_keys
from streams.config import Settings

SECRET = b"test-identity-secret"  # the identity secret e-mails and phones are hashed under
SEALER = Sealer(offline_keys(b"test-data-keys"), SECRET)


@pytest.fixture(autouse=True)
def secrets_without_kafka(monkeypatch):
    """The import hashes under SECRET and seals with keys derived offline (no key store)."""
    monkeypatch.setenv("CRM_IDENTITY_SECRET", base64.b64encode(SECRET).decode())
    monkeypatch.setattr(Sealer, "open", classmethod(lambda cls, settings, follow=True, producer=None: SEALER))


def on_the_wire(event) -> bytes:
    """A planned event as it goes to Kafka: personal fields sealed."""
    return orjson.dumps(SEALER.seal([orjson.loads(event.value)])[0]) if event.personal else event.value

PARTITIONS = 6


class Acknowledgement:
    """A record's future: acknowledged at once, or failed."""

    def __init__(self, error: Exception | None = None):
        self.error = error
        self.is_done = True

    def succeeded(self) -> bool:
        return self.error is None

    def get(self, timeout: float) -> None:
        if self.error is not None:
            raise self.error


@dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes
    partition: int | None
    headers: list | None


class Producer:
    """Records what is sent; the n-th event (from 1) can fail, or be interrupted by Ctrl-C."""

    def __init__(self, fail_at: int | None = None, interrupt_at: int | None = None):
        self.sent: list[Sent] = []
        self.fail_at, self.interrupt_at = fail_at, interrupt_at

    @property
    def events(self) -> list[Sent]:
        return [record for record in self.sent if record.topic == "crm.events"]

    def by_partition(self) -> dict[int, list[bytes]]:
        found: dict[int, list[bytes]] = defaultdict(list)
        for record in self.events:
            found[record.partition].append(record.value)
        return dict(found)

    def partitions_for(self, topic: str) -> set[int]:
        return set(range(PARTITIONS))

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"", partition: int | None = None,
             headers: list | None = None) -> Acknowledgement:
        number = len(self.events) + 1
        if topic == "crm.events" and number == self.interrupt_at:
            raise KeyboardInterrupt
        self.sent.append(Sent(topic, key, value, partition, headers))
        failed = topic == "crm.events" and number == self.fail_at
        return Acknowledgement(KafkaTimeoutError("no answer") if failed else None)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


@pytest.fixture
def export(tmp_path):
    return write_export(tmp_path / "export", customers=40)


@pytest.fixture
def streams(export):
    return plan(load(export.mapping), "DE", SECRET).streams


@pytest.fixture
def long_export(tmp_path):
    """Partitions' streams longer than a chunk (100 events)."""
    return write_export(tmp_path / "long", customers=250)


@pytest.fixture
def settings(tmp_path):
    return Settings(state_dir=tmp_path / "state", kafka_bootstrap_override="unused:9092")


def importing(monkeypatch, settings, export, producer: Producer, **options):
    monkeypatch.setattr(send, "producer", lambda bootstrap: producer)
    return run(export.mapping, settings, Options(show_progress=False, **options), Console(quiet=True))


def values(streams, start: dict[int, int] | None = None) -> dict[int, list[bytes]]:
    start = start or {}
    return {p: [on_the_wire(e) for e in stream[start.get(p, 0):]] for p, stream in streams.items()
            if stream[start.get(p, 0):]}


def test_each_partitions_stream_goes_to_its_partition_in_order_with_its_customers_key(
        monkeypatch, settings, export, streams):
    producer = Producer()
    outcome = importing(monkeypatch, settings, export, producer)
    assert producer.by_partition() == values(streams)
    assert all(record.key == event.key for record, event in
               zip(producer.events, [e for p in sorted(streams) for e in streams[p]]))
    assert (outcome.status, outcome.sent, outcome.events) == ("sent", export.expected.events, export.expected.events)


def test_the_rejects_go_to_the_dead_letter_topic_once_the_events_are_sent(monkeypatch, settings, export):
    producer = Producer()
    outcome = importing(monkeypatch, settings, export, producer)
    rejects = sum(export.expected.rejected.values())
    assert [r.topic for r in producer.sent[-rejects:]] == ["crm.events.deadletter"] * rejects
    assert outcome.dead_letters == rejects


def test_a_finished_import_run_again_sends_nothing(monkeypatch, settings, export):
    importing(monkeypatch, settings, export, Producer())
    again = Producer()
    outcome = importing(monkeypatch, settings, export, again)
    assert outcome.status == "already_imported" and again.sent == []


def test_resend_sends_everything_again_byte_for_byte(monkeypatch, settings, export):
    first, second = Producer(), Producer()
    importing(monkeypatch, settings, export, first)
    importing(monkeypatch, settings, export, second, resend=True)
    assert [(r.topic, r.key, r.value, r.partition) for r in second.sent] == \
        [(r.topic, r.key, r.value, r.partition) for r in first.sent]


def test_a_run_resumes_each_partition_after_its_acknowledged_prefix(monkeypatch, settings, export, streams):
    folder = ImportFolder(settings.state_dir, "sample")
    done = {0: 7, 3: len(streams[3])}
    for partition, acknowledged in done.items():
        folder.save(StreamProgress(partition, stream_digest(streams[partition]), len(streams[partition]), acknowledged))
    producer = Producer()
    outcome = importing(monkeypatch, settings, export, producer)
    assert producer.by_partition() == values(streams, done)
    assert (outcome.earlier, outcome.sent) == (sum(done.values()), export.expected.events - sum(done.values()))


def test_a_partition_whose_stream_changed_is_sent_from_its_beginning(monkeypatch, settings, export, streams):
    ImportFolder(settings.state_dir, "sample").save(StreamProgress(2, "another stream", 10, 5))
    producer = Producer()
    outcome = importing(monkeypatch, settings, export, producer)
    assert producer.by_partition() == values(streams) and outcome.restarted == 1


def acknowledged(settings, streams) -> dict[int, int]:
    folder = ImportFolder(settings.state_dir, "sample")
    return {partition: folder.load(partition).acknowledged for partition in streams}


def test_progress_never_counts_a_record_kafka_did_not_acknowledge(monkeypatch, settings, long_export):
    streams = plan(load(long_export.mapping), "DE", SECRET).streams
    failing = Producer(fail_at=700)
    with pytest.raises(KafkaTimeoutError):
        importing(monkeypatch, settings, long_export, failing)
    failed = failing.events[699]
    position = [r.value for r in failing.events if r.partition == failed.partition].index(failed.value)
    done = acknowledged(settings, streams)
    assert 0 < done[failed.partition] <= position and done[failed.partition] % 100 == 0
    assert all(done[p] <= len([r for r in failing.events if r.partition == p]) for p in streams)
    producer = Producer()
    importing(monkeypatch, settings, long_export, producer)
    assert producer.by_partition() == values(streams, done)


def test_ctrl_c_keeps_what_was_acknowledged_and_the_next_run_sends_the_rest(monkeypatch, settings, long_export):
    streams = plan(load(long_export.mapping), "DE", SECRET).streams
    outcome = importing(monkeypatch, settings, long_export, Producer(interrupt_at=900))
    done = acknowledged(settings, streams)
    assert outcome.status == "interrupted" and outcome.acknowledged == sum(done.values()) < 900
    producer = Producer()
    importing(monkeypatch, settings, long_export, producer)
    assert producer.by_partition() == values(streams, done)


def test_the_streams_go_out_a_chunk_of_each_partition_in_turn(monkeypatch, settings, long_export):
    producer = Producer()
    importing(monkeypatch, settings, long_export, producer)
    runs = [record.partition for record in producer.events[:600]]
    assert runs[:200] == [runs[0]] * 100 + [runs[100]] * 100 and runs[0] != runs[100]


def test_a_large_import_is_sent_by_one_process_per_core_with_the_same_result(monkeypatch, settings, export, streams):
    from services.importer import run as importer

    monkeypatch.setattr(importer, "PARALLEL_ROWS", 0)
    outcome = importing(monkeypatch, settings, export, Producer())
    assert (outcome.status, outcome.sent, outcome.events) == ("sent", export.expected.events, export.expected.events)
    assert outcome.dead_letters == sum(export.expected.rejected.values())
    folder = ImportFolder(settings.state_dir, "sample")
    for partition, stream in streams.items():
        assert folder.load(partition) == StreamProgress(partition, stream_digest(stream), len(stream), len(stream))


def test_a_dry_run_writes_the_reject_report_and_sends_nothing(monkeypatch, settings, export):
    producer = Producer()
    outcome = importing(monkeypatch, settings, export, producer, dry_run=True)
    assert outcome.status == "checked" and producer.sent == []
    lines = outcome.folder.rejects_file.read_text().splitlines()
    assert lines[0] == "file,line,reason,detail,customer_key,original"
    assert len(lines) == 1 + sum(export.expected.rejected.values())


def test_each_rejected_row_is_one_dead_letters_row_however_often_it_is_sent(monkeypatch, settings, export):
    producer = Producer()
    importing(monkeypatch, settings, export, producer)
    importing(monkeypatch, settings, export, producer, resend=True)
    letters = [SimpleNamespace(headers=r.headers, key=r.key, value=r.value, partition=0, offset=n)
               for n, r in enumerate(producer.sent) if r.topic == "crm.events.deadletter"]
    rows = [dict(zip(dead_letters_table.COLUMNS, row)) for row in dead_letters_table.rows(letters)]
    positions = {(row["source_topic"], row["source_partition"], row["source_offset"]) for row in rows}
    assert len(rows) == 2 * len(positions) == 2 * sum(export.expected.rejected.values())
    negative = next(row for row in rows if row["detail"].startswith("negative_quantity"))
    assert negative["reason"] == "import_row_invalid"
    assert negative["source_topic"] == "import:sample:orders:orders.csv"
    assert negative["original"].split(b";")[6] == b"-1"
    assert negative["record_key"] == b"imp-000000"


def test_a_second_process_cannot_run_an_import_while_one_runs_it(settings):
    with ImportFolder(settings.state_dir, "sample").lock():
        with pytest.raises(ImportBusy):
            with ImportFolder(settings.state_dir, "sample").lock():
                pass


def test_the_command_says_what_happened_and_where_the_rejects_are(monkeypatch, settings, export, capsys):
    monkeypatch.setattr(send, "producer", lambda bootstrap: Producer())
    assert command(export.mapping, settings, Options(show_progress=False)) == 0
    out = capsys.readouterr().out
    assert "orders.csv" in out and "rows rejected" in out
    assert "crm dlq list --reason import_row_invalid" in out and "sent " in out


def test_personal_values_reach_kafka_only_sealed_and_dead_letters_keep_no_customer_row(monkeypatch, settings,
                                                                                        export):
    from schemas.codec import decode_event
    from schemas.envelope import Envelope

    producer = Producer()
    importing(monkeypatch, settings, export, producer)
    registrations = [r for r in producer.events if b'"customer_registered"' in r.value]
    assert registrations
    for record in producer.events:
        assert isinstance(decode_event(record.value), Envelope)  # the worker would take it: nothing in clear
    for record in registrations:
        payload = orjson.loads(record.value)["payload"]
        assert payload["email"].startswith("pii1.") and "@" not in record.value.decode()
        assert 1 <= payload.get("birth_month", 1) <= 12
    letters = [r for r in producer.sent if r.topic == "crm.events.deadletter"]
    from_customers = [r for r in letters if dict(r.headers)["crm.dlq.source.topic"].startswith(b"import:sample:customers:")]
    assert from_customers, "the sample export has a customer row that is rejected"
    for record in from_customers:
        assert b"@" not in record.value and orjson.loads(record.value)["row"] == "[redacted]"
        assert b"@" not in dict(record.headers)["crm.dlq.detail"]
