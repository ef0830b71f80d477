"""Benchmark: event-to-alert latency at a webhook receiver, on an idle pipeline (the baseline) and
under a steady background load, measured in one run on one machine.

    .venv/bin/python -m bench.alert_latency [--rate 300] [--load-warmup 60] [--probes 100] [--interval 0.1]

It starts everything itself on free ports in a temporary state directory, as the other benchmarks
do: the Kafka broker, the topics (deploy/topics.py), the worker (`crm worker`), the projection
writer (`crm writer`, as a real deployment runs it; `--no-writer` leaves it out) and the alert
service (`crm alerts` on 127.0.0.1), with the clock ticks, the boundaries and the churn model off.
It creates a backoffice API key, and subscribes a webhook receiver of its own (an HTTP server on
127.0.0.1, no filters) through `POST /v1/webhooks`. Every request the receiver gets is checked with
services/alerts/signing.verify against the subscription's secret; failures are counted (and
answered 400).

The background workload is the simulator's valid events (a realistic mix of types; customers
`bg-...` of their own) over the 50 days before now. Its first 20 days, the customers' past
(sign-ups, consents, first purchases), are produced as a backlog before the worker starts, and the
run waits until the pipeline has folded them and their alerts are delivered; the later events are
the load, so that the load is the ongoing activity of known customers rather than a wave of sign-ups.

A probe is one `survey_answered` event (NPS 2) of a new customer, dated now, produced with
kafka-python (acks=all, flushed per probe): the worker opens a bad_experience alert for it at once.
Its latency is the time from just before the send to the moment the receiver has read the POST of
that customer's alert (one clock, this process). Probes go out every `--interval` seconds,
whether or not the previous alert arrived yet.

  1. warm-up: `--warmup` probes, not counted;
  2. idle: `--probes` probes on an otherwise idle pipeline;
  3. load: a background thread produces the later events at `--rate` events/s (kafka-python, acks=all,
     linger 20 ms); after `--load-warmup` seconds the same number of probes run, the background
     going on until their alerts arrived.

It reports p50, p90, p99 and max of both phases (nearest rank), the ratios loaded/idle, the
background rate achieved, the consumer lag of the worker, the writer and the alert service during
and after the load (services/lag.py), where each probe's time went (the alert record's timestamp,
set by the worker's producer, and a consumer of crm.alerts beside the alert service), the
processes' CPU, and the load average. Everything it started is stopped at the end (also on an error,
Ctrl-C or SIGTERM); the processes' logs, the lag samples and the raw latencies are copied to
/tmp/crm-bench-alert-latency-* before the state directory is removed. Exit code 1 if an alert never
arrived or a signature failed."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from bench.ingest_throughput import cpu_seconds, customer_key, load
from bench.pipeline_throughput import PROJECT_ROOT, free_port, machine
from services.alerts.signing import SignatureError, verify

STARTUP_TIMEOUT = 300.0   # worker start-up until the first alert arrives
DRAIN_TIMEOUT = 120.0     # after a phase's last probe, until every alert of the phase arrived


# --- the webhook receiver ---------------------------------------------------------------------------

class Receiver:
    """A webhook receiver on a free 127.0.0.1 port, in threads (as tests/unit/test_alert_delivery.py).
    It verifies each request's signature, de-duplicates on X-CRM-Change-Id, and notes when the first
    alert of each probe customer arrived."""

    def __init__(self, probe_prefix: str):
        self.secret: str | None = None
        self.probe_prefix = probe_prefix
        self.lock = threading.Lock()
        self.arrived: dict[str, float] = {}        # probe customer -> perf_counter() when its alert was read
        self.changes: set[str] = set()
        self.requests = self.duplicates = self.signature_failures = self.background_alerts = self.connections = 0
        self.failure_examples: list[str] = []
        self.new_alert = threading.Condition(self.lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with receiver.lock:
                    receiver.connections += 1

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                at = time.perf_counter()
                status = 200
                try:
                    if receiver.secret is None:
                        raise SignatureError("no subscription secret yet")
                    verify(receiver.secret, self.headers.get("X-CRM-Signature"), body)
                except SignatureError as exc:
                    status = 400
                    with receiver.lock:
                        receiver.requests += 1
                        receiver.signature_failures += 1
                        if len(receiver.failure_examples) < 5:
                            receiver.failure_examples.append(str(exc))
                else:
                    change = self.headers.get("X-CRM-Change-Id", "")
                    customer = orjson.loads(body).get("customer_key", "")
                    with receiver.lock:
                        receiver.requests += 1
                        if change in receiver.changes:
                            receiver.duplicates += 1
                        else:
                            receiver.changes.add(change)
                            if customer.startswith(receiver.probe_prefix):
                                receiver.arrived.setdefault(customer, at)
                                receiver.new_alert.notify_all()
                            else:
                                receiver.background_alerts += 1
                answer = b'{"ok":true}' if status == 200 else b'{"error":"bad signature"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # A sender that closes a kept-alive connection with a reset: not this receiver's problem.
                if not isinstance(sys.exc_info()[1], ConnectionResetError):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/crm"
        self._thread = threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def wait_for(self, customers: list[str], timeout: float) -> list[str]:
        """Wait until every one of `customers` has an alert, or the timeout; the ones still missing."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                missing = [c for c in customers if c not in self.arrived]
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self.new_alert.wait(min(left, 1.0))


