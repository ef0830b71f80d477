"""`crm demo`: the whole platform on its embedded default, on a fresh state directory, driven by the
simulated workload; ends with what it did, checked against what the simulation knows, a sample
profile and example SQL with its results.

Time in the demo is the simulated history's, ending now: `now` is read once, at the start, and the
history is the `days` before it. The worker's own wall-clock ticks are off; the simulator's ticks
(every UTC midnight, and one at the end) are the only clock in the log, so nobody ages faster than
the history says. The history is sent in stages of `PUBLISH_EVERY_DAYS` of event time; after each,
once the pipeline has folded it, the projection writer publishes segment boundaries and the churn
model, so that value tiers, RFM, p_alive and the actions they drive exist while the history is
replayed, as in a platform that had been running through it."""

from __future__ import annotations

import os
import re
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kafka import KafkaProducer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from deploy.kafka.broker import LocalBroker
from deploy.topics import ensure_topics
from projections.writer import ProjectionWriter
from services import processes
from services.lag import LagProbe
from services.output import print_result
from services.simulator import STORES, Customer, Simulator, Workload
from streams import topics
from schemas.alerts import AlertType
from streams.churn.rules import ChurnRulesVersion, load_churn_rules
from streams.config import Settings, settings

# How often, in days of event time, the demo has the writer publish boundaries and the churn model.
PUBLISH_EVERY_DAYS = 30
# The demo's churn rules: the latest version of the rules file, in force over the whole history.
DEMO_CHURN_RULES = "churn-rules.toml"
DEMO_RULES_FROM = "2020-01-01T00:00:00Z"
# A customer who left this long before the end has had time to raise every churn indicator
# (deploy/churn-rules.toml: dormant after 60 days).
DETECTABLE_AFTER_DAYS = 60

EXAMPLES = [
    ("Revenue and customers per store, last 30 days", """
SELECT store_id, count(DISTINCT customer_key) AS customers, count() AS purchases,
       sum(amount) AS revenue_eur, round(avg(amount), 2) AS avg_basket
FROM events FINAL
WHERE type = 'purchase_completed' AND store_id != ''
  AND occurred_at >= (SELECT max(occurred_at) FROM events) - INTERVAL 30 DAY
GROUP BY store_id ORDER BY revenue_eur DESC"""),
    ("Customers who used to buy and went quiet (no purchase in the last 60 days), by what the model says", """
SELECT multiIf(churn_p_alive < 0.3, 'p_alive < 0.3', churn_p_alive < 0.7, '0.3 to 0.7', 'p_alive >= 0.7') AS model_says,
       count() AS quiet_customers, round(avg(purchase_count), 1) AS avg_past_purchases,
       sum(spend['EUR']) AS past_spend_eur, countIf(length(open_alerts) > 0) AS with_open_alert
FROM customer_profiles FINAL
WHERE merged_into = '' AND purchase_count >= 3
  AND last_purchase_at < (SELECT max(as_of) FROM customer_profiles FINAL) - INTERVAL 60 DAY
GROUP BY model_says ORDER BY model_says"""),
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
       round(avg(purchase_count), 1) AS avg_purchases, sum(spend['EUR']) AS spend_eur,
       round(avg(churn_p_alive), 2) AS avg_p_alive
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
    ("Why alerts opened, and the action recommended for the customer's value tier", """
SELECT reason, count() AS opened, countIf(action_kind = 'personal_call') AS calls,
       countIf(action_kind = 'bonus_points') AS bonus_points, countIf(action_kind = 'coupon') AS coupons,
       countIf(action_kind = 'none') AS no_consented_channel
FROM churn_alerts FINAL ARRAY JOIN reason_codes AS reason
WHERE status = 'opened' GROUP BY reason ORDER BY opened DESC"""),
]


@dataclass(frozen=True)
class Stage:
    """One publication during the replay: as of which event time, and the ids in force after it
    (a churn model id is None until a fit converged)."""
    at: datetime
    boundaries_id: str | None
    model_id: str | None
    new_model: bool


