"""`crm backup` and `crm restore` (docs/backup.md): what the platform cannot recompute, in one directory.

A backup holds the logs that are kept forever and from which everything else is derived (crm.events,
crm.events.deadletter), the records nobody can recompute (crm.audit, crm.erasures: the erasure
register), the wrapped data keys of crm.customer-keys as they are at backup time (never a master key),
and the SQLite stores of the alerts service and the ingestion API, each file zstd-compressed, and a
manifest. Derived topics and the ClickHouse projections are not copied: the worker folds the restored
log again from offset 0 and the projection writer fills ClickHouse from what it emits.

Consistency while the stack runs: the end offsets of crm.events and crm.events.deadletter are taken
first, then those of the other topics, and every topic is read up to its end offset. A data key is
written (and acknowledged) before any event sealed under it, so every sealed event in the backup has
its key in the backup too.

A restore never brings an erased customer back: erasures the restored installation knows of (its own
crm.erasures before it is wiped, and erasure registers given with `--erasures`) that the backup's own
register lacks drop those customers' data keys from what is restored, and append a
`customer_erasure_requested` event for each after the restored records, so the worker erases them
again in every projection."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import platform
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import zstandard

from schemas.envelope import AliasType
from schemas.privacy import AuditRecord, CustomerErased
from services.privacy import audit
from streams import topics
from streams.config import PROJECT_ROOT, Settings

FORMAT = "crm-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REGISTER_FORMAT = "crm-erasure-register"

# Copied record for record, partition by partition, so that offsets match after a restore. The
# first group's end offsets are taken before the second's (see the module's docstring).
LOG_TOPICS = (topics.EVENTS, topics.DEAD_LETTERS)
KEPT_TOPICS = (topics.AUDIT, topics.ERASURES)
# Copied as it is at backup time: the newest wrapped record per key id, tombstoned keys left out.
KEY_TOPIC = topics.CUSTOMER_KEYS
RESTORED_TOPICS = (*LOG_TOPICS, *KEPT_TOPICS, KEY_TOPIC)

# event_id of the erasure request a restore appends: uuid5 of the original request's event_id, so two
# restores append the same event and the worker's de-duplication keeps one.
RESTORE_ERASURE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "crm-platform:restore:customer_erasure_requested")

CHUNK_RECORDS = 20_000
ZSTD_LEVEL = 10
_FINGERPRINT_LABEL = b"crm backup fingerprint v1"


class BackupError(RuntimeError):
    """Something the operator must fix; the message says what."""


# --- records in files --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LogRecord:
    """One Kafka record as the backup keeps it: everything a producer sets, and where it was."""
    partition: int
    offset: int
    timestamp: int
    timestamp_type: int  # 0 CreateTime (what the platform's topics use), 1 LogAppendTime
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    def to_line(self) -> bytes:
        return orjson.dumps({
            "p": self.partition, "o": self.offset, "t": self.timestamp, "tt": self.timestamp_type,
            "k": _b64(self.key), "v": _b64(self.value), "h": [[name, _b64(value)] for name, value in self.headers],
        }) + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> LogRecord:
        data = orjson.loads(line)
        return cls(data["p"], data["o"], data["t"], data["tt"], _unb64(data["k"]), _unb64(data["v"]),
                   tuple((name, _unb64(value) or b"") for name, value in data["h"]))

    @classmethod
    def from_consumer(cls, record: Any) -> LogRecord:
        return cls(record.partition, record.offset, record.timestamp, record.timestamp_type, record.key,
                   record.value, tuple((name, value or b"") for name, value in (record.headers or ())))


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def write_records(path: Path, records: Iterable[LogRecord]) -> tuple[int, str, int]:
    """Write records zstd-compressed to a new 0600 file; (records, sha256 of the file, bytes)."""
    count = 0
    with _private_file(path) as raw:
        with zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw, closefd=False) as compressed:
            for record in records:
                compressed.write(record.to_line())
                count += 1
    return count, sha256_file(path), path.stat().st_size


def read_records(path: Path) -> Iterator[LogRecord]:
    with open(path, "rb") as raw:
        reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))  # type: ignore[arg-type]
        for line in reader:
            if line.strip():
                yield LogRecord.from_line(line)


def _private_file(path: Path) -> Any:
    """A new file only its owner may read (0600), refusing to overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the erasure register and the keys it removes -----------------------------------------------------