# --- probes -----------------------------------------------------------------------------------------

def probe_event(customer: str) -> dict[str, Any]:
    """A detractor's NPS answer, dated now: the worker opens a bad_experience alert at this event."""
    return {
        "event_id": str(uuid.uuid4()), "type": "survey_answered", "schema_version": 1, "customer_id": customer,
        "occurred_at": datetime.now(UTC).isoformat(), "source": {"channel": "app"},
        "payload": {"survey_id": "bench-probe", "kind": "nps", "score": 2},
    }


@dataclass
class Phase:
    name: str
    sent: dict[str, float] = field(default_factory=dict)      # customer -> perf_counter() just before the send
    wall: dict[str, float] = field(default_factory=dict)      # customer -> time.time() at the same moment
    acked: dict[str, float] = field(default_factory=dict)     # customer -> seconds until the flush returned
    missing: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)      # sorted
    in_order: list[float] = field(default_factory=list)       # in the order the probes were sent


def run_probes(producer: Any, topic: str, receiver: Receiver, phase: Phase, prefix: str, count: int,
               interval: float, timeout: float = DRAIN_TIMEOUT) -> Phase:
    started = time.perf_counter()
    for n in range(count):
        pause = started + n * interval - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        customer = f"{prefix}{phase.name}-{n:04d}"
        value = orjson.dumps(probe_event(customer))
        phase.wall[customer], sent = time.time(), time.perf_counter()
        phase.sent[customer] = sent
        producer.send(topic, key=customer.encode(), value=value)
        producer.flush()
        phase.acked[customer] = time.perf_counter() - sent
    phase.missing = receiver.wait_for(list(phase.sent), timeout)
    with receiver.lock:
        phase.in_order = [receiver.arrived[c] - phase.sent[c] for c in phase.sent if c in receiver.arrived]
    phase.latencies = sorted(phase.in_order)
    return phase


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values), "mean": statistics.fmean(values), "min": min(values)}


# --- background load --------------------------------------------------------------------------------

def background_workload(needed: int, days: int = 50, history_days: int = 20
                        ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """The simulator's valid events (keyed as producers key them) over the `days` before now, split
    in two: the first `history_days` (the customers' past: registrations, consents, first purchases),
    and at least `needed` events after that, for the background load. Customers `bg-...`, so they
    never meet the probes'."""
    from services.simulator import Simulator, Workload

    customers = max(needed // 12, 10)
    while True:
        start = datetime.now(UTC) - timedelta(days=days + 1)
        split = start + timedelta(days=history_days)
        events = Simulator(Workload(customers=customers, days=days, start=start, seed=23,
                                    customer_prefix="bg")).events()
        encoded = [(e["occurred_at"] < split, customer_key(e),
                    orjson.dumps({**e, "occurred_at": e["occurred_at"].isoformat()})) for e in events]
        history = [(k, v) for early, k, v in encoded if early]
        later = [(k, v) for early, k, v in encoded if not early]
        if len(later) >= needed:
            return history, later[:needed]
        customers = int(customers * 1.2 * needed / max(len(later), 1)) + 10


class Background(threading.Thread):
    """Produces `events` at `rate` per second (paced every few ms, catching up if it fell behind)
    until stopped or out of events."""

    def __init__(self, bootstrap: str, topic: str, events: list[tuple[bytes, bytes]], rate: float):
        super().__init__(name="background-load", daemon=True)
        from kafka import KafkaProducer

        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                      linger_ms=20, batch_size=1024 * 1024)
        self.topic, self.events, self.rate = topic, events, rate
        self.stopping = threading.Event()
        self.sent = 0
        self.errors = 0
        self.started_at = self.stopped_at = 0.0
        self.max_behind = 0   # most events the pacing was ever behind schedule
        self.failure: BaseException | None = None

    def _failed(self, _exc: BaseException) -> None:
        self.errors += 1

    def sent_at(self) -> tuple[float, int]:
        return time.perf_counter(), self.sent

    def run(self) -> None:
        try:
            self.started_at = time.perf_counter()
            while not self.stopping.is_set() and self.sent < len(self.events):
                due = min(int((time.perf_counter() - self.started_at) * self.rate) + 1, len(self.events))
                self.max_behind = max(self.max_behind, due - self.sent)
                while self.sent < due:
                    key, value = self.events[self.sent]
                    self.producer.send(self.topic, key=key, value=value).add_errback(self._failed)
                    self.sent += 1
                self.stopping.wait(0.005)
            self.stopped_at = time.perf_counter()
            self.producer.flush()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.failure = exc
            self.stopped_at = self.stopped_at or time.perf_counter()

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)
        self.producer.close(timeout=10)


