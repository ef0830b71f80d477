"""`crm demo`: the whole platform on its embedded default, on a fresh state directory, driven by the
simulated workload; ends with what it did, a sample profile and example SQL with its results."""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaProducer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deploy.kafka.broker import LocalBroker
from deploy.topics import ensure_topics
from projections.writer import ProjectionWriter
from schemas.clock import clock_tick
from services import processes
from services.lag import LagProbe
from services.output import print_result
from services.simulator import STORES, Simulator, Workload
from streams import topics
from streams.config import settings

EXAMPLES = [
    ("Revenue and customers per store, last 30 days of the simulation", """
SELECT store_id, count(DISTINCT customer_key) AS customers, count() AS purchases,
       sum(amount) AS revenue_eur, round(avg(amount), 2) AS avg_basket
FROM events FINAL
WHERE type = 'purchase_completed' AND store_id != ''
  AND occurred_at >= (SELECT max(occurred_at) FROM events) - INTERVAL 30 DAY
GROUP BY store_id ORDER BY revenue_eur DESC"""),
    ("Customers who used to buy and went quiet (no purchase in the last 21 days)", """
SELECT count() AS quiet_customers, round(avg(purchase_count), 1) AS avg_past_purchases,
       sum(spend['EUR']) AS past_spend_eur
FROM customer_profiles FINAL
WHERE purchase_count >= 3
  AND last_purchase_at < (SELECT max(last_seen) FROM customer_profiles FINAL) - INTERVAL 21 DAY"""),
    ("Loyalty points: movements by kind (points_ledger)", """
SELECT kind, count() AS movements, sum(available_delta) AS available, sum(pending_delta) AS pending,
       sum(debt_delta) AS debt
FROM points_ledger FINAL GROUP BY kind ORDER BY movements DESC"""),
    ("Points liability and members per tier (points_balances)", """
SELECT tier, count() AS members, sum(available) AS available_points, sum(pending) AS pending_points,
       sum((available + pending) * point_value) AS liability_eur, sum(expiring_soon) AS expiring_within_30_days
FROM points_balances FINAL GROUP BY tier ORDER BY members DESC"""),
    ("Lifecycle stages now (customer_profiles), and how customers moved (segment_changes)", """
SELECT p.lifecycle_stage AS stage, count() AS customers, any(moves.moved_in) AS entries_so_far,
       any(moves.by_time) AS of_which_time_caused
FROM customer_profiles AS p FINAL
LEFT JOIN (SELECT to_segment, count() AS moved_in, countIf(cause_type = 'time') AS by_time
           FROM segment_changes FINAL WHERE dimension = 'lifecycle' GROUP BY to_segment) AS moves
       ON moves.to_segment = p.lifecycle_stage
WHERE p.merged_into = ''
GROUP BY stage ORDER BY customers DESC"""),
    ("RFM segments and value tiers, against the population boundaries (segment_boundaries)", """
SELECT rfm_segment, count() AS customers, countIf(value_tier = 'high') AS high_value,
       round(avg(purchase_count), 1) AS avg_purchases, sum(spend['EUR']) AS spend_eur
FROM customer_profiles FINAL
WHERE merged_into = '' AND rfm_segment != ''
GROUP BY rfm_segment ORDER BY customers DESC"""),
    ("Tags now, and entries into them so far (segment_changes)", """
SELECT now.tag AS tag, now.customers AS customers, moves.entries AS entries, moves.exits AS exits
FROM (SELECT tag, count() AS customers FROM customer_profiles FINAL ARRAY JOIN tags AS tag
      WHERE merged_into = '' GROUP BY tag) AS now
LEFT JOIN (SELECT substring(dimension, 5) AS tag, countIf(to_segment != '') AS entries, countIf(to_segment = '') AS exits
           FROM segment_changes FINAL WHERE startsWith(dimension, 'tag:') GROUP BY tag) AS moves USING (tag)
ORDER BY customers DESC"""),
    ("Churn alerts (churn_alerts): where each alert stands now, per type (docs/alerts.md)", """
SELECT now.1 AS alert_type, count() AS alerts, countIf(now.2 IN ('opened', 'updated')) AS open,
       countIf(now.2 = 'resolved') AS resolved, countIf(now.2 = 'expired') AS expired,
       countIf(now.3 IN ('high', 'critical')) AS high_or_critical, round(avg(now.4), 3) AS avg_p_alive
FROM (SELECT alert_id, argMax(tuple(alert_type, status, severity, p_alive), version) AS now
      FROM churn_alerts FINAL GROUP BY alert_id)
GROUP BY alert_type ORDER BY alerts DESC"""),
    ("Why alerts opened, and the action recommended", """
SELECT reason, count() AS opened, countIf(action_kind = 'personal_call') AS calls,
       countIf(action_kind = 'bonus_points') AS bonus_points, countIf(action_kind = 'coupon') AS coupons,
       countIf(action_kind = 'none') AS no_consented_channel
FROM churn_alerts FINAL ARRAY JOIN reason_codes AS reason
WHERE status = 'opened' GROUP BY reason ORDER BY opened DESC"""),
]