def parse_erasures(values: Iterable[bytes | None], strict: bool = True) -> list[CustomerErased]:
    """CustomerErased records from record values (tombstones and, unless strict, invalid values skipped)."""
    found = []
    for value in values:
        if value is None:
            continue
        try:
            found.append(CustomerErased.model_validate_json(value))
        except ValueError:
            if strict:
                raise BackupError(f"not a customer_erased record: {value[:120]!r}") from None
    return found


def later_erasures(known: Iterable[CustomerErased], in_backup: Iterable[CustomerErased]) -> list[CustomerErased]:
    """The erasures known now that the backup's register lacks, once each, in the order first met.
    An erasure is its request (request_event_id): a customer who came back after one erasure and was
    erased again after the backup has a second one the backup lacks. The request a restore appended
    for an erasure (its event_id derived from the original's) is the same erasure as the original."""
    known = list(known)
    again = {restored_request_id(e.request_event_id) for e in known}
    covered = {e.request_event_id for e in in_backup}
    covered |= {restored_request_id(r) for r in covered}
    later: dict[uuid.UUID, CustomerErased] = {}
    for erasure in known:
        if erasure.request_event_id in covered or erasure.request_event_id in again:
            continue
        later.setdefault(erasure.request_event_id, erasure)
    return list(later.values())


def restored_request_id(request_event_id: uuid.UUID) -> uuid.UUID:
    """event_id of the erasure request a restore appends for the original request `request_event_id`."""
    return uuid.uuid5(RESTORE_ERASURE_NAMESPACE, str(request_event_id))


def erased_keys(erasures: Iterable[CustomerErased]) -> tuple[set[str], set[str]]:
    """(customer keys and alias keys, data key ids) whose wrapped data keys an erasure removed."""
    customers: set[str] = set()
    key_ids: set[str] = set()
    for erasure in erasures:
        customers.add(erasure.customer_key)
        customers.update(erasure.aliases_unlinked)
        key_ids.update(erasure.data_keys_shredded)
    return customers, key_ids


def key_record_erased(record: LogRecord, customers: set[str], key_ids: set[str]) -> bool:
    key_id = record.key.decode() if record.key else ""
    if key_id in key_ids:
        return True
    try:
        customer = orjson.loads(record.value or b"null")["customer_key"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return False
    return customer in customers


def live_keys(records: Iterable[LogRecord]) -> list[LogRecord]:
    """What a compacted key topic says now: the newest record per key id, tombstoned ids left out,
    in the order of each id's newest record."""
    newest: dict[tuple[int, bytes | None], LogRecord] = {}
    for record in records:
        newest.pop((record.partition, record.key), None)
        if record.value is not None:
            newest[(record.partition, record.key)] = record
    return sorted(newest.values(), key=lambda r: (r.partition, r.offset))


def erasure_request(erasure: CustomerErased) -> dict[str, Any]:
    """The `customer_erasure_requested` event a restore appends for an erasure the backup lacks: the
    original request again (its request_id, its event time), requested by "restore", with an event_id
    derived from the original's."""
    customer = erasure.customer_key
    alias, sep, value = customer.partition(":")
    who: dict[str, Any] = ({"identifiers": {alias: value}} if sep and alias in {a.value for a in AliasType}
                           else {"customer_id": customer})
    event = {
        "event_id": str(restored_request_id(erasure.request_event_id)),
        "type": "customer_erasure_requested", "schema_version": 1, **who,
        "occurred_at": erasure.erased_at.isoformat(),
        "source": {"channel": "system"},
        "payload": {"request_id": erasure.request_id, "requested_by": "restore"},
    }
    from schemas.events import event_model

    model = event_model("customer_erasure_requested")
    assert model is not None
    assert model.model_validate(event).customer_key == customer
    return event


def write_register(path: Path, erasures: Iterable[bytes]) -> int:
    """An erasure register file: one customer_erased record per line (JSON Lines), zstd-compressed
    when the name ends in .zst; 0600. It holds only pseudonymous customer keys."""
    lines = b"".join(value.rstrip(b"\n") + b"\n" for value in erasures)
    with _private_file(path) as handle:
        handle.write(zstandard.ZstdCompressor().compress(lines) if path.suffix == ".zst" else lines)
    return lines.count(b"\n")


def read_register(path: Path) -> list[CustomerErased]:
    """Erasures from a register file (`crm backup --erasures-only`) or from a backup directory."""
    if path.is_dir():
        return parse_erasures((r.value for r in read_records(path / topic_file(topics.ERASURES.name))), strict=False)
    raw = path.read_bytes()
    if raw[:4] == b"\x28\xb5\x2f\xfd":  # zstd frame
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return parse_erasures(line for line in raw.splitlines() if line.strip())


# --- the manifest -------------------------------------------------------------------------------------

def topic_file(name: str) -> str:
    return f"topics/{name}.jsonl.zst"


def store_file(name: str) -> str:
    return f"sqlite/{name}.sqlite.zst"


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {"format": str(FORMAT_VERSION), "python": platform.python_version()}
    for package in ("crm-platform", "kafka-python", "zstandard"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "unknown"
    pom = PROJECT_ROOT / "deploy" / "kafka" / "pom.xml"
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text()) if pom.exists() else None
    found["kafka-broker"] = match.group(1) if match else "unknown"
    return found


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a backup directory after checking every file it lists against its sha256."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise BackupError(f"{path} is not a backup: no {MANIFEST}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"{path}: not a {FORMAT} of version {FORMAT_VERSION} "
                          f"({manifest.get('format')} {manifest.get('format_version')})")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.exists():
            raise BackupError(f"{path}: {name} is missing")
        if sha256_file(file) != expected:
            raise BackupError(f"{path}: {name} does not match its sha256 in the manifest (damaged or altered)")
    return manifest