class LagMonitor(threading.Thread):
    """Samples the consumer lag of the worker on crm.events, of the writer on its topics and of the
    alert service on crm.alerts (services/lag.py), and the end offset of crm.events, every `every`
    seconds. kafka-python clients are not thread-safe: every use goes through `lock`."""

    def __init__(self, config: Any, every: float = 1.0):
        super().__init__(name="lag-monitor", daemon=True)
        from services.lag import LagProbe

        self.probe = LagProbe(config)
        self.every = every
        self.lock = threading.Lock()
        # (perf_counter, worker lag, writer lag, alerts lag, crm.events end offsets summed)
        self.samples: list[tuple[float, int | None, int | None, int | None, int]] = []
        self.stopping = threading.Event()

    def sample(self) -> tuple[float, int | None, int | None, int | None, int]:
        from kafka import TopicPartition

        from services.alerts.consumer import GROUP_ID
        from streams import topics

        with self.lock:
            at = time.perf_counter()
            lag = self.probe.lag()
            # The alert service's group on crm.alerts, with LagProbe's own helper.
            alerts = self.probe._group_lag(GROUP_ID, [topics.ALERTS.name])  # noqa: SLF001
            ends = self.probe.consumer.end_offsets(
                [TopicPartition(topics.EVENTS.name, p) for p in range(topics.EVENTS.partitions)])
        return at, lag.worker, lag.writer, alerts, sum(ends.values())

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.samples.append(self.sample())
            except Exception:  # noqa: BLE001 - a missed sample is not worth stopping the run
                pass
            self.stopping.wait(self.every)

    def window(self, start: float, end: float, column: int = 1) -> list[int]:
        return [s[column] for s in self.samples if start <= s[0] <= end and s[column] is not None]

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        with self.lock:
            self.probe.close()


class AlertWatcher(threading.Thread):
    """Reads crm.alerts from its end, beside the alert service, and notes for each probe customer's
    first alert its record timestamp (set by the worker's producer when the worker sent it) and when
    this consumer got it: where between the worker and the receiver the time goes."""

    def __init__(self, bootstrap: str, prefix: str):
        super().__init__(name="alert-watcher", daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        from streams import topics

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                      fetch_max_wait_ms=100)
        partitions = [TopicPartition(topics.ALERTS.name, p) for p in range(topics.ALERTS.partitions)]
        self.consumer.assign(partitions)
        self.consumer.seek_to_end(*partitions)
        for partition in partitions:
            self.consumer.position(partition)
        self.prefix = prefix
        self.created: dict[str, float] = {}   # customer -> record timestamp, seconds (wall clock)
        self.seen: dict[str, float] = {}      # customer -> perf_counter() when polled here
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                batches = self.consumer.poll(timeout_ms=200)
            except Exception:  # noqa: BLE001 - closed under us at the end
                return
            at = time.perf_counter()
            for records in batches.values():
                for record in records:
                    customer = (record.key or b"").decode(errors="replace")
                    if customer.startswith(self.prefix) and customer not in self.seen:
                        self.seen[customer] = at
                        self.created[customer] = record.timestamp / 1000

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.consumer.close()