def run_demo(customers: int, days: int, seed: int) -> int:
    console = Console()
    now = datetime.now(UTC)  # the demo's one wall-clock read: the simulated history ends here
    state_dir = settings().state_dir / "demo"
    os.environ["CRM_STATE_DIR"] = str(state_dir)
    rules_source = settings().churn_rules
    # Before anything is started: the worker, the writer and the stack left running read this file.
    os.environ["CRM_CHURN_RULES"] = str(state_dir / DEMO_CHURN_RULES)
    # Boundaries and the churn model only when the demo asks, at points of the simulated history.
    config = replace(settings(), boundaries_seconds=0, churn_model_seconds=0)
    broker = LocalBroker(config)
    worker = processes.worker(config)
    worker.env["CRM_TICK_SECONDS"] = "0"  # the simulator's ticks are the clock (module docstring)
    if config.uses_local_kafka:
        broker.stop()
    worker.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
    churn_version = _churn_rules_for_demo(rules_source, state_dir / DEMO_CHURN_RULES)
    console.rule("[bold]crm demo")
    console.print(f"State directory: {state_dir} (fresh)")
    console.print(f"Churn rules: version {churn_version} of {_relative(rules_source)}, the latest, over the whole "
                  f"history, as in a shop that has run it from the start ({_relative(state_dir / DEMO_CHURN_RULES)})")

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
        simulator = Simulator(Workload.ending(now, days=days, customers=customers, seed=seed))
        sent, stages = _replay(console, config, writer, simulator)
        if not writer_thread.is_alive():
            raise RuntimeError("the projection writer stopped; see the log above")
        _summary(console, config, writer, simulator, sent, stages, time.monotonic() - started)
        _next_steps(console, state_dir)
    finally:
        writer.stop()
        writer_thread.join(timeout=15)
        worker.stop()
        if config.uses_local_kafka:
            broker.stop()
    from services.dashboard.launch import serve_after_demo

    serve_after_demo(console)  # the stack again, in the background, with the dashboard on the demo's data
    return 0


def _churn_rules_for_demo(source: Path, target: Path) -> str:
    """Writes to `target` the latest version of the churn rules in `source`, in force from 2020 on, and
    returns its name. The rules file dates each version by event time and a new one takes effect
    from its `effective_from` (never earlier: that would rewrite alerts already raised), so a history
    that ends now would be judged mostly by older versions; the demo shows the rules a fresh
    install runs, over its whole simulated history."""
    latest = load_churn_rules(source).versions[-1]
    blocks = re.split(r"(?m)^(?=\[\[versions\]\][ \t]*(?:#.*)?$)", source.read_text())
    block, count = re.subn(r"(?m)^effective_from[ \t]*=.*$", f"effective_from = {DEMO_RULES_FROM}", blocks[-1],
                           count=1)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# crm demo: version {latest.version} of {source}, from {DEMO_RULES_FROM} (services/demo.py).\n"
                      + block)
    derived = load_churn_rules(target).versions
    if count != 1 or len(derived) != 1 or derived[0].model_dump(exclude={"effective_from"}) \
            != latest.model_dump(exclude={"effective_from"}):
        raise ValueError(f"could not take the latest churn rules version out of {source}")
    return latest.version


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _next_steps(console: Console, state_dir: Path) -> None:
    console.print(f"\nThe data stays in {state_dir}. Query it:  ./crm --state-dir {_relative(state_dir)} sql \"SELECT ...\"")


# --- the replay ------------------------------------------------------------------------------------

def _replay(console: Console, config: Settings, writer: ProjectionWriter,
            simulator: Simulator) -> tuple[dict[str, int], list[Stage]]:
    """Send the simulated history in stages; at every publication point (each `PUBLISH_EVERY_DAYS`
    of event time, and the end), before the clock ticks that follow it, wait until the worker and
    the writer have caught up and have the writer publish: the ticks then carry the new boundaries
    and model to every customer. Returns the records sent by kind, and the stages."""
    workload = simulator.w
    console.print(f"Simulating {workload.customers} customers in {len(STORES)} stores over the {workload.days} days "
                  f"of event time up to now ({workload.start:%Y-%m-%d %H:%M} to {workload.end:%Y-%m-%d %H:%M} UTC) ...")
    messages = list(simulator.messages(topics.EVENT_PARTITIONS))
    producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all", enable_idempotence=True,
                             linger_ms=20, batch_size=512 * 1024)
    probe = LagProbe(config)
    counts: Counter[str] = Counter()
    stages: list[Stage] = []
    points = _publication_points(workload.start, workload.end)
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("Replaying the history", total=len(messages))
            for message in messages:
                if message.kind == "tick" and message.partition == 0 and points and message.at >= points[0]:
                    producer.flush()
                    _wait_for_pipeline(probe, progress, task, sum(counts.values()), f"up to {points[0]:%Y-%m-%d}")
                    stages.append(_publish(writer, points[0], stages))
                    progress.console.print(_describe(stages[-1], workload))
                    points = [point for point in points if point > message.at]
                producer.send(topics.EVENTS.name, key=message.key, value=message.value, partition=message.partition)
                counts[message.kind] += 1
            producer.flush()
            _wait_for_pipeline(probe, progress, task, len(messages), "the end")
    finally:
        probe.close()
        producer.close()
    return dict(counts), stages


