"""The pure parts of `crm backup` / `crm restore` (services/backup.py): record files, the manifest's
checks, the erasure register and the keys it removes, the erasure request a restore appends."""

from __future__ import annotations

import json
import sqlite3
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from schemas.codec import decode_catalog_event
from schemas.privacy import CustomerErased
from services import backup
from services.backup import BackupError, LogRecord


def erased(customer: str, aliases: tuple[str, ...] = (), keys: tuple[str, ...] = (),
           request: uuid.UUID | None = None) -> CustomerErased:
    return CustomerErased(customer_key=customer, request_event_id=request or uuid.uuid4(), request_id="req-1",
                          requested_by="privacy-officer", erased_at=datetime(2026, 5, 1, 12, tzinfo=UTC),
                          data_keys_shredded=list(keys), aliases_unlinked=list(aliases), points_forfeited=0,
                          alerts_closed=[])


def key_record(partition: int, offset: int, key_id: str, customer: str | None) -> LogRecord:
    value = None if customer is None else orjson.dumps({"key_id": key_id, "customer_key": customer,
                                                         "master_key_id": "m1", "wrapped": "x", "created_at": 1.0})
    return LogRecord(partition, offset, 1_700_000_000_000 + offset, 0, key_id.encode(), value)


def test_records_survive_the_file_byte_for_byte_and_the_file_is_private(tmp_path):
    records = [LogRecord(0, 0, 1_700_000_000_123, 0, b"cust-1", b'{"a":1}', (("crm.dlq.reason", b"x\x00\xff"),)),
               LogRecord(0, 1, 1_700_000_000_124, 0, None, None),
               LogRecord(3, 7, 1, 1, b"\x00\x01", bytes(range(256)), (("h", b""), ("h", b"again")))]
    count, digest, size = backup.write_records(tmp_path / "t.jsonl.zst", records)
    assert count == 3 and size == (tmp_path / "t.jsonl.zst").stat().st_size
    assert digest == backup.sha256_file(tmp_path / "t.jsonl.zst")
    assert stat.S_IMODE((tmp_path / "t.jsonl.zst").stat().st_mode) == 0o600
    assert list(backup.read_records(tmp_path / "t.jsonl.zst")) == records
    with pytest.raises(FileExistsError):
        backup.write_records(tmp_path / "t.jsonl.zst", records)


def test_the_key_topic_is_kept_as_compaction_would_leave_it():
    records = [key_record(0, 0, "k1", "alice"), key_record(0, 1, "k2", "bob"), key_record(1, 0, "k3", "carol"),
               key_record(0, 2, "k1", "alice"),  # rewrapped under another master key
               key_record(0, 3, "k2", None)]     # bob's key shredded
    live = backup.live_keys(records)
    assert [(r.partition, r.offset) for r in live] == [(0, 2), (1, 0)]


def test_later_erasures_are_those_whose_request_the_backup_lacks():
    first, second, third = erased("alice"), erased("bob"), erased("alice")  # alice came back and was erased again
    assert backup.later_erasures([first, second, third, second], [first]) == [second, third]
    assert backup.later_erasures([first], [first]) == []


def test_the_request_a_restore_appended_is_the_same_erasure_as_the_original():
    original = erased("alice")
    again = erased("alice", request=backup.restored_request_id(original.request_event_id))
    # What the worker writes when it folds the appended request, beside the original in the register.
    assert backup.later_erasures([original, again], []) == [original]
    assert backup.later_erasures([original, again], [original]) == []
    assert backup.later_erasures([again], [original]) == []


def test_keys_of_an_erased_customer_and_of_the_aliases_it_unlinked_are_dropped():
    erasures = [erased("alice", aliases=("loyalty_card:77",), keys=("k9",))]
    customers, key_ids = backup.erased_keys(erasures)
    assert customers == {"alice", "loyalty_card:77"} and key_ids == {"k9"}
    dropped = [r for r in (key_record(0, 0, "k1", "alice"), key_record(0, 1, "k2", "loyalty_card:77"),
                           key_record(0, 2, "k9", "someone-renamed"), key_record(0, 3, "k4", "bob"))
               if backup.key_record_erased(r, customers, key_ids)]
    assert [r.key for r in dropped] == [b"k1", b"k2", b"k9"]


