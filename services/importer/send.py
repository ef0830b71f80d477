"""Partitions' planned streams to `crm.events`, and the rejected rows to the dead-letter topic, with
the import's producer (bulk_producer.py, librdkafka): acks=all, idempotent, zstd-compressed batches,
keyed by customer key, to the partition the default partitioner gives that key (build.partition_of:
murmur2, as `crm produce` and the ingestion API's producers choose it). Events with personal values
are sealed as they are handed over (services/ingest/sealing.py), one key store call per chunk;
sealing is deterministic, so a resumed or repeated run sends the same bytes. Dead letters of files
that may hold personal columns keep no row.

Invariants: a stream's records are handed to the producer in stream order and its partition keeps
that order (the idempotent producer does); a stream's `on_acknowledged(n)` is called only when every
one of its first n records was acknowledged, and n never goes down; a failed or refused record stops
the run before any later prefix of its stream is reported."""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
from kafka.errors import KafkaTimeoutError

from services.importer.build import Planned, Reject
from services.importer.bulk_producer import BulkProducer
from services.importer.mapping import EventsSpec, SourceFile
from services.ingest.sealing import Sealer
from schemas.events import personal_payload_fields
from services.importer.plan import Stopped
from streams import topics

# Records of a stream handed over between two of its progress points (a fiftieth of the stream,
# within these bounds). Up to IN_FLIGHT_CHUNKS of each stream await Kafka's acknowledgement while
# its next is handed over: with one, the producer mostly waited for the broker's answers.
CHUNK_EVENTS = (100, 500)
IN_FLIGHT_CHUNKS = 4
ACK_TIMEOUT_SECONDS = 120
INTERRUPT_FLUSH_SECONDS = 30
# Kafka refuses records over a megabyte: a longer original row keeps its head (as the API does).
MAX_DEAD_LETTER_BYTES = 900 * 1024
DEAD_LETTER_REASON = "import_row_invalid"


def producer(bootstrap: str) -> BulkProducer:
    return BulkProducer(bootstrap)


def dead_letter_headers(reject: Reject, import_id: str, refused_ms: int, size: int) -> list[tuple[str, bytes]]:
    """The worker's dead-letter headers (streams/outputs.py DeadLetter), with `import:<id>:<kind>:<file>`
    as the source topic and the row's line as the offset, so that the `dead_letters` table keeps one
    row per rejected row however often the import runs; and the import's own headers."""
    headers = [
        ("crm.dlq.reason", DEAD_LETTER_REASON.encode()),
        ("crm.dlq.detail", f"{reject.reason}: {reject.detail}".encode()[:4000]),
        ("crm.dlq.source.topic", f"import:{import_id}:{reject.source.kind}:{reject.source.name}".encode()),
        ("crm.dlq.source.partition", b"0"),
        ("crm.dlq.source.offset", str(reject.line).encode()),
        ("crm.dlq.source.timestamp", str(refused_ms).encode()),
        ("crm.dlq.import.id", import_id.encode()),
        ("crm.dlq.import.file", reject.source.name.encode()),
        ("crm.dlq.import.line", str(reject.line).encode()),
        ("crm.dlq.import.reason", reject.reason.encode()),
    ]
    if size > MAX_DEAD_LETTER_BYTES:
        headers.append(("crm.dlq.truncated_from", str(size).encode()))
    return headers


def may_hold_personal_data(source: SourceFile) -> bool:
    """Whether a file's rows can hold personal values: the customers file (names, e-mails, phones,
    birthdays, addresses), and [[events]] files of a type with personal payload fields."""
    if source.kind == "customers":
        return True
    spec = source.spec
    return isinstance(spec, EventsSpec) and bool(personal_payload_fields(spec.type))


def send_dead_letters(producer: BulkProducer, rejects: Sequence[Reject], originals: dict[tuple[str, int], bytes],
                      import_id: str, refused_ms: int) -> None:
    """Every reject with its original row bytes; returns once Kafka acknowledged all of them. The
    dead-letter topic is kept forever and cannot be erased per customer: a row of a file that may
    hold personal data is not copied there (nor its detail, which may quote a cell); the import's
    reject report, on the machine that ran it, keeps it (docs/import.md)."""
    futures = []
    for reject in rejects:
        original = originals.get((reject.source.name, reject.line), b"")
        if may_hold_personal_data(reject.source):
            reject = Reject(reject.source, reject.line, reject.reason,
                            "personal data withheld; see the import's reject report", reject.customer_key)
            original = orjson.dumps({"file": reject.source.name, "line": reject.line, "row": "[redacted]"})
        futures.append(producer.send(
            topics.DEAD_LETTERS.name, key=reject.customer_key.encode() or None, value=original[:MAX_DEAD_LETTER_BYTES],
            headers=dead_letter_headers(reject, import_id, refused_ms, len(original))))
    producer.flush()
    for future in futures:
        future.get(ACK_TIMEOUT_SECONDS)