def fingerprint(secret: bytes) -> str:
    """Names a secret without revealing it: a restore checks that it was given the same one."""
    return hmac.new(secret, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def available_secrets(state_dir: Path) -> tuple[dict[str, bytes], bytes | None]:
    """(master keys by id, identity secret) as configured or kept under <state dir>/secrets; never
    made here (privacy/secrets.py makes them on first use)."""
    from privacy.secrets import MasterKeyring, secrets_dir

    text = os.environ.get("CRM_MASTER_KEYS")
    path = secrets_dir(state_dir) / "master-keys"
    if not text and path.exists():
        text = path.read_text()
    masters = dict(MasterKeyring.parse(text).keys) if text else {}
    identity = None
    if os.environ.get("CRM_IDENTITY_SECRET"):
        identity = base64.b64decode(os.environ["CRM_IDENTITY_SECRET"])
    elif (secrets_dir(state_dir) / "identity-secret").exists():
        identity = base64.b64decode((secrets_dir(state_dir) / "identity-secret").read_text().strip())
    return masters, identity


def missing_secrets(manifest: dict[str, Any], masters: dict[str, bytes], identity: bytes | None,
                    needed_masters: Iterable[str]) -> list[str]:
    """What the restored installation lacks to open what the backup holds, or has in another version."""
    recorded = manifest.get("secrets", {})
    problems = []
    for key_id in sorted(set(needed_masters)):
        if key_id not in masters:
            problems.append(f"master key {key_id!r} (wraps data keys in the backup) is not configured")
        elif key_id in recorded.get("master_keys", {}) and recorded["master_keys"][key_id] != fingerprint(masters[key_id]):
            problems.append(f"master key {key_id!r} is not the one the backup was taken with")
    if recorded.get("identity_secret"):
        if identity is None:
            problems.append("the identity secret is not configured")
        elif fingerprint(identity) != recorded["identity_secret"]:
            problems.append("the identity secret is not the one the backup was taken with")
    return problems


# --- backup -------------------------------------------------------------------------------------------

@dataclass
class TopicCopy:
    name: str
    partitions: dict[int, dict[str, int]] = field(default_factory=dict)
    records: int = 0


def _consumer(bootstrap: str) -> Any:
    from kafka import KafkaConsumer

    return KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024,
                         fetch_max_bytes=64 * 1024 * 1024, consumer_timeout_ms=0, client_id="crm-backup")