def test_the_erasure_request_is_a_valid_event_for_the_same_customer_with_a_derived_id():
    erasure = erased("cust-42")
    event = backup.erasure_request(erasure)
    decoded = decode_catalog_event(event)
    assert decoded.customer_key == "cust-42" and decoded.type == "customer_erasure_requested"
    assert event["payload"] == {"request_id": "req-1", "requested_by": "restore"}
    assert event["event_id"] == str(uuid.uuid5(backup.RESTORE_ERASURE_NAMESPACE, str(erasure.request_event_id)))
    assert backup.erasure_request(erasure) == event
    by_alias = backup.erasure_request(erased("loyalty_card:77"))
    assert decode_catalog_event(by_alias).customer_key == "loyalty_card:77"
    assert "customer_id" not in by_alias


@pytest.mark.parametrize("name", ["register.jsonl", "register.jsonl.zst"])
def test_an_erasure_register_file_round_trips(tmp_path, name):
    erasures = [erased("alice"), erased("bob", aliases=("email_hash:ab",))]
    assert backup.write_register(tmp_path / name, [e.model_dump_json().encode() for e in erasures]) == 2
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert backup.read_register(tmp_path / name) == erasures
    (tmp_path / "bad.jsonl").write_text('{"type": "customer_erased"}\n')
    with pytest.raises(BackupError):
        backup.read_register(tmp_path / "bad.jsonl")


def _backup_dir(tmp_path: Path) -> Path:
    path = tmp_path / "b"
    (path / "topics").mkdir(parents=True)
    records = [LogRecord(0, 0, 1, 0, b"k", b"v")]
    _, digest, _ = backup.write_records(path / backup.topic_file("crm.events"), records)
    (path / backup.MANIFEST).write_text(json.dumps({
        "format": backup.FORMAT, "format_version": backup.FORMAT_VERSION, "created_at": "now",
        "files": {backup.topic_file("crm.events"): digest}, "topics": {}}))
    return path


def test_verify_checks_every_file_against_the_manifest(tmp_path):
    path = _backup_dir(tmp_path)
    assert backup.verify(path)["format"] == backup.FORMAT
    file = path / backup.topic_file("crm.events")
    file.write_bytes(file.read_bytes() + b"\x00")
    with pytest.raises(BackupError, match="sha256"):
        backup.verify(path)
    file.unlink()
    with pytest.raises(BackupError, match="missing"):
        backup.verify(path)
    with pytest.raises(BackupError, match="not a backup"):
        backup.verify(tmp_path)


def test_a_restore_needs_the_secrets_the_backup_was_taken_with():
    m1, m2, identity = b"a" * 32, b"b" * 32, b"c" * 32
    manifest = {"secrets": {"master_keys": {"m1": backup.fingerprint(m1)}, "identity_secret": backup.fingerprint(identity)}}
    assert backup.missing_secrets(manifest, {"m1": m1}, identity, ["m1"]) == []
    assert backup.missing_secrets(manifest, {"m1": m2}, identity, ["m1"]) == [
        "master key 'm1' is not the one the backup was taken with"]
    assert backup.missing_secrets(manifest, {}, None, ["m1"]) == [
        "master key 'm1' (wraps data keys in the backup) is not configured", "the identity secret is not configured"]
    assert backup.missing_secrets({"secrets": {}}, {}, None, []) == []
    assert backup.fingerprint(m1) != backup.fingerprint(m2) and m1.hex() not in backup.fingerprint(m1)


def test_sqlite_stores_are_copied_with_the_online_backup_api(tmp_path):
    source = tmp_path / "live.sqlite"
    db = sqlite3.connect(source)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE subscriptions (id TEXT PRIMARY KEY, secret TEXT)")
    db.executemany("INSERT INTO subscriptions VALUES (?, ?)", [("w1", "s1"), ("w2", "s2")])
    db.commit()  # left open, in WAL mode: as the running alerts service holds it
    (tmp_path / "sqlite").mkdir()
    copied = backup.backup_sqlite(source, tmp_path / "sqlite" / "alerts.sqlite.zst")
    assert copied["tables"] == {"subscriptions": 2}
    assert stat.S_IMODE((tmp_path / "sqlite" / "alerts.sqlite.zst").stat().st_mode) == 0o600
    target = tmp_path / "restored" / "alerts" / "alerts.sqlite"
    assert backup.restore_sqlite(tmp_path / "sqlite" / "alerts.sqlite.zst", target) == {"subscriptions": 2}
    assert sqlite3.connect(target).execute("SELECT * FROM subscriptions ORDER BY id").fetchall() == [("w1", "s1"),
                                                                                                     ("w2", "s2")]
    db.close()