def stages(phase: Phase, watcher: AlertWatcher, receiver: Receiver) -> dict[str, float] | None:
    """Median seconds of each stage for the phase's probes that all three saw: probe sent -> the
    worker sent the alert (record timestamp, ms) -> a consumer of crm.alerts got it -> the receiver did."""
    rows = []
    with receiver.lock:
        for customer, sent in phase.sent.items():
            if customer in watcher.seen and customer in receiver.arrived:
                rows.append((watcher.created[customer] - phase.wall[customer], watcher.seen[customer] - sent,
                             receiver.arrived[customer] - watcher.seen[customer]))
    if not rows:
        return None
    worker, visible, delivered = zip(*rows)
    return {"probes": len(rows), "to_worker_send": statistics.median(worker),
            "worker_send_to_visible": statistics.median(v - w for v, w in zip(visible, worker)),
            "visible_to_receiver": statistics.median(delivered)}


# --- processes --------------------------------------------------------------------------------------

def start_process(name: str, argv: list[str], logs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.cli", *argv], cwd=PROJECT_ROOT,
                            stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def check_alive(processes: dict[str, subprocess.Popen], logs: Path) -> None:
    for name, process in processes.items():
        if process.poll() is not None:
            tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the {name} exited with code {process.returncode}:\n{tail}")


def wait_for_alerts_service(url: str, process: subprocess.Popen, timeout: float = 120.0) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"crm alerts exited with code {process.returncode}")
        try:
            response = httpx.get(f"{url}/health", timeout=5)
            if response.status_code == 200 and response.json().get("consumer") == "running":
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"crm alerts was not healthy within {timeout:.0f} s")


def stop_processes(processes: dict[str, subprocess.Popen]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    for name, process in processes.items():
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop within 30 s of SIGTERM: killed", flush=True)
            process.kill()
            process.wait()


def last_line_with(path: Path, text: str) -> str | None:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if text in line]
    except OSError:
        return None
    return lines[-1].strip() if lines else None