def _existing_topics(bootstrap: str) -> set[str]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="crm-backup")
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def _offsets(consumer: Any, spec: topics.TopicSpec) -> tuple[dict[int, int], dict[int, int]]:
    from kafka import TopicPartition

    partitions = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
    begins, ends = consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
    return {tp.partition: begins[tp] for tp in partitions}, {tp.partition: ends[tp] for tp in partitions}


def _read(consumer: Any, topic: str, partition: int, begin: int, end: int, timeout: float = 300.0) -> Iterator[LogRecord]:
    """Every record of one partition from `begin` up to (not including) `end`, in offset order."""
    from kafka import TopicPartition

    if end <= begin:
        return
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.seek(tp, begin)
    deadline = time.monotonic() + timeout
    while consumer.position(tp) < end:
        batch = consumer.poll(timeout_ms=500, max_records=5000)
        if batch:
            deadline = time.monotonic() + timeout
        elif time.monotonic() > deadline:
            raise BackupError(f"{topic}[{partition}]: no records for {timeout:.0f} s before offset {end}")
        for record in batch.get(tp, ()):
            if record.offset < end:
                yield LogRecord.from_consumer(record)


def read_topic(consumer: Any, spec: topics.TopicSpec, begins: dict[int, int], ends: dict[int, int],
               copy: TopicCopy) -> Iterator[LogRecord]:
    for partition in range(spec.partitions):
        count = 0
        for record in _read(consumer, spec.name, partition, begins[partition], ends[partition]):
            count += 1
            yield record
        copy.partitions[partition] = {"start_offset": begins[partition], "end_offset": ends[partition], "records": count}
        copy.records += count


def _sqlite_copy(source: Path, target: Path) -> dict[str, int]:
    """`source` into `target` with SQLite's online backup API (consistent while an owner writes
    either); the row count of each table copied."""
    src = sqlite3.connect(source, timeout=30.0)
    dst = sqlite3.connect(target, timeout=30.0)
    try:
        src.backup(dst)
        return {name: dst.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
                for (name,) in dst.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                           "AND name NOT LIKE 'sqlite_%' ORDER BY name")}
    finally:
        dst.close()
        src.close()


def backup_sqlite(source: Path, target: Path) -> dict[str, Any]:
    """Copy a live SQLite database with SQLite's online backup API (consistent while its owner
    writes), compressed into `target` (0600)."""
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        os.chmod(scratch, 0o700)
        copy = Path(scratch) / "copy.sqlite"
        tables = _sqlite_copy(source, copy)
        with open(copy, "rb") as raw, _private_file(target) as out:
            zstandard.ZstdCompressor(level=ZSTD_LEVEL).copy_stream(raw, out)
    return {"tables": tables, "bytes": target.stat().st_size}