def run_demo(customers: int, days: int, seed: int) -> int:
    console = Console()
    base = settings()
    state_dir = base.state_dir / "demo"
    os.environ["CRM_STATE_DIR"] = str(state_dir)
    config = settings()
    broker = LocalBroker(config)
    worker = processes.worker(config)
    if config.uses_local_kafka:
        broker.stop()
    worker.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
    console.rule("[bold]crm demo")
    console.print(f"State directory: {state_dir} (fresh)")

    started = time.monotonic()
    if config.uses_local_kafka:
        console.print(f"Starting Apache Kafka (KRaft, one broker) on {config.kafka_bootstrap} ...")
        broker.start()
    ensure_topics(config)
    console.print(f"Topics: {', '.join(t.name for t in topics.ALL_TOPICS)}")
    console.print(f"Starting the stream worker (log: {worker.log_file}) ...")
    worker.start()
    writer = ProjectionWriter(config)
    writer_thread = writer.start_in_thread()
    console.print(f"Projection writer owns the embedded ClickHouse at {config.chdb_dir}")

    try:
        sent = _produce(console, config, Workload(customers=customers, days=days, seed=seed))
        _wait_for_pipeline(console, config, sent)
        _segment_the_population(console, config, writer)
        if not writer_thread.is_alive():
            raise RuntimeError("the projection writer stopped; see the log above")
        _summary(console, writer, sent, time.monotonic() - started)
    finally:
        writer.stop()
        writer_thread.join(timeout=15)
        worker.stop()
        if config.uses_local_kafka:
            broker.stop()
    console.print(f"\nThe data stays in {state_dir}. Query it:  ./crm --state-dir {_relative(state_dir)} sql \"SELECT ...\"")
    console.print(f"Run the stack on it:                     ./crm --state-dir {_relative(state_dir)} start")
    return 0


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _produce(console: Console, config, workload: Workload) -> dict[str, int]:
    simulator = Simulator(workload)
    console.print(f"Simulating {workload.customers} customers in {len(STORES)} stores over "
                  f"{workload.days} days of event time ...")
    messages = list(simulator.messages(topics.EVENT_PARTITIONS))
    producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all", enable_idempotence=True,
                             linger_ms=20, batch_size=512 * 1024)
    counts: dict[str, int] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("Producing events", total=len(messages))
        for n, message in enumerate(messages, 1):
            producer.send(topics.EVENTS.name, key=message.key, value=message.value, partition=message.partition)
            counts[message.kind] = counts.get(message.kind, 0) + 1
            if n % 2000 == 0:
                progress.update(task, completed=n)
        producer.flush()
        progress.update(task, completed=len(messages))
    producer.close()
    return counts


