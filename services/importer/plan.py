"""The files of a mapping to one stream of events per partition of `crm.events`, each sorted by
customer key, then event time, then kind (the registration first), then natural key: so each
customer's events reach the log in time order, and the same files always give the same streams,
byte for byte (their digests say so; a resumed run relies on it).

A partition's stream holds the events of the customers whose key Kafka's default partitioner puts
there (murmur2, as every producer of the platform), and every row that meets another (the lines of
an order, two rows with one natural key) goes where its group's first row's customer goes. So a
worker process can read every file, build only its partitions' events, and send them itself: a large
import is built and sent by one process per core (services/importer/run.py). Sorting happens in
memory: the limit is memory, about 1.5 GiB per million rows (docs/import.md).

Invariant: rows read = rows in events + rows rejected, per file and in all, whichever partitions
each process takes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from services.importer import readers
from services.importer.build import Builder, Planned, Reject, Sheet, Tally
from services.importer.mapping import Mapping
from streams import topics

# How often (in rows) reading is reported.
PROGRESS_ROWS = 8192


class Stopped(Exception):
    """Building was asked to stop (Ctrl-C): nothing was sent."""


@dataclass
class Part:
    """What one builder made of the rows of its partitions."""
    streams: dict[int, list[Planned]]  # partition -> its events, sorted
    rejects: list[Reject]              # in file order, then line order
    files: list[Tally]                 # per file of the mapping: rows read, rejected, events by type

    def digest(self, partition: int) -> str:
        return stream_digest(self.streams[partition])


@dataclass
class Plan:
    """Every partition's stream, every reject, every file's tally: what an import would send."""
    mapping: Mapping
    streams: dict[int, list[Planned]]
    rejects: list[Reject]
    files: list[Tally] = field(default_factory=list)

    @property
    def events(self) -> list[Planned]:
        """Every stream, partition after partition."""
        return [event for partition in sorted(self.streams) for event in self.streams[partition]]

    @property
    def rows(self) -> int:
        return sum(tally.rows for tally in self.files)

    @property
    def customers(self) -> int:
        return len({event.key for stream in self.streams.values() for event in stream})

    @property
    def digest(self) -> str:
        return stream_digest(self.events)


def plan(mapping: Mapping, phone_region: str, identity_secret: bytes,
         partitions: int = topics.EVENTS.partitions) -> Plan:
    """Every partition's stream, built in this process."""
    return merge(mapping, [build(mapping, phone_region, partitions, range(partitions), identity_secret)])


def build(mapping: Mapping, phone_region: str, partitions: int, owned: Collection[int], identity_secret: bytes,
          on_rows: Callable[[int], None] = lambda rows: None, stopped: Callable[[], bool] = lambda: False) -> Part:
    """Read every file of `mapping` and build the events of the `owned` partitions (of `partitions`),
    e-mails and phones hashed under `identity_secret`; `on_rows(n)` hears of each n rows read;
    `stopped()` true ends the building with Stopped."""
    builder = Builder(mapping, phone_region, partitions, frozenset(owned), identity_secret)
    files = []
    for source in mapping.sources:
        found = readers.table(source, Sheet.columns_for(source))
        sheet = Sheet.of(source, found.positions)
        files.append(sheet.tally)
        pending = 0
        for line, record in found.records:
            builder.add(sheet, line, record)
            pending += 1
            if pending == PROGRESS_ROWS:
                on_rows(pending)
                pending = 0
                if stopped():
                    raise Stopped()
        on_rows(pending)
    builder.finish()
    streams = {partition: sorted(events) for partition, events in builder.streams.items()}
    return Part(streams, builder.rejects, files)


def merge(mapping: Mapping, parts: list[Part]) -> Plan:
    """The parts of disjoint partitions as one plan."""
    streams = {partition: stream for part in parts for partition, stream in part.streams.items()}
    rejects = sorted((reject for part in parts for reject in part.rejects),
                     key=lambda reject: (reject.source.index, reject.line))
    files = [Tally(source) for source in mapping.sources]
    for part in parts:
        for total, tally in zip(files, part.files):
            total.add(tally)
    return Plan(mapping, streams, rejects, files)


def stream_digest(events: list[Planned]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for event in events:
        digest.update(len(event.key).to_bytes(4, "big"))
        digest.update(event.key)
        digest.update(len(event.value).to_bytes(4, "big"))
        digest.update(event.value)
    return digest.hexdigest()
