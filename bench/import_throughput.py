"""Benchmark: `crm import` end to end, from the export files on disk to Kafka's acknowledgement of
the last event, against a raw kafka-python producer sending the same events already encoded, with
the same producer settings, in one run on one machine, so that the ratio means something even where
the absolute numbers do not.

    .venv/bin/python -m bench.import_throughput [--customers 20000] [--format csv|jsonl|parquet] [--profile]

It starts its own broker on free ports in a temporary state directory, creates the topics, and
writes a synthetic retailer export (services/importer/sample.py: customers, orders with one row per
line item, refunds, points balances; CSV the German way by default). Then:

(a) raw: the import's events, built beforehand (keys and values in memory, personal fields sealed
    beforehand with keys derived offline, so the records are the size the import sends), produced by one
    kafka-python producer with the settings the importer had until it moved to librdkafka (acks=all,
    idempotent, zstd, linger 20 ms, 512 KiB batches), to their partitions, 500 of each partition in turn
    as the importer sends them, and flushed: a plain producer of ready-made events at its best (the
    events set aside from the garbage collector, gc.freeze, as the importer sets aside what it built).
    The baseline of every ratio in BENCHMARKS.md; (a') the same with the importer's own producer
    (services/importer/bulk_producer.py, librdkafka, the same settings);
(b) import: `services.importer.run.run` as `crm import` runs it (one worker process per core, each
    reading the files, building, validating and sorting its partitions' events and sending them,
    sealing the registrations' personal fields under data keys it creates in crm.customer-keys, one
    key store call per chunk), from the start to the last acknowledgement, progress files included,
    progress bars off;
(c) with --profile: (b) again in this one process under cProfile (`--resend`), and the functions
    that took the most time.

It asserts that each path grew `crm.events` by exactly the number of events, and prints events per
second, the ratio (b)/(a), the time one process takes to build everything (reading to sorted
streams), and CPU seconds per 10,000 events of the producing processes and the broker. Everything it
started is stopped at the end and the directory removed."""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import orjson

from bench.ingest_throughput import cpu_seconds, load, topic_size
from bench.pipeline_throughput import free_port, machine


def interleaved(streams: dict[int, list], chunk: int = 500) -> list[tuple[int, Any]]:
    """(partition, event) of every stream, a chunk of each in turn, as the importer sends them."""
    order = []
    for begin in range(0, max(map(len, streams.values()), default=0), chunk):
        for partition, stream in sorted(streams.items()):
            order.extend((partition, event) for event in stream[begin:begin + chunk])
    return order


def kafka_python_producer(bootstrap: str) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, client_id="crm-import", acks="all", enable_idempotence=True,
                         linger_ms=20, batch_size=512 * 1024, compression_type="zstd")