def take_backup(settings: Settings, path: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Write a backup of the installation `settings` names into the new directory `path`."""
    started = time.time()
    if path.exists() and any(path.iterdir()):
        raise BackupError(f"{path} exists and is not empty; a backup goes into a new directory")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    for folder in ("topics", "sqlite"):
        (path / folder).mkdir(mode=0o700)
    bootstrap = settings.kafka_bootstrap
    existing = _existing_topics(bootstrap)
    if topics.EVENTS.name not in existing:
        raise BackupError(f"{bootstrap} has no {topics.EVENTS.name} topic: nothing to back up")
    consumer = _consumer(bootstrap)
    manifest: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
                                "created_at": datetime.now(UTC).isoformat(), "kafka_bootstrap": bootstrap,
                                "state_dir": str(settings.state_dir), "topics": {}, "sqlite": {}, "files": {}}
    try:
        # End offsets: the logs first, then the rest (keys are written before events sealed under them).
        offsets = {spec.name: _offsets(consumer, spec) for spec in LOG_TOPICS if spec.name in existing}
        offsets.update({spec.name: _offsets(consumer, spec) for spec in (*KEPT_TOPICS, KEY_TOPIC)
                        if spec.name in existing})
        manifest["offsets_taken_at"] = datetime.now(UTC).isoformat()
        for spec in (*LOG_TOPICS, *KEPT_TOPICS):
            if spec.name not in offsets:
                continue
            copy = TopicCopy(spec.name)
            name = topic_file(spec.name)
            _, digest, size = write_records(path / name, read_topic(consumer, spec, *offsets[spec.name], copy))
            manifest["topics"][spec.name] = {"file": name, "partitions": copy.partitions, "records": copy.records,
                                            "bytes": size}
            manifest["files"][name] = digest
            say(f"{spec.name}: {copy.records:,} records")
        register = (parse_erasures((r.value for r in read_records(path / topic_file(topics.ERASURES.name))),
                                   strict=False) if topics.ERASURES.name in offsets else [])
        if KEY_TOPIC.name in offsets:
            copy = TopicCopy(KEY_TOPIC.name)
            records = live_keys(read_topic(consumer, KEY_TOPIC, *offsets[KEY_TOPIC.name], copy))
            # Never a key of a customer the backup's own register says was erased (its tombstone may
            # not have reached the key topic yet when the offsets were taken).
            customers, key_ids = erased_keys(register)
            kept = [r for r in records if not key_record_erased(r, customers, key_ids)]
            name = topic_file(KEY_TOPIC.name)
            count, digest, size = write_records(path / name, kept)
            manifest["topics"][KEY_TOPIC.name] = {
                "file": name, "partitions": copy.partitions, "records_read": copy.records, "records": count,
                "left_out_erased": len(records) - count, "bytes": size, "content": "live wrapped data keys"}
            manifest["files"][name] = digest
            master_ids = sorted({orjson.loads(r.value)["master_key_id"] for r in kept if r.value})
            manifest["master_key_ids"] = master_ids
            say(f"{KEY_TOPIC.name}: {count:,} wrapped data keys (of {copy.records:,} records read)")
        manifest["erasure_register"] = {"topic": topics.ERASURES.name, "erasures": len(register)}
    finally:
        consumer.close()
    for name, source in (("alerts", settings.alerts_db), ("ingest", settings.ingest_db)):
        if not source.exists():
            manifest["sqlite"][name] = {"file": None, "note": f"{source} does not exist"}
            continue
        file = store_file(name)
        manifest["sqlite"][name] = {"file": file, **backup_sqlite(source, path / file)}
        manifest["files"][file] = sha256_file(path / file)
        say(f"{name} store: " + ", ".join(f"{t} {n:,}" for t, n in manifest["sqlite"][name]["tables"].items()))
    masters, identity = available_secrets(settings.state_dir)
    manifest["secrets"] = {"note": "not in the backup: keep the master keys and the identity secret apart",
                           "master_keys": {key_id: fingerprint(key) for key_id, key in masters.items()},
                           "identity_secret": fingerprint(identity) if identity else None}
    manifest["seconds"] = round(time.time() - started, 3)
    # Written last: a directory without a manifest is an unfinished backup, which restore refuses.
    with _private_file(path / MANIFEST) as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
    return manifest


def export_erasures(settings: Settings, path: Path) -> int:
    """The erasure register (every record of crm.erasures) into a file of its own; the count."""
    consumer = _consumer(settings.kafka_bootstrap)
    try:
        if topics.ERASURES.name not in _existing_topics(settings.kafka_bootstrap):
            values: list[bytes] = []
        else:
            begins, ends = _offsets(consumer, topics.ERASURES)
            values = [r.value for r in read_topic(consumer, topics.ERASURES, begins, ends, TopicCopy("x"))
                      if r.value is not None]
    finally:
        consumer.close()
    return write_register(path, values)


def current_register(settings: Settings) -> list[CustomerErased]:
    """The erasures the installation's broker knows of (empty when it has no crm.erasures)."""
    if topics.ERASURES.name not in _existing_topics(settings.kafka_bootstrap):
        return []
    consumer = _consumer(settings.kafka_bootstrap)
    try:
        begins, ends = _offsets(consumer, topics.ERASURES)
        return parse_erasures((r.value for r in read_topic(consumer, topics.ERASURES, begins, ends, TopicCopy("x"))),
                              strict=False)
    finally:
        consumer.close()


# --- restore ------------------------------------------------------------------------------------------

@dataclass
class RestoreReport:
    backup: str
    created_at: str
    topics: dict[str, int] = field(default_factory=dict)
    keys_restored: int = 0
    keys_dropped: int = 0
    erasures_reapplied: list[str] = field(default_factory=list)  # pseudonymous customer keys
    stores: dict[str, dict[str, int]] = field(default_factory=dict)
    wiped: bool = False

    def lines(self) -> list[str]:
        out = [f"restored {self.backup} (taken {self.created_at})"]
        out += [f"  {name}: {count:,} records, offsets as in the backup" for name, count in self.topics.items()]
        out.append(f"  {KEY_TOPIC.name}: {self.keys_restored:,} wrapped data keys"
                   + (f"; {self.keys_dropped:,} left out (customers erased after the backup)" if self.keys_dropped else ""))
        if self.erasures_reapplied:
            out.append(f"  erasures after the backup, requested again: {len(self.erasures_reapplied)} "
                       f"(appended to {topics.EVENTS.name}; the worker erases them again)")
        for name, tables in self.stores.items():
            out.append(f"  {name} store: " + ", ".join(f"{t} {n:,}" for t, n in tables.items()))
        return out


def _end_offsets(settings: Settings, specs: Iterable[topics.TopicSpec]) -> dict[str, int]:
    """Sum of end offsets per existing topic (0: never written)."""
    existing = _existing_topics(settings.kafka_bootstrap)
    consumer = _consumer(settings.kafka_bootstrap)
    try:
        return {spec.name: sum(_offsets(consumer, spec)[1].values()) for spec in specs if spec.name in existing}
    finally:
        consumer.close()


def wipe_state_dir(settings: Settings, keep: Iterable[str] = ("secrets",)) -> None:
    """Stop what runs on the local state directory and delete everything in it but the secrets."""
    from deploy.kafka.broker import LocalBroker

    for daemon in _daemons(settings):
        daemon.stop()
    LocalBroker(settings).stop()
    for entry in settings.state_dir.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _daemons(settings: Settings) -> list[Any]:
    """The local stack's background processes (services/processes.py), those that write first."""
    from services import processes

    names = ("dashboard", "alerts", "intake", "worker", "writer")
    return [getattr(processes, name)(settings) for name in names if hasattr(processes, name)]


def running_processes(settings: Settings) -> list[str]:
    return [d.name for d in _daemons(settings) if d.pid()]


def _producer(bootstrap: str) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=20,
                         batch_size=1024 * 1024, max_request_size=16 * 1024 * 1024, compression_type="zstd",
                         client_id="crm-restore")