@dataclass
class Stream:
    """A partition's planned events, where to start, and whom to tell of each acknowledged prefix."""
    partition: int
    events: Sequence[Planned]
    start: int
    on_acknowledged: Callable[[int], None]
    in_flight: deque[tuple[int, list]] = field(default_factory=deque)

    @property
    def chunk(self) -> int:
        low, high = CHUNK_EVENTS
        return min(max(len(self.events) // 50, low), high)


def send_streams(producer: BulkProducer, streams: list[Stream], stopped: Callable[[], bool] = lambda: False,
                 crash_after: int | None = None, sealer: Sealer | None = None) -> int:
    """Send each stream's events[start:] to its partition of crm.events, a chunk of each in turn
    (kafka-python sent one partition's long run of records at half the rate); returns how many
    records were handed over. On Ctrl-C or once `stopped()`, what Kafka acknowledged within a short
    wait is reported, then Stopped is raised. `crash_after` (for tests) kills this process, as a
    crash would, once that many records were handed over and the chunks before each stream's last
    one settled. `sealer` seals the events that hold personal values; without one, such an event
    stops the run (ValueError) before anything of its chunk is sent."""
    handed = 0
    send = producer.send
    topic = topics.EVENTS.name
    positions = {stream.partition: stream.start for stream in streams}
    if sealer is not None:
        # Every data key this run needs, made and acknowledged at once: one wait for Kafka instead of
        # one per chunk that meets new customers. A key made for an event never sent is used on resume.
        sealer.keys_for({e.key.decode() for stream in streams for e in stream.events[stream.start:] if e.personal})
    try:
        while any(positions[stream.partition] < len(stream.events) for stream in streams):
            for stream in streams:
                begin = positions[stream.partition]
                if begin >= len(stream.events):
                    continue
                if stopped():
                    raise Stopped()
                chunk = stream.events[begin:begin + stream.chunk]
                if crash_after is not None:
                    chunk = chunk[:crash_after - handed]
                stream.in_flight.append((begin + len(chunk), [
                    send(topic, key=e.key, value=value, partition=stream.partition)
                    for e, value in zip(chunk, _values(chunk, sealer))]))
                positions[stream.partition] = begin + len(chunk)
                handed += len(chunk)
                while len(stream.in_flight) > IN_FLIGHT_CHUNKS:
                    _settle(stream.in_flight.popleft(), stream.on_acknowledged)
                if crash_after is not None and handed >= crash_after:
                    for each in streams:
                        while len(each.in_flight) > 1:
                            _settle(each.in_flight.popleft(), each.on_acknowledged)
                    os.kill(os.getpid(), signal.SIGKILL)
        producer.flush()
        for stream in streams:
            while stream.in_flight:
                _settle(stream.in_flight.popleft(), stream.on_acknowledged)
    except (KeyboardInterrupt, Stopped):
        _settle_arrived(producer, streams)
        raise Stopped() from None
    return handed


def _values(chunk: Sequence[Planned], sealer: Sealer | None) -> list[bytes]:
    """The chunk's values as they go to Kafka: those with personal values sealed, with one key store
    call for the chunk; the others as planned (most of an import: no parsing, no copy)."""
    personal = [index for index, event in enumerate(chunk) if event.personal]
    values = [event.value for event in chunk]
    if not personal:
        return values
    if sealer is None:
        raise ValueError("events with personal values are sent only sealed: give a sealer")
    sealed = sealer.seal([orjson.loads(chunk[index].value) for index in personal])
    for index, event in zip(personal, sealed):
        values[index] = orjson.dumps(event)
    return values


def _settle(chunk: tuple[int, list], on_acknowledged: Callable[[int], None]) -> None:
    end, futures = chunk
    for future in futures:
        future.get(ACK_TIMEOUT_SECONDS)
    on_acknowledged(end)


def _settle_arrived(producer: BulkProducer, streams: list[Stream]) -> None:
    """After an interrupt: per stream, the chunks Kafka acknowledged in full within a short wait, in order."""
    try:
        producer.flush(INTERRUPT_FLUSH_SECONDS)
    except KafkaTimeoutError:
        pass
    for stream in streams:
        for end, futures in stream.in_flight:
            if not all(future.is_done and future.succeeded() for future in futures):
                break
            stream.on_acknowledged(end)