def _wait_for_pipeline(console: Console, config, sent: dict[str, int], timeout: float = 2400) -> None:
    total = sum(sent.values())
    probe = LagProbe(config)
    deadline = time.monotonic() + timeout
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            folded = progress.add_task("Worker folding events", total=total)
            while time.monotonic() < deadline:
                lag = probe.lag()
                if lag.worker is not None:
                    progress.update(folded, completed=total - lag.worker,
                                    description=f"Worker folding events (writer behind by {lag.writer})")
                if lag.caught_up:
                    return
                time.sleep(1)
        raise TimeoutError(f"the pipeline did not catch up within {timeout:.0f}s")
    finally:
        probe.close()


def _segment_the_population(console: Console, config, writer: ProjectionWriter) -> None:
    """Value tiers and RFM scores need population boundaries; the writer publishes them every
    CRM_BOUNDARIES_SECONDS. The demo asks for them at once, then ticks every partition so that the
    worker carries them to every customer (docs/segments.md)."""
    boundaries_id = writer.boundaries.request()
    model_id = writer.churn_model.request()
    console.print(f"Published segment boundaries {boundaries_id} and churn model {model_id}; "
                  "ticking every partition to apply them ...")
    producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all")
    now = datetime.now(UTC)
    for partition in range(topics.EVENT_PARTITIONS):
        producer.send(topics.EVENTS.name, key=b"clock", value=clock_tick(partition, now), partition=partition)
    producer.flush()
    producer.close()
    time.sleep(1)  # let the lag probe see the ticks
    _wait_for_pipeline(console, config, {"ticks": topics.EVENT_PARTITIONS})


def _summary(console: Console, writer: ProjectionWriter, sent: dict[str, int], elapsed: float) -> None:
    client = writer.client

    def query(sql: str):
        result = client.query(sql)
        return result.column_names, result.result_rows

    console.rule("[bold]What happened")
    console.print(f"Sent to crm.events: {sum(sent.values())} records "
                  + "(" + ", ".join(f"{kind} {n}" for kind, n in sorted(sent.items())) + ")")
    [(events, attributed, customers, merged, dead)] = query(
        "SELECT (SELECT uniqExact(event_id) FROM events FINAL), "
        "(SELECT countIf(attributed_from != '') FROM events FINAL), "
        "(SELECT countIf(merged_into = '') FROM customer_profiles FINAL), "
        "(SELECT countIf(merged_into != '') FROM customer_profiles FINAL), "
        "(SELECT count() FROM dead_letters FINAL)")[1]
    console.print(f"Accepted into `events`: {events} (duplicates ignored: {sent.get('valid', 0) + sent.get('duplicate', 0) - events}); "
                  f"{attributed} came with only an alias and were attributed to their customer")
    console.print(f"Customer profiles: {customers} (and {merged} kept under an alias, merged);  dead letters: {dead};  "
                  f"wall time {elapsed:.0f}s")
    print_result(*query("SELECT type, count() AS events FROM events FINAL GROUP BY type ORDER BY events DESC"),
                 title="Events by type", console=console)
    print_result(*query("SELECT reason, count() AS records, any(detail) AS example FROM dead_letters FINAL "
                        "GROUP BY reason ORDER BY records DESC"), title="Dead letters by reason", console=console)
    columns, rows = query("SELECT * FROM customer_profiles FINAL WHERE merged_into = '' "
                          "ORDER BY purchase_count DESC, customer_key LIMIT 1")
    console.print("\n[bold]Sample profile[/bold] (the most frequent buyer):")
    for column, value in zip(columns, rows[0]):
        console.print(f"  {column:<18} {value}")
    for title, sql in EXAMPLES:
        console.print(f"\n[bold]{title}[/bold]\n[dim]{sql.strip()}[/dim]")
        print_result(*query(sql), console=console)