def produce_in_order(producer: Any, topic: str, records: Iterable[LogRecord], keep_offsets: bool) -> int:
    """Send records to their partitions with their timestamps and headers, in order; with
    `keep_offsets`, check that each lands at its original offset."""
    pending: list[tuple[LogRecord, Any]] = []
    count = 0

    def settle() -> None:
        producer.flush()
        for record, future in pending:
            landed = future.get(timeout=60)
            if keep_offsets and landed.offset != record.offset:
                raise BackupError(f"{topic}[{record.partition}]: a record of offset {record.offset} landed at "
                                  f"{landed.offset}; the topic was not empty, or the backup has a gap")
        pending.clear()

    for record in records:
        future = producer.send(topic, key=record.key, value=record.value, partition=record.partition,
                               timestamp_ms=record.timestamp, headers=list(record.headers) or None)
        pending.append((record, future))
        count += 1
        if len(pending) >= CHUNK_RECORDS:
            settle()
    settle()
    return count


def restore_sqlite(compressed: Path, target: Path) -> dict[str, int]:
    """Write a backed-up database into `target` with SQLite's backup API; its table counts."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        os.chmod(scratch, 0o700)
        plain = Path(scratch) / "restore.sqlite"
        with open(compressed, "rb") as raw, _private_file(plain) as out:
            zstandard.ZstdDecompressor().copy_stream(raw, out)
        tables = _sqlite_copy(plain, target)
    os.chmod(target, 0o600)
    return tables


def audit_record(report: RestoreReport, reason: str, outcome: str = "allowed") -> AuditRecord:
    return audit.build(audit.cli_actor(), "operator", "restore", outcome, reason=reason, detail=(
        f"backup taken {report.created_at}; " + ", ".join(f"{n} {c}" for n, c in report.topics.items())
        + f"; data keys {report.keys_restored} restored, {report.keys_dropped} left out; "
        f"erasures requested again {len(report.erasures_reapplied)}"))


def restore(settings: Settings, path: Path, erasure_files: Iterable[Path] = (), force: bool = False,
            reason: str | None = None, say: Callable[[str], None] = print) -> RestoreReport:
    """Restore the backup in `path` into the installation `settings` names (see the module docstring).
    `force`: wipe the local state directory first (all but its secrets), after reading its erasures."""
    manifest = verify(path)
    report = RestoreReport(str(path), manifest["created_at"])
    bootstrap = settings.kafka_bootstrap
    if settings.uses_local_kafka:
        from deploy.kafka.broker import LocalBroker

        if force and path.resolve().is_relative_to(settings.state_dir.resolve()):
            raise BackupError(f"the backup lies inside {settings.state_dir}, which --force would wipe; move it first")
        running = running_processes(settings)
        if running and not force:
            raise BackupError(f"{', '.join(running)} running on {settings.state_dir}; stop them first (crm stop)")
        LocalBroker(settings).start()
    elif force:
        raise BackupError("--force wipes a local state directory; on a cluster (CRM_KAFKA_BOOTSTRAP) restore into "
                          "empty topics (docs/backup.md)")
    # Erasures this installation knows of, read before anything is wiped, and those the operator kept.
    known = current_register(settings)
    for file in erasure_files:
        known += read_register(Path(file))
    in_backup = read_register(path) if topics.ERASURES.name in manifest["topics"] else []
    later = later_erasures(known, in_backup)
    customers, key_ids = erased_keys(later)
    keys = list(read_records(path / topic_file(KEY_TOPIC.name))) if KEY_TOPIC.name in manifest["topics"] else []
    kept = [r for r in keys if not key_record_erased(r, customers, key_ids)]
    masters, identity = available_secrets(settings.state_dir)
    problems = missing_secrets(manifest, masters, identity,
                               (orjson.loads(r.value)["master_key_id"] for r in kept if r.value))
    if problems:
        raise BackupError("; ".join(problems) + ". Give them (CRM_MASTER_KEYS, CRM_IDENTITY_SECRET, or "
                                                 f"{settings.state_dir}/secrets/) before restoring: docs/backup.md")
    ends = _end_offsets(settings, RESTORED_TOPICS)
    written = {name: end for name, end in ends.items() if end}
    if written and not force:
        raise BackupError("these topics are not empty: " + ", ".join(f"{n} ({e:,} offsets)" for n, e in written.items())
                          + f"; restore onto a stopped or fresh state directory, or --force to wipe {settings.state_dir}")
    if force:
        say(f"wiping {settings.state_dir} (keeping its secrets) after reading its {len(known)} erasures")
        wipe_state_dir(settings)
        from deploy.kafka.broker import LocalBroker

        LocalBroker(settings).start()
        report.wiped = True
    from deploy.topics import ensure_topics

    ensure_topics(settings)
    producer = _producer(bootstrap)
    try:
        # Keys first, as the live system writes them before any event sealed under them.
        report.keys_restored = produce_in_order(producer, KEY_TOPIC.name, kept, keep_offsets=False)
        report.keys_dropped = len(keys) - len(kept)
        for spec in (*LOG_TOPICS, *KEPT_TOPICS):
            if spec.name in manifest["topics"]:
                report.topics[spec.name] = produce_in_order(producer, spec.name,
                                                            read_records(path / topic_file(spec.name)), keep_offsets=True)
                say(f"{spec.name}: {report.topics[spec.name]:,} records")
        for erasure in later:
            event = erasure_request(erasure)
            producer.send(topics.EVENTS.name, key=erasure.customer_key.encode(), value=orjson.dumps(event))
            # The register of this installation stays whole, before the worker has folded the request.
            producer.send(topics.ERASURES.name, key=erasure.customer_key.encode(),
                          value=erasure.model_dump_json().encode())
            report.erasures_reapplied.append(erasure.customer_key)
        producer.flush()
        for name, target in (("alerts", settings.alerts_db), ("ingest", settings.ingest_db)):
            file = manifest["sqlite"].get(name, {}).get("file")
            if file:
                report.stores[name] = restore_sqlite(path / file, target)
        key, value = audit.encode(audit_record(report, reason or f"crm restore {path.name}"))
        producer.send(topics.AUDIT.name, key=key, value=value)
        producer.flush()
    finally:
        producer.close()
    return report