def _publication_points(start: datetime, end: datetime) -> list[datetime]:
    """Every `PUBLISH_EVERY_DAYS` from `start`, and `end`: increasing, the last one `end`."""
    points, point = [], start + timedelta(days=PUBLISH_EVERY_DAYS)
    while point < end:
        points.append(point)
        point += timedelta(days=PUBLISH_EVERY_DAYS)
    return points + [end]


def _wait_for_pipeline(probe: LagProbe, progress: Progress, task: TaskID, sent: int, what: str,
                       timeout: float = 2400) -> None:
    """Until the worker has folded the `sent` records and the writer has stored what came of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lag = probe.lag()
        if lag.worker is not None:
            progress.update(task, completed=sent - lag.worker,
                            description=f"Replaying the history, {what} (writer behind by {lag.writer})")
        if lag.caught_up:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the pipeline did not catch up within {timeout:.0f}s")


def _publish(writer: ProjectionWriter, at: datetime, earlier: list[Stage]) -> Stage:
    last_model = earlier[-1].model_id if earlier else None
    boundaries_id = writer.boundaries.request()
    model_id = writer.churn_model.request()
    return Stage(at, boundaries_id, model_id, new_model=model_id is not None and model_id != last_model)


def _describe(stage: Stage, workload: Workload) -> str:
    day = round((stage.at - workload.start).total_seconds() / 86400)
    model = (f"churn model {stage.model_id}" if stage.new_model
             else f"churn model unchanged ({stage.model_id})" if stage.model_id
             else "no churn model yet (too few buyers, or the fit did not converge)")
    return f"  day {day:>3} ({stage.at:%Y-%m-%d}): published segment boundaries {stage.boundaries_id}; {model}"


# --- the summary ---------------------------------------------------------------------------------

def _summary(console: Console, config: Settings, writer: ProjectionWriter, simulator: Simulator,
             sent: dict[str, int], stages: list[Stage], elapsed: float) -> None:
    client = writer.client

    def query(sql: str, parameters: dict | None = None):
        result = client.query(sql, parameters=parameters)
        return result.column_names, result.result_rows

    console.rule("[bold]What happened")
    console.print(f"Sent to crm.events: {sum(sent.values())} records "
                  + "(" + ", ".join(f"{kind} {n}" for kind, n in sorted(sent.items())) + ")")
    [(events, attributed, customers, anonymous, merged, dead)] = query(
        "SELECT (SELECT uniqExact(event_id) FROM events FINAL), "
        "(SELECT countIf(attributed_from != '') FROM events FINAL), "
        "(SELECT countIf(merged_into = '' AND customer_id IS NOT NULL) FROM customer_profiles FINAL), "
        "(SELECT countIf(merged_into = '' AND customer_id IS NULL) FROM customer_profiles FINAL), "
        "(SELECT countIf(merged_into != '') FROM customer_profiles FINAL), "
        "(SELECT count() FROM dead_letters FINAL)")[1]
    console.print(f"Accepted into `events`: {events} (duplicates ignored: {sent.get('valid', 0) + sent.get('duplicate', 0) - events}); "
                  f"{attributed} came with only an alias and were attributed to their customer")
    console.print(f"Customer profiles: {customers} (and {merged} kept under an alias, merged; {anonymous} known "
                  f"only by a device);  dead letters: {dead};  wall time {elapsed:.0f}s")
    print_result(*query("SELECT type, count() AS events FROM events FINAL GROUP BY type ORDER BY events DESC"),
                 title="Events by type", console=console)
    print_result(*query("SELECT reason, count() AS records, any(detail) AS example FROM dead_letters FINAL "
                        "GROUP BY reason ORDER BY records DESC"), title="Dead letters by reason", console=console)
    _published(console, query, stages)
    _scores(console, query, simulator)
    _alerts(console, config, query, simulator)
    _sample_profiles(console, query, simulator)
    for title, sql in EXAMPLES:
        console.print(f"\n[bold]{title}[/bold]\n[dim]{sql.strip()}[/dim]")
        print_result(*query(sql), console=console)


def _published(console: Console, query, stages: list[Stage]) -> None:
    console.rule("[bold]Published while the history was replayed")
    print_result(*query(
        "SELECT formatDateTime(occurred_at, '%Y-%m-%d %H:%i') AS fitted_as_of, customers, r, alpha AS alpha_days, a, b, "
        "round(r / alpha * 30, 2) AS purchases_per_month, round(a / (a + b), 4) AS dropout_per_purchase, "
        "log_likelihood FROM churn_models FINAL ORDER BY occurred_at"),
        title="Churn models (BG/NBD, docs/churn-score.md)", console=console)
    console.print("r / alpha is the mean purchase rate, a / (a + b) the mean chance to leave right after a purchase. "
                  "A fit over a short history sees few customers leave yet (leaving shows only as a silence longer "
                  "than the customer's rhythm), so early models may put that chance near zero, with extreme a and b.")
    print_result(*query(
        "SELECT boundaries_id, formatDateTime(as_of, '%Y-%m-%d %H:%i') AS as_of, value_high_min AS high_from_eur, "
        "value_mid_min AS mid_from_eur, "
        "value_population AS spenders, rfm_population AS buyers, recency_days_cuts, frequency_cuts "
        "FROM segment_boundaries FINAL ORDER BY as_of"),
        title="Segment boundaries (value tiers: 365-day spend; docs/segments.md)", console=console)
    unconverged = sum(1 for stage in stages if stage.model_id is None)
    if unconverged:
        console.print(f"{unconverged} of {len(stages)} publication points had no churn model yet.")


def _scores(console: Console, query, simulator: Simulator) -> None:
    """p_alive on every profile, and whether it tells apart the customers who really left."""
    console.rule("[bold]p_alive on profiles")
    _, rows = query("SELECT customer_id, churn_p_alive FROM customer_profiles FINAL "
                    "WHERE merged_into = '' AND customer_id IS NOT NULL")
    scores = {customer_id: p for customer_id, p in rows}
    missing = sum(1 for p in scores.values() if p is None)
    console.print(f"{len(scores) - missing} of {len(scores)} customer profiles have a p_alive "
                  f"(the probability that the customer still buys here, under the latest model).")
    print_result(*query(
        "SELECT multiIf(churn_p_alive IS NULL, 'none', churn_p_alive < 0.1, '0.0-0.1', churn_p_alive < 0.3, '0.1-0.3', "
        "churn_p_alive < 0.5, '0.3-0.5', churn_p_alive < 0.8, '0.5-0.8', churn_p_alive < 1, '0.8-1.0', "
        "'1 (one purchase so far)') AS p_alive, "
        "count() AS customers, round(avg(churn_expected_90d), 2) AS expected_purchases_90d "
        "FROM customer_profiles FINAL WHERE merged_into = '' AND customer_id IS NOT NULL GROUP BY p_alive ORDER BY p_alive"),
        title="Distribution", console=console)
    left, stayed = _split_by_truth(simulator.customers, scores)
    console.print(f"The simulator knows who left: mean p_alive {_mean(left):.2f} over the {len(left)} customers who left, "
                  f"{_mean(stayed):.2f} over the {len(stayed)} still buying; p_alive < 0.3 for {_share(left, 0.3):.0%} "
                  f"of those who left and {_share(stayed, 0.3):.0%} of the others.")
    print_result(*query("SELECT customer_id, purchase_count, last_purchase_at, churn_p_alive, churn_expected_90d, "
                        "lifecycle_stage FROM customer_profiles FINAL WHERE merged_into = '' AND customer_id IS NOT NULL "
                        "ORDER BY cityHash64(customer_id) LIMIT 8"), title="A sample", console=console)


def _split_by_truth(customers: list[Customer], scores: dict[str, float | None]) -> tuple[list[float], list[float]]:
    """The scored p_alive of the customers who left, and of those still buying at the end."""
    left = [scores[c.customer_id] for c in customers if c.left_at and scores.get(c.customer_id) is not None]
    stayed = [scores[c.customer_id] for c in customers if not c.left_at and scores.get(c.customer_id) is not None]
    return left, stayed


def _share(values: list[float], below: float) -> float:
    return sum(1 for value in values if value < below) / len(values) if values else 0.0


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _alerts(console: Console, config: Settings, query, simulator: Simulator) -> None:
    """How many alerts, why, which actions, and how the churn-risk ones compare with who really left."""
    console.rule("[bold]Alerts")
    customers, end = simulator.customers, simulator.w.end
    _, rows = query("SELECT customer_id, opened_at, reason_codes, severity FROM churn_alerts FINAL "
                    "WHERE status = 'opened' AND alert_type = 'churn_risk'")
    opened = [ChurnAlert(customer, at.replace(tzinfo=UTC), tuple(reasons), severity)
              for customer, at, reasons, severity in rows]
    left_at = {c.customer_id: c.left_at for c in customers if c.left_at}
    after_leaving = [alert for alert in opened if alert.after_leaving(left_at)]
    detectable = {c for c, at in left_at.items() if at <= end - timedelta(days=DETECTABLE_AFTER_DAYS)}
    caught = detectable & {alert.customer_id for alert in after_leaving}
    delay = statistics.median(alert.days_after_leaving(left_at) for alert in after_leaving) if after_leaving else 0
    [(open_now, open_on_left, open_urgent)] = query(
        "SELECT count(), countIf(now.2 IN {left:Array(String)}), countIf(now.3 IN ('high', 'critical')) "
        "FROM (SELECT alert_id, argMax(tuple(status, customer_id, severity), version) AS now FROM churn_alerts FINAL "
        "WHERE alert_type = 'churn_risk' GROUP BY alert_id) WHERE now.1 IN ('opened', 'updated')",
        {"left": sorted(left_at)})[1]
    early = [alert for alert in opened if not alert.after_leaving(left_at)]
    # Early warnings on customers who did leave later (the alert came before their last purchase),
    # and on customers still buying at the end of the history.
    before_leaving = [alert for alert in early if alert.customer_id in left_at]
    ahead = statistics.median(-alert.days_after_leaving(left_at) for alert in before_leaving) if before_leaving else 0
    rules = _churn_rules_at(config, end)
    per_leaver = len(opened) / max(len(left_at), 1)
    console.print(
        f"The simulator let {len(left_at)} of {len(customers)} customers ({len(left_at) / len(customers):.0%}) leave over "
        f"the {simulator.w.days} days (retailers commonly lose a third or more of a year's customers). Nobody says so: "
        f"they stop buying. The platform flagged {len(caught)} of the {len(detectable)} "
        f"({len(caught) / max(len(detectable), 1):.0%}) who left more than {DETECTABLE_AFTER_DAYS} days before the end, "
        f"a median of {delay:.0f} days after their last purchase.\n"
        f"Alert volume to expect: about one churn-risk alert per customer who leaves. Here {len(opened)} opened on "
        f"{len({alert.customer_id for alert in opened})} customers, {per_leaver:.1f} per customer who left: "
        f"{len(after_leaving)} ({len(after_leaving) / max(len(opened), 1):.0%}) after the customer's real last purchase, "
        f"and {len(early)} early warnings, {len(before_leaving)} of them on customers who did leave later (a median "
        f"of {ahead:.0f} days before their last purchase) and {len(early) - len(before_leaving)} on customers only "
        f"having a long pause, which their next purchase closes. Why so few: {_why(rules)} "
        f"Open now: {open_now} ({open_now / len(customers):.0%} of customers; {open_on_left} on customers who have "
        f"left; {open_urgent} of high or critical severity, the call list).")
    print_result(*_by_reason(opened, left_at), title="Churn-risk alerts opened, by reason, against what the simulator "
                 "knows", console=console)
    print_result(*_by_severity(opened, left_at), title="Churn-risk alerts opened, by severity: how often the "
                 "customer had left", console=console)
    print_result(*_by_kind(customers, opened, left_at), title="Churn-risk alerts opened, by the simulator's kind of "
                 "shopper", console=console)
    print_result(*query("SELECT alert_type, count() AS opened, uniqExact(customer_id) AS customers, "
                        "countIf(severity IN ('high', 'critical')) AS high_or_critical FROM churn_alerts FINAL "
                        "WHERE status = 'opened' GROUP BY alert_type ORDER BY opened DESC"),
                 title="Alerts opened, by type", console=console)
    columns, rows = query("SELECT action_kind, if(value_tier = '', '(none yet)', value_tier) AS tier, "
                          "action_channel, count() AS alerts FROM churn_alerts FINAL "
                          "WHERE status = 'opened' GROUP BY action_kind, tier, action_channel "
                          "ORDER BY action_kind, tier, alerts DESC")
    print_result(columns, rows, title="Recommended actions, by value tier and consented channel", console=console)
    allowed = _allowed_actions(config, end)
    seen = {row[0] for row in rows}
    console.print(f"Action kinds the churn rules allow: {', '.join(sorted(allowed))}; recommended: "
                  + ("every one" if allowed <= seen else f"all but {', '.join(sorted(allowed - seen))}"))


@dataclass(frozen=True)
class ChurnAlert:
    customer_id: str
    opened_at: datetime
    reasons: tuple[str, ...]
    severity: str

    def after_leaving(self, left_at: dict[str, datetime]) -> bool:
        """Whether the customer had really left (their last purchase behind them) when it opened."""
        left = left_at.get(self.customer_id)
        return left is not None and left <= self.opened_at

    def days_after_leaving(self, left_at: dict[str, datetime]) -> float:
        return (self.opened_at - left_at[self.customer_id]).total_seconds() / 86400


def _by_reason(opened: list[ChurnAlert], left_at: dict[str, datetime]) -> tuple[list[str], list[tuple]]:
    """Per reason: the alerts opened with it, with it alone, the share opened after the customer had
    left, and the commonest severity."""
    rows = []
    for reason in sorted({reason for alert in opened for reason in alert.reasons}):
        with_it = [alert for alert in opened if reason in alert.reasons]
        true = sum(alert.after_leaving(left_at) for alert in with_it)
        rows.append((reason, len(with_it), sum(len(alert.reasons) == 1 for alert in with_it),
                     f"{true / len(with_it):.0%}", Counter(alert.severity for alert in with_it).most_common(1)[0][0]))
    rows.sort(key=lambda row: -row[1])
    return ["reason", "opened", "alone", "customer had left", "usual severity"], rows


def _by_severity(opened: list[ChurnAlert], left_at: dict[str, datetime]) -> tuple[list[str], list[tuple]]:
    """Per severity, most severe first: the alerts opened, the share of them opened after the
    customer had left, and the share on customers who left at all (early warnings included)."""
    rows = []
    for severity in ("critical", "high", "medium", "low"):
        alerts = [alert for alert in opened if alert.severity == severity]
        if alerts:
            rows.append((severity, len(alerts), f"{sum(a.after_leaving(left_at) for a in alerts) / len(alerts):.0%}",
                         f"{sum(a.customer_id in left_at for a in alerts) / len(alerts):.0%}"))
    return ["severity", "opened", "customer had left", "customer left, then or later"], rows


def _by_kind(customers: list[Customer], opened: list[ChurnAlert],
             left_at: dict[str, datetime]) -> tuple[list[str], list[tuple]]:
    """Per kind of shopper (the simulator's personas): customers, how many left, the alerts opened
    after the customer had left and the early ones, and the early ones per customer still buying."""
    kind_of = {c.customer_id: c.persona.name for c in customers}
    rows = []
    for kind in sorted(set(kind_of.values())):
        members = [c for c in customers if c.persona.name == kind]
        left = sum(1 for c in members if c.left_at)
        alerts = [alert for alert in opened if kind_of.get(alert.customer_id) == kind]
        true = sum(alert.after_leaving(left_at) for alert in alerts)
        rows.append((kind, len(members), left, len(alerts), true, len(alerts) - true,
                     f"{(len(alerts) - true) / max(len(members) - left, 1):.2f}"))
    rows.sort(key=lambda row: -row[5])
    return ["kind of shopper", "customers", "left", "alerts", "after leaving", "early",
            "early per customer still buying"], rows


def _churn_rules_at(config: Settings, at: datetime) -> ChurnRulesVersion:
    return load_churn_rules(config.churn_rules).at_ms(int(at.timestamp() * 1000))


def _why(rules: ChurnRulesVersion) -> str:
    """What in the churn rules version keeps the alert volume down (docs/alerts.md)."""
    churn = AlertType.CHURN_RISK
    indicators = rules.indicators
    parts = [f"under rules version {rules.version}"]
    if churn in rules.open_min_weight:
        parts.append(f"a churn-risk alert opens only on reasons weighing {rules.open_min_weight[churn]:g} or more "
                     f"(purchase_gap {indicators.purchase_gap.weight:g}, dormant {indicators.dormant.weights[0]:g} "
                     f"then {indicators.dormant.weights[-1]:g}, low_p_alive {indicators.low_p_alive.weight:g}, "
                     f"frequency_falling {indicators.frequency_falling.weight:g}, activity_falling "
                     f"{indicators.activity_falling.weight:g})")
    if churn in rules.reopen_after_days:
        parts.append(f"not within {rules.reopen_after_days[churn]} days of the customer's last one closing")
    parts.append(f"a purchase gap counts from {indicators.purchase_gap.factor:g} times the customer's usual gap")
    activity = indicators.activity_falling
    if activity.max_recent is not None or activity.min_days_since_purchase is not None:
        parts.append("app activity only once it has stopped"
                     + (f" and the customer has not bought for {activity.min_days_since_purchase} days"
                        if activity.min_days_since_purchase is not None else ""))
    return "; ".join(parts) + ". A retailer acts on the high-severity alerts first; how often each reason was right is below."


def _allowed_actions(config: Settings, at: datetime) -> set[str]:
    version = _churn_rules_at(config, at)
    return {action.kind for actions in version.actions.values() for action in actions}


def _sample_profiles(console: Console, query, simulator: Simulator) -> None:
    """The most frequent buyer among those who bought in the last 14 days, in full; and a customer who
    left, as the platform sees them."""
    columns, rows = query("SELECT * FROM customer_profiles FINAL WHERE merged_into = '' AND lifecycle_stage = 'active' "
                          "AND last_purchase_at >= (SELECT max(as_of) FROM customer_profiles FINAL) - INTERVAL 14 DAY "
                          "ORDER BY purchase_count DESC, customer_key LIMIT 1")
    console.print("\n[bold]Sample profile[/bold] (the most frequent buyer among those who bought in the last 14 days):")
    for column, value in zip(columns, rows[0]):
        console.print(f"  {column:<18} {value}")
    gone = next(_left_long_ago(simulator), None)
    if gone is None:
        return
    columns, rows = query("SELECT p.customer_id, p.purchase_count, p.last_purchase_at, p.lifecycle_stage, p.value_tier, "
                          "p.churn_p_alive, p.open_alerts, a.opened_at AS alert_opened, a.reason_codes, a.action_kind, "
                          "a.action_channel FROM customer_profiles AS p FINAL "
                          "LEFT JOIN (SELECT customer_id, opened_at, reason_codes, action_kind, action_channel "
                          "FROM churn_alerts FINAL WHERE alert_type = 'churn_risk' AND status = 'opened' "
                          "ORDER BY opened_at DESC LIMIT 1 BY customer_id) AS a ON a.customer_id = p.customer_id "
                          "WHERE p.customer_id = {c:String}", {"c": gone.customer_id})
    console.print(f"\n[bold]A valuable customer who left[/bold] (the simulator stopped them after their purchase "
                  f"of {gone.left_at:%Y-%m-%d}):")
    for column, value in zip(columns, rows[0]):
        console.print(f"  {column:<18} {value}")


def _left_long_ago(simulator: Simulator) -> Iterator[Customer]:
    """Customers who left more than DETECTABLE_AFTER_DAYS before the end, the most orders first."""
    cutoff = simulator.w.end - timedelta(days=DETECTABLE_AFTER_DAYS)
    gone = [c for c in simulator.customers if c.left_at and c.left_at <= cutoff]
    return iter(sorted(gone, key=lambda c: (-len(c.orders), c.customer_id)))
