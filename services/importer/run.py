"""One run of `crm import`: load the mapping, build each partition's stream of events (read,
build, validate, sort), send what an earlier run of the same stream left unacknowledged, write the
reject report and send the rejects to the dead-letter topic.

A small import runs in this process. A large one (PARALLEL_ROWS rows or more) runs in one forked
worker process per core, each owning every n-th partition of crm.events: it reads every file,
builds its partitions' streams, and sends them with its own producer, a chunk of each in turn,
keeping their progress (plan.py says why the partitions' streams are independent). This process
holds the import's lock, shows the progress, and once every worker is done writes the reject report
and sends the dead letters.

Invariant: when a run ends, for any reason, each partition's progress file names an acknowledged
prefix of its stream; running the same command again sends at most what lies after it (or, with
`resend`, everything again, which the worker de-duplicates by event id)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.text import Text

from privacy.secrets import identity_secret
from services.importer import readers, report, send
from services.importer.build import Reject, Tally
from services.importer.bulk_producer import BulkProducer
from services.importer.mapping import Mapping, MappingError, load
from services.importer.plan import Part, Stopped, build, stream_digest
from services.importer.progress import ImportBusy, ImportFolder, StreamProgress
from services.ingest.sealing import Sealer
from streams import topics
from streams.config import Settings

# Below this many rows, starting worker processes costs more than it saves.
PARALLEL_ROWS = 50_000


@dataclass(frozen=True)
class Options:
    dry_run: bool = False           # build and report only; send nothing
    resend: bool = False            # send every stream again, whatever an earlier run did
    crash_after: int | None = None  # for tests: die like a crash after handing this many events to Kafka
    show_progress: bool = True


@dataclass(frozen=True)
class Job:
    """What a worker is given (it crosses into a worker process, so it is plain data)."""
    index: int
    mapping: Mapping
    settings: Settings
    partitions: int
    owned: tuple[int, ...]
    options: Options


@dataclass
class Work:
    """What a worker did."""
    status: str                     # built (dry run), sent, interrupted
    files: list[Tally] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    events: int = 0
    customers: int = 0
    earlier: int = 0                # events earlier runs had sent and Kafka acknowledged
    acknowledged: int = 0           # events of its streams acknowledged when it ended
    restarted: int = 0              # unfinished streams that changed since the earlier run


@dataclass
class Outcome:
    mapping: Mapping
    folder: ImportFolder
    status: str                     # checked (dry run), already_imported, sent, interrupted
    files: list[Tally]
    rejects: list[Reject]
    events: int
    customers: int
    earlier: int = 0
    acknowledged: int = 0
    dead_letters: int = 0           # rejects sent to the dead-letter topic by this run
    seconds: float = 0.0            # from the start of reading to the last acknowledgement
    restarted: int = 0              # unfinished streams that changed since the earlier run

    @property
    def sent(self) -> int:
        """Events this run sent and Kafka acknowledged."""
        return self.acknowledged - self.earlier


class Signals:
    """How a worker tells its progress (rows read, events planned, events acknowledged) and hears
    that it should stop. This one updates the progress bars of this process directly."""

    def __init__(self, bars: Progress, reading: TaskID, sending: TaskID):
        self.bars, self.reading, self.sending = bars, reading, sending
        self.to_send = 0

    def rows(self, count: int) -> None:
        self.bars.advance(self.reading, count)

    def planned(self, count: int) -> None:
        """`count` more events to send in this run."""
        self.to_send += count
        self.bars.update(self.sending, total=self.to_send)

    def acknowledged(self, count: int) -> None:
        self.bars.advance(self.sending, count)

    def stopped(self) -> bool:
        return False  # in this process, Ctrl-C arrives as KeyboardInterrupt


class SharedSignals(Signals):
    """Signals of worker processes: counters and a stop flag shared with the process that shows them."""

    def __init__(self, rows: Any, planned: Any, acknowledged: Any, stop: Any):
        self.counts = {"rows": rows, "planned": planned, "acknowledged": acknowledged}
        self.stop = stop

    def _add(self, name: str, count: int) -> None:
        counter = self.counts[name]
        with counter.get_lock():
            counter.value += count

    def rows(self, count: int) -> None:
        self._add("rows", count)

    def planned(self, count: int) -> None:
        self._add("planned", count)

    def acknowledged(self, count: int) -> None:
        self._add("acknowledged", count)

    def stopped(self) -> bool:
        return self.stop.is_set()


def run(mapping_path: Path, settings: Settings, options: Options, console: Console) -> Outcome:
    started = time.perf_counter()
    mapping = load(mapping_path)
    folder = ImportFolder(settings.state_dir, mapping.import_id)
    rows = sum(readers.estimated_rows(source) for source in mapping.sources)
    count = min(os.cpu_count() or 1, 4) if rows >= PARALLEL_ROWS else 1
    # Worker processes are forked first, before the progress bars and the producer start threads.
    with folder.lock(), _workers(count) as forked, _bars(console, options.show_progress) as bars:
        producer = None if options.dry_run else send.producer(settings.kafka_bootstrap)
        try:
            partitions = len(producer.partitions_for(topics.EVENTS.name)) if producer else topics.EVENTS.partitions
            jobs = [Job(index, mapping, settings, partitions, tuple(range(index, partitions, count)), options)
                    for index in range(count)]
            reading = bars.add_task("reading", total=rows, unit="rows")
            sending = bars.add_task("sending", total=None, unit="events", visible=not options.dry_run)
            signals = Signals(bars, reading, sending)
            works = [work(jobs[0], signals)] if forked is None else _in_processes(forked, jobs, signals)
            bars.update(reading, completed=rows)
            outcome = _outcome(mapping, folder, works, options)
            if outcome.restarted:
                console.print(f"The files or the mapping changed since an unfinished run: {outcome.restarted} "
                              "partitions' streams were sent from their start. Events sent before with the same "
                              "content are ignored as duplicates; changed ones are refused by the worker as "
                              "conflicting_duplicate (docs/import.md).")
            rows_as_read = report.originals(outcome.rejects)
            report.write_rejects(folder.rejects_file, outcome.rejects, rows_as_read)
            if producer is not None and outcome.status != "interrupted":
                outcome.dead_letters = _dead_letters(producer, folder, outcome, rows_as_read, options.resend)
                if outcome.status == "already_imported" and outcome.dead_letters:
                    outcome.status = "sent"
        finally:
            if producer is not None:
                producer.close()
    outcome.seconds = time.perf_counter() - started
    return outcome


def work(job: Job, signals: Signals) -> Work:
    """Build the job's partitions and, unless it is a dry run, send each one's unacknowledged rest."""
    options, settings = job.options, job.settings
    with _opened_meanwhile(settings, wanted=not options.dry_run) as opened:
        try:
            part = _built(job, signals)
        except (KeyboardInterrupt, Stopped):
            return Work("interrupted")
        try:
            done = Work("built" if options.dry_run else "sent", part.files, part.rejects,
                        sum(len(stream) for stream in part.streams.values()),
                        len({event.key for stream in part.streams.values() for event in stream}))
            if options.dry_run:
                return done
            folder = ImportFolder(settings.state_dir, job.mapping.import_id)
            progresses = {partition: _progress(folder, partition, stream, options.resend, done)
                          for partition, stream in part.streams.items()}
            done.earlier = done.acknowledged = sum(progress.acknowledged for progress in progresses.values())
            signals.planned(done.events - done.earlier)  # what this run has to send
            producer, sealer = opened()
            try:
                send.send_streams(producer, [send.Stream(partition, part.streams[partition], progress.acknowledged,
                                                         _recorder(folder, progress, signals, done))
                                             for partition, progress in sorted(progresses.items())],
                                  signals.stopped, options.crash_after, sealer)
            except Stopped:
                done.status = "interrupted"
            return done
        finally:
            gc.unfreeze()


def _built(job: Job, signals: Signals) -> Part:
    """The job's partitions' streams, built with the collector off, then set aside from it."""
    with _collector_off():
        part = build(job.mapping, job.settings.phone_region, job.partitions, job.owned,
                     identity_secret(job.settings.state_dir), signals.rows if job.index == 0 else (lambda rows: None),
                     signals.stopped)
        gc.freeze()
    return part


@contextmanager
def _opened_meanwhile(settings: Settings, wanted: bool) -> Iterator[Callable[[], tuple[BulkProducer, Sealer]]]:
    """A function that gives the producer and the sealer (over the key store, crm.customer-keys),
    which a thread opens meanwhile: opening waits for Kafka, building waits for nothing. Both are
    closed at the end, whatever happened. They are opened in this process (after a fork: its
    threads and sockets are its own); its partitions' customers are its own, so the key store need
    not follow the keys other processes make."""
    if not wanted:
        yield _not_opened
        return
    with ThreadPoolExecutor(1, thread_name_prefix="import-open") as background:
        opening = background.submit(_open_for_sending, settings)
        try:
            yield opening.result
        finally:
            try:
                producer, sealer = opening.result()
            except Exception:
                pass  # nothing opened: the error reached whoever asked for them, or a building error stands
            else:
                sealer.close()
                producer.close()


def _not_opened() -> tuple[BulkProducer, Sealer]:
    raise RuntimeError("a dry run opens no producer")


def _open_for_sending(settings: Settings) -> tuple[BulkProducer, Sealer]:
    # A data key per new customer, tens of thousands at once: written with a producer like the events'.
    producer, keys = send.producer(settings.kafka_bootstrap), send.producer(settings.kafka_bootstrap)
    try:
        return producer, Sealer.open(settings, follow=False, producer=keys)
    except BaseException:
        producer.close()
        keys.close()
        raise


@contextmanager
def _collector_off() -> Iterator[None]:
    """Python's cyclic garbage collector walks every object kept so far each time its oldest
    generation grows by a quarter, and building keeps every row and event: off while building (a
    sixth of the time). What was built is then set aside (gc.freeze) before the collector is on
    again: otherwise its first collection walks all of it (a twentieth of a worker's time).
    `work` gives it back at the end (gc.unfreeze)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _recorder(folder: ImportFolder, progress: StreamProgress, signals: Signals, done: Work) -> Callable[[int], None]:
    """What to do when Kafka acknowledged a longer prefix of a partition's stream: record it."""
    def acknowledged(end: int) -> None:
        signals.acknowledged(end - progress.acknowledged)
        done.acknowledged += end - progress.acknowledged
        progress.acknowledged = end
        folder.save(progress)
    return acknowledged


def _progress(folder: ImportFolder, partition: int, stream: list, resend: bool, done: Work) -> StreamProgress:
    """The progress to continue from: the earlier run's, if it was sending this very stream."""
    digest = stream_digest(stream)
    earlier = folder.load(partition)
    if earlier is not None and earlier.digest == digest and not resend:
        return earlier
    if earlier is not None and earlier.digest != digest and earlier.acknowledged < earlier.events:
        done.restarted += 1
    progress = StreamProgress(partition, digest, len(stream))
    folder.save(progress)
    return progress


def _outcome(mapping: Mapping, folder: ImportFolder, works: list[Work], options: Options) -> Outcome:
    rejects = sorted((reject for done in works for reject in done.rejects),
                     key=lambda reject: (reject.source.index, reject.line))
    files = [Tally(source) for source in mapping.sources]
    for done in works:
        for total, tally in zip(files, done.files):
            total.add(tally)
    outcome = Outcome(mapping, folder, "sent", files, rejects, sum(done.events for done in works),
                      sum(done.customers for done in works), sum(done.earlier for done in works),
                      sum(done.acknowledged for done in works), restarted=sum(done.restarted for done in works))
    if any(done.status == "interrupted" for done in works):
        outcome.status = "interrupted"
    elif options.dry_run:
        outcome.status = "checked"
    elif outcome.sent == 0:
        outcome.status = "already_imported"
    return outcome


def _dead_letters(producer: BulkProducer, folder: ImportFolder, outcome: Outcome,
                  rows: dict[tuple[str, int], bytes], resend: bool) -> int:
    """Send the rejects, unless these very rejects went before (and no resend was asked for)."""
    digest = report.rejects_digest(outcome.rejects)
    if not outcome.rejects or (folder.dead_letters_sent(digest) and not resend):
        return 0
    send.send_dead_letters(producer, outcome.rejects, rows, outcome.mapping.import_id,
                           int(outcome.mapping.as_of.timestamp() * 1000))
    folder.record_dead_letters(digest, len(outcome.rejects))
    return len(outcome.rejects)


# --- worker processes ---

_signals: SharedSignals | None = None  # in a worker process: how it reports to the one that started it


@dataclass
class Workers:
    pool: Any  # multiprocessing.pool.Pool
    signals: SharedSignals


@contextmanager
def _workers(count: int) -> Iterator[Workers | None]:
    """`count` forked worker processes sharing counters and a stop flag with this one (none for 1).
    Forked at once, before `run` starts a thread (a fork copies the locks other threads hold, not
    the threads), so they start at once with the modules already loaded."""
    if count == 1:
        yield None
        return
    context = multiprocessing.get_context("fork")
    shared = SharedSignals(context.Value("q", 0), context.Value("q", 0), context.Value("q", 0), context.Event())
    pool = context.Pool(count, initializer=_join, initargs=(*shared.counts.values(), shared.stop))
    try:
        yield Workers(pool, shared)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _in_processes(workers: Workers, jobs: list[Job], signals: Signals) -> list[Work]:
    """Every job in its own worker process. Their counters move this process's bars; Ctrl-C here
    asks them to stop after what Kafka acknowledged; a failing worker stops the others, and its
    error is raised here."""
    shared = workers.signals
    results = [workers.pool.apply_async(_work_in_process, (job,)) for job in jobs]
    seen = dict.fromkeys(shared.counts, 0)
    while True:
        try:
            # Woken by the first unfinished job's end, so that the import ends when its last job does.
            next(result for result in results if not result.ready()).wait(0.2)
        except KeyboardInterrupt:
            shared.stop.set()
        except StopIteration:
            pass
        if any(result.ready() and not result.successful() for result in results):
            shared.stop.set()
        now = {name: counter.value for name, counter in shared.counts.items()}
        signals.rows(now["rows"] - seen["rows"])
        signals.planned(now["planned"] - seen["planned"])
        signals.acknowledged(now["acknowledged"] - seen["acknowledged"])
        seen = now
        if all(result.ready() for result in results):
            return [result.get() for result in results]


def _join(rows: Any, planned: Any, acknowledged: Any, stop: Any) -> None:
    """A worker process's start: report through the shared counters; Ctrl-C is for the parent."""
    global _signals
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _signals = SharedSignals(rows, planned, acknowledged, stop)


def _work_in_process(job: Job) -> Work:
    assert _signals is not None
    return work(job, _signals)


# --- what a person sees ---

def command(mapping_path: Path, settings: Settings, options: Options) -> int:
    """`crm import`: run, and tell a person what happened. Exit codes: 0 imported (or checked, or
    imported before), 1 Kafka failed, 2 the mapping or a file cannot be used, 130 interrupted; after
    1 and 130 the same command resumes."""
    console = Console(stderr=True)
    try:
        outcome = run(mapping_path, settings, options, console)
    except (MappingError, ImportBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(f"error: Kafka did not take the import: {exc!r}. What it acknowledged is recorded; run the same "
              "command again to resume.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; what Kafka acknowledged is recorded: run the same command again to resume",
              file=sys.stderr)
        return 130
    print(f"import {outcome.mapping.import_id} ({mapping_path})")
    print(*report.summary(outcome.files, outcome.rejects, outcome.events, outcome.customers), sep="\n")
    if outcome.rejects:
        print(f"rejected rows: {outcome.folder.rejects_file}" + (
            "" if outcome.status == "checked" else
            f"; in the dead-letter topic as {send.DEAD_LETTER_REASON} (crm dlq list --reason {send.DEAD_LETTER_REASON})"))
    print(_ending(outcome))
    return 130 if outcome.status == "interrupted" else 0


def _ending(outcome: Outcome) -> str:
    if outcome.status == "checked":
        return "dry run: nothing sent"
    if outcome.status == "already_imported":
        return (f"already imported: all {outcome.events:,} events were acknowledged by an earlier run; nothing sent "
                "(--resend sends them again, which changes nothing)")
    earlier = f" ({outcome.earlier:,} by an earlier run)" if outcome.earlier else ""
    if outcome.status == "interrupted":
        return (f"interrupted: {outcome.acknowledged:,} of {outcome.events:,} events acknowledged{earlier}; run the "
                "same command again to send the rest")
    rate = f", {outcome.sent / outcome.seconds:,.0f} events/s" if outcome.seconds and outcome.sent else ""
    return (f"sent {outcome.sent:,} events to crm.events{earlier}, {outcome.dead_letters:,} dead letters, in "
            f"{outcome.seconds:.1f} s{rate}")


class _Count(ProgressColumn):
    def render(self, task: Task) -> Text:
        total = f"{int(task.total):,}" if task.total is not None else "?"
        return Text(f"{int(task.completed):,}/{total} {task.fields.get('unit', '')}")


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "")


@contextmanager
def _bars(console: Console, show: bool) -> Iterator[Progress]:
    with Progress(TextColumn("{task.description:<8}"), BarColumn(), _Count(), _Rate(), TimeRemainingColumn(),
                  TimeElapsedColumn(), console=console, disable=not show) as bars:
        yield bars