def keep_logs(state_dir: Path, results: dict[str, Any]) -> Path:
    kept = Path(tempfile.mkdtemp(prefix=f"crm-bench-alert-latency-{datetime.now():%Y%m%d-%H%M%S}-", dir="/tmp"))
    for source in [*(state_dir / "logs").glob("*.log"), state_dir / "kafka" / "broker.log"]:
        if source.exists():
            shutil.copy2(source, kept / source.name)
    (kept / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return kept


# --- the run ----------------------------------------------------------------------------------------

def _interrupted(*_: Any) -> None:
    raise KeyboardInterrupt


def deliveries(url: str, key: str, webhook: str) -> dict[str, int]:
    import httpx

    answer = httpx.get(f"{url}/v1/webhooks/{webhook}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    answer.raise_for_status()
    return answer.json()["deliveries"]


def wait_until(condition: Any, timeout: float, what: str, processes: dict[str, subprocess.Popen], logs: Path,
               every: float = 0.25) -> float:
    """Seconds until `condition()` held; raises after `timeout`."""
    started = time.perf_counter()
    while not condition():
        check_alive(processes, logs)
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.perf_counter() - started


def rate_between(samples: list[tuple], start: float, end: float, value: Any) -> float | None:
    """Per second growth of value(sample) between the samples nearest to `start` and `end`."""
    inside = [s for s in samples if start - 1.5 <= s[0] <= end + 1.5 and value(s) is not None]
    if len(inside) < 2:
        return None
    first = min(inside, key=lambda s: abs(s[0] - start))
    last = min(inside, key=lambda s: abs(s[0] - end))
    return (value(last) - value(first)) / (last[0] - first[0]) if last[0] > first[0] else None


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=300.0, help="background events per second (default 300)")
    parser.add_argument("--probes", type=int, default=100, help="probes per measured phase (default 100)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up probes, not counted (default 20)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between probes (default 0.1)")
    parser.add_argument("--load-warmup", type=float, default=60.0,
                        help="seconds of background load before the loaded phase's probes (default 60)")
    parser.add_argument("--no-writer", action="store_true", help="do not run the projection writer")
    args = parser.parse_args()

    # SIGTERM ends the run like Ctrl-C: the finally below stops everything.
    signal.signal(signal.SIGTERM, _interrupted)

    state_dir = Path(tempfile.mkdtemp(prefix="crm-bench-alerts-"))
    alerts_port = free_port()
    os.environ.update({
        "CRM_STATE_DIR": str(state_dir), "CRM_KAFKA_PORT": str(free_port()),
        "CRM_KAFKA_CONTROLLER_PORT": str(free_port()), "CRM_TICK_SECONDS": "0", "CRM_BOUNDARIES_SECONDS": "0",
        "CRM_CHURN_MODEL_SECONDS": "0", "CRM_ALERTS_HOST": "127.0.0.1", "CRM_ALERTS_PORT": str(alerts_port),
    })
    for name in ("CRM_KAFKA_BOOTSTRAP", "CRM_CLICKHOUSE_DSN", "CRM_SQL_USERS"):
        os.environ.pop(name, None)

    import httpx
    from kafka import KafkaProducer

    from deploy.kafka.broker import LocalBroker
    from deploy.topics import ensure_topics
    from services.ingest.keys import ApiKeyStore
    from streams import topics
    from streams.config import settings

    config = settings()
    broker = LocalBroker(config)
    logs = state_dir / "logs"
    logs.mkdir()
    prefix = f"probe-{uuid.uuid4().hex[:6]}-"
    receiver = Receiver(prefix)
    processes: dict[str, subprocess.Popen] = {}
    producer: KafkaProducer | None = None
    background: Background | None = None
    monitor: LagMonitor | None = None
    watcher: AlertWatcher | None = None
    results: dict[str, Any] = {"args": vars(args), "machine": machine()}
    topic = topics.EVENTS.name
    try:
        print(f"machine: {machine()}; nproc {len(os.sched_getaffinity(0))}; load average at start {load()}", flush=True)
        began = time.perf_counter()
        broker.start()
        ensure_topics(config)
        broker_pid = int(broker.pid_file.read_text())

        # The background customers' past goes in first, as a backlog, so that the load later is their
        # ongoing activity rather than a wave of sign-ups.
        needed = int(args.rate * (args.load_warmup + args.probes * args.interval + 60))
        history, load_events = background_workload(needed)
        history_producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all", enable_idempotence=True,
                                         linger_ms=20, batch_size=1024 * 1024)
        for key, value in history:
            history_producer.send(topic, key=key, value=value)
        history_producer.flush()
        history_producer.close()
        print(f"background workload: {len(history)} events of the customers' past (20 days) sent as a backlog; "
              f"{len(load_events)} later events ({statistics.fmean(len(v) for _, v in load_events):.0f} bytes on "
              f"average) kept for the load", flush=True)

        receiver.start()
        processes["worker"] = start_process("worker", ["worker"], logs)
        if not args.no_writer:
            processes["writer"] = start_process("writer", ["writer"], logs)
        processes["alerts"] = start_process("alerts", ["alerts"], logs)
        alerts_url = f"http://127.0.0.1:{alerts_port}"
        wait_for_alerts_service(alerts_url, processes["alerts"])

        store = ApiKeyStore(config.ingest_db)
        _, key = store.create("backoffice", "bench-alert-latency")
        store.close()
        answer = httpx.post(f"{alerts_url}/v1/webhooks", headers={"Authorization": f"Bearer {key}"},
                            json={"url": receiver.url, "filters": {}}, timeout=30)
        if answer.status_code != 201:
            raise RuntimeError(f"POST /v1/webhooks answered {answer.status_code}: {answer.text[:500]}")
        receiver.secret, webhook = answer.json()["secret"], answer.json()["id"]
        print(f"broker, topics, worker{'' if args.no_writer else ', writer'} and crm alerts started; "
              f"webhook {webhook} -> {receiver.url}", flush=True)

        monitor = LagMonitor(config)
        monitor.start()

        def caught_up() -> bool:
            _, worker_lag, writer_lag, alerts_lag, _ = monitor.sample()
            return worker_lag == 0 and alerts_lag == 0 and (args.no_writer or writer_lag == 0)

        folded = wait_until(caught_up, 600, "the pipeline did not catch up with the backlog", processes, logs, 0.5)
        wait_until(lambda: deliveries(alerts_url, key, webhook)["pending"] == 0, 120, "deliveries still pending",
                   processes, logs)
        print(f"backlog folded and its alerts delivered {time.perf_counter() - began:.0f} s after the start "
              f"(the wait took {folded:.0f} s); {receiver.background_alerts} alerts so far", flush=True)

        watcher = AlertWatcher(config.kafka_bootstrap, prefix)
        watcher.start()
        producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all", linger_ms=0)

        # Warm-up: a few probes through the whole path, not counted.
        warm = run_probes(producer, topic, receiver, Phase("warmup"), prefix, args.warmup, args.interval)
        if warm.missing:
            raise RuntimeError(f"{len(warm.missing)} warm-up alerts never arrived")

        # Phase 1: idle.
        check_alive(processes, logs)
        print(f"idle phase: {args.probes} probes every {args.interval * 1000:.0f} ms; load average {load()}", flush=True)
        idle = run_probes(producer, topic, receiver, Phase("idle"), prefix, args.probes, args.interval)
        idle_load = load()
        print(f"  {len(idle.latencies)} alerts arrived, {len(idle.missing)} missing; load average {idle_load}", flush=True)

        # Phase 2: the same probes under a steady background load.
        check_alive(processes, logs)
        pids = {"broker": broker_pid, **{name: p.pid for name, p in processes.items()}}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        cpu_self = sum(os.times()[:2])
        background = Background(config.kafka_bootstrap, topic, load_events, args.rate)
        background.start()
        print(f"background load: {args.rate:.0f} events/s; {args.load_warmup:.0f} s before the probes", flush=True)
        time.sleep(args.load_warmup)
        check_alive(processes, logs)
        window_start, sent_start = background.sent_at()
        loaded = run_probes(producer, topic, receiver, Phase("loaded"), prefix, args.probes, args.interval)
        window_end, sent_end = background.sent_at()
        background.stopping.set()
        background.join(60)
        cpu_load = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        cpu_load["benchmark (producers, receiver, lag probe)"] = sum(os.times()[:2]) - cpu_self
        load_seconds = background.stopped_at - background.started_at
        loaded_load = load()
        if background.failure is not None:
            raise RuntimeError(f"the background producer failed: {background.failure!r}")
        print(f"  {len(loaded.latencies)} alerts arrived, {len(loaded.missing)} missing; load average {loaded_load}",
              flush=True)
        at_stop = monitor.sample()
        try:
            drained: float | None = wait_until(caught_up, DRAIN_TIMEOUT, "drain", processes, logs)
        except RuntimeError:
            drained = None
        after = monitor.sample()
        try:
            wait_until(lambda: deliveries(alerts_url, key, webhook)["pending"] == 0, 30, "deliveries", processes, logs)
        except RuntimeError:
            pass
        delivery_counts = deliveries(alerts_url, key, webhook)
        monitor.stop()
        watcher.stop()
        samples = monitor.samples
        during = monitor.window(window_start, window_end)
        during_writer = monitor.window(window_start, window_end, 2)
        during_alerts = monitor.window(window_start, window_end, 3)
        appended = rate_between(samples, window_start, window_end, lambda s: s[4])
        worker_rate = rate_between(samples, window_start, window_end,
                                   lambda s: None if s[1] is None else s[4] - s[1])

        # --- report ---
        print()
        print(f"machine: {machine()}; load average at the end {load()}")
        print(f"load average: idle phase {idle_load}; loaded phase {loaded_load}")
        rate_all = background.sent / load_seconds if load_seconds else float("nan")
        rate_window = (sent_end - sent_start) / (window_end - window_start)
        print(f"background: {background.sent} events in {load_seconds:.1f} s = {rate_all:,.0f} events/s "
              f"(target {args.rate:.0f}); during the loaded probes {rate_window:,.0f} events/s; "
              f"at most {background.max_behind} events behind schedule; send errors {background.errors}"
              + ("; RAN OUT OF EVENTS" if background.sent >= len(load_events) else ""))
        if appended is not None and worker_rate is not None:
            print(f"crm.events grew by {appended:,.0f} records/s during the loaded probes (the background, the probes "
                  f"and the worker's own identity records); the worker's committed position advanced "
                  f"{worker_rate:,.0f} records/s")
        if during:
            print(f"worker lag on crm.events during the loaded probes (committed offsets, {len(during)} samples): "
                  f"first {during[0]}, median {statistics.median(during):.0f}, max {max(during)}, last {during[-1]}")
        if during_writer and not args.no_writer:
            print(f"writer lag during the loaded probes: median {statistics.median(during_writer):.0f}, "
                  f"max {max(during_writer)} records")
        if during_alerts:
            print(f"crm alerts lag on crm.alerts during the loaded probes: median "
                  f"{statistics.median(during_alerts):.0f}, max {max(during_alerts)} records")
        def lags(sample: tuple) -> str:
            writer = "no writer" if args.no_writer else sample[2]
            return f"worker {sample[1]}, writer {writer}, alerts {sample[3]}"

        print(f"lag when the background stopped: {lags(at_stop)}; "
              + (f"all caught up {drained:.1f} s later" if drained is not None
                 else f"not caught up after {DRAIN_TIMEOUT:.0f} s: {lags(after)}"))
        print(f"CPU seconds over the loaded phase ({load_seconds:.1f} s): "
              + ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu_load.items()))
        counts = last_line_with(logs / "worker.log", "processed so far")
        if counts:
            print(f"worker's last count: {counts[counts.index('processed so far'):]}")
        with receiver.lock:
            print(f"receiver: {receiver.requests} requests on {receiver.connections} connections, "
                  f"{len(receiver.changes)} distinct changes ({receiver.background_alerts} of background customers), "
                  f"{receiver.duplicates} duplicates, signature failures {receiver.signature_failures}"
                  + (f" e.g. {receiver.failure_examples}" if receiver.failure_examples else "")
                  + f"; the webhook's deliveries: {delivery_counts}")
        ack_idle, ack_loaded = (statistics.median(p.acked.values()) for p in (idle, loaded))
        print(f"probe send + flush (acks=all): median {ms(ack_idle)} idle, {ms(ack_loaded)} loaded")
        breakdown = {p.name: stages(p, watcher, receiver) for p in (idle, loaded)}
        for name, b in breakdown.items():
            if b:
                print(f"where the time goes, {name} (medians of {b['probes']} probes): probe sent -> worker sends "
                      f"the alert {ms(b['to_worker_send'])}; -> a consumer of crm.alerts has it "
                      f"{ms(b['worker_send_to_visible'])}; -> the receiver has it {ms(b['visible_to_receiver'])}")
        for phase in (idle, loaded):
            if len(phase.in_order) >= 4:
                quarters = [phase.in_order[i * len(phase.in_order) // 4:(i + 1) * len(phase.in_order) // 4]
                            for i in range(4)]
                print(f"{phase.name}: median latency of each quarter of the probes, in sending order: "
                      + ", ".join(ms(statistics.median(q)) for q in quarters))
        print()
        stats = {}
        print(f"{'event-to-alert latency':<26}{'n':>5}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}{'missing':>9}")
        for phase in (idle, loaded):
            if phase.latencies:
                s = stats[phase.name] = summary(phase.latencies)
                print(f"{phase.name:<26}{len(phase.latencies):>5}" + "".join(
                    f"{s[k] * 1000:>8.0f}ms" for k in ("p50", "p90", "p99", "max")) + f"{len(phase.missing):>9}")
        if len(stats) == 2:
            print("ratio loaded/idle: " + ", ".join(
                f"{k} {stats['loaded'][k] / stats['idle'][k]:.2f}" for k in ("p50", "p90", "p99", "max")))
        print(f"the whole run took {time.perf_counter() - began:.0f} s")
        results.update({
            "idle": {"latencies_in_sending_order": idle.in_order, "missing": idle.missing, "load": idle_load},
            "loaded": {"latencies_in_sending_order": loaded.in_order, "missing": loaded.missing, "load": loaded_load},
            "summary": stats, "stages": breakdown,
            "background": {"sent": background.sent, "seconds": load_seconds, "rate": rate_all,
                           "rate_during_probes": rate_window, "errors": background.errors,
                           "history_events": len(history)},
            "lag_samples": samples, "cpu_loaded": cpu_load, "deliveries": delivery_counts,
            "signature_failures": receiver.signature_failures, "duplicates": receiver.duplicates,
        })
        failed = idle.missing or loaded.missing or receiver.signature_failures
        return 1 if failed else 0
    finally:
        if background is not None:
            background.stop()
        if watcher is not None and watcher.is_alive():
            watcher.stop()
        if monitor is not None and monitor.is_alive():
            monitor.stop()
        if producer is not None:
            producer.close(timeout=10)
        stop_processes(processes)
        receiver.stop()
        broker.stop()
        try:
            kept = keep_logs(state_dir, results)
            print(f"logs and raw latencies kept in {kept}", flush=True)
        except OSError as exc:
            print(f"could not keep the logs: {exc}", flush=True)
        shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