def raw_produce(bootstrap: str, records: list[tuple[int, Any]], make: Callable[[str], Any] = kafka_python_producer
                ) -> float:
    """Seconds to hand every (partition, event) to a producer `make` gives until all are acknowledged."""
    from streams import topics

    client = make(bootstrap)
    gc.freeze()  # as the importer does: collections pass the events in memory by
    try:
        started = time.perf_counter()
        for partition, event in records:
            client.send(topics.EVENTS.name, key=event.key, value=event.value, partition=partition)
        client.flush()
        return time.perf_counter() - started
    finally:
        gc.unfreeze()
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=20_000, help="customers in the export (default 20000)")
    parser.add_argument("--format", choices=("csv", "jsonl", "parquet"), default="csv")
    parser.add_argument("--profile", action="store_true", help="also run the import under cProfile")
    args = parser.parse_args()

    state_dir = Path(tempfile.mkdtemp(prefix="crm-bench-import-"))
    os.environ.update({"CRM_STATE_DIR": str(state_dir), "CRM_KAFKA_PORT": str(free_port()),
                       "CRM_KAFKA_CONTROLLER_PORT": str(free_port())})
    os.environ.pop("CRM_KAFKA_BOOTSTRAP", None)

    from rich.console import Console

    from deploy.kafka.broker import LocalBroker
    from deploy.topics import ensure_topics
    from services.importer import run as importer
    from services.importer.mapping import load as load_mapping
    from services.importer.plan import plan
    from services.importer.run import Options, run
    from services.importer.sample import write_export
    from services.ingest.sealing import Sealer, offline_keys
    from privacy.secrets import identity_secret
    from streams import topics
    from streams.config import settings

    config = settings()
    broker = LocalBroker(config)
    topic = topics.EVENTS.name
    try:
        print(f"machine: {machine()}; load average at start {load()}", flush=True)
        broker.start()
        ensure_topics(config)
        broker_pid = int(broker.pid_file.read_text())
        export = write_export(state_dir / "export", customers=args.customers, file_format=args.format,
                              import_id="bench")
        files = sum(path.stat().st_size for path in export.folder.iterdir() if path.name != "mapping.toml")
        started = time.perf_counter()
        secret = identity_secret(config.state_dir)  # the one the import hashes under
        planned = plan(load_mapping(export.mapping), config.phone_region, secret)
        planning = time.perf_counter() - started
        sealer = Sealer(offline_keys(b"bench"), secret)
        events = [(partition, event._replace(value=orjson.dumps(sealer.seal([orjson.loads(event.value)])[0]))
                   if event.personal else event) for partition, event in interleaved(planned.streams)]
        count = len(events)
        size = sum(len(event.value) for _, event in events) / count
        print(f"export: {args.format}, {export.rows:,} rows, {files / 2**20:.1f} MiB; {count:,} events, "
              f"{size:.0f} bytes each on average, {planned.customers:,} customers; building them in one process "
              f"(read, build, validate, sort): {planning:.1f} s", flush=True)

        raw_produce(config.kafka_bootstrap, events[:1000])  # warm-up: connections, metadata
        before, cpu_broker, cpu_self = topic_size(config.kafka_bootstrap, topic), cpu_seconds(broker_pid), sum(os.times()[:4])
        seconds_raw = raw_produce(config.kafka_bootstrap, events)
        cpu_raw = {"producer": sum(os.times()[:4]) - cpu_self, "broker": cpu_seconds(broker_pid) - cpu_broker}
        written = topic_size(config.kafka_bootstrap, topic) - before
        assert written == count, f"the raw producer wrote {written} records, not {count}"
        rate_raw = count / seconds_raw
        print(f"(a) raw kafka-python producer, pre-encoded: {rate_raw:,.0f} events/s ({seconds_raw:.1f} s); "
              f"load average {load()}", flush=True)
        from services.importer.send import producer as importers_producer
        before = topic_size(config.kafka_bootstrap, topic)
        seconds_own = raw_produce(config.kafka_bootstrap, events, importers_producer)
        written = topic_size(config.kafka_bootstrap, topic) - before
        assert written == count, f"the importer's producer wrote {written} records, not {count}"
        print(f"(a') raw importer's producer (librdkafka), pre-encoded: {count / seconds_own:,.0f} events/s "
              f"({seconds_own:.1f} s)", flush=True)
        del planned, events

        console = Console(stderr=True)
        before, cpu_broker, cpu_self = topic_size(config.kafka_bootstrap, topic), cpu_seconds(broker_pid), sum(os.times()[:4])
        outcome = run(export.mapping, config, Options(show_progress=False), console)
        cpu_import = {"importer (all processes)": sum(os.times()[:4]) - cpu_self,
                      "broker": cpu_seconds(broker_pid) - cpu_broker}
        written = topic_size(config.kafka_bootstrap, topic) - before
        assert outcome.status == "sent" and written == count, f"the import wrote {written} records, not {count}"
        rate_import = count / outcome.seconds
        print(f"(b) crm import, start to last acknowledgement: {rate_import:,.0f} events/s ({outcome.seconds:.1f} s, "
              f"{export.rows / outcome.seconds:,.0f} rows/s; {len(outcome.rejects)} rows rejected); "
              f"load average {load()}", flush=True)
        print(f"ratio (b)/(a): {rate_import / rate_raw:.3f}")
        for name, cpu in (("(a)", cpu_raw), ("(b)", cpu_import)):
            print(f"CPU seconds per 10,000 events {name}: " + ", ".join(
                f"{process} {seconds * 10_000 / count:.2f}" for process, seconds in cpu.items()))

        if args.profile:
            importer.PARALLEL_ROWS = sys.maxsize  # one process, so that the profile sees all the work
            profiler = cProfile.Profile()
            profiler.enable()
            run(export.mapping, config, Options(resend=True, show_progress=False), console)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            print("(c) the import under cProfile, by own time:\n" + text.getvalue())
        print(f"load average at the end: {load()}")
    finally:
        broker.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
